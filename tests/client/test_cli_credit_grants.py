"""Credit grants from the shell: `credits grant --effective-at/--expires-at/--priority`,
`credits void` and `credits list`, against a real server.

The suite's clock stands at 2026-03-15 12:00 UTC (tests/conftest.py); the server's
ManualClock is moved to let grants become effective and expire.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from pagemeter.v1 import admin_pb2
from pagemeter_client import AsyncPagemeterClient, cli
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.store.keys import OrgKeys
from tests.client.test_cli import EAGLE_PLAN_ARGS, Cli, row
from tests.conftest import START_MS, RunningServer

DAY_MS = 86_400_000
HEADER = ["grant", "id", "metric", "remaining/units", "status", "priority", "effective", "expires"]


@pytest.fixture
async def pagemeter(pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI against the test server; "acme" has Eagle Doc's plan."""
    shell = Cli(pagemeter_server.target, capsys)
    plan = await shell("plan", "set", "acme", *EAGLE_PLAN_ARGS)
    assert plan.code == 0, plan.err
    return shell


def table(text: str) -> list[list[str]]:
    """The rows of a `credits list` table, split into cells (header checked, left out)."""
    header, *rows = text.splitlines()
    assert header.split() == HEADER
    return [line.split() for line in rows]


async def grants(server: RunningServer) -> list[str]:
    reply = await server.admin.ListCreditGrants(admin_pb2.ListCreditGrantsRequest(org_id="acme"))
    return [g.grant_id for g in reply.grants]


async def test_grants_with_terms_are_listed_in_draw_order_with_their_statuses(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    """--expires-at (any offset) and --priority reach the server; `credits list` shows
    each metric's grants in draw order (priority, then earliest expiry, never last),
    with remaining/units, status, priority, effective and expiry times in UTC or
    "never"; as time passes, PENDING turns ACTIVE and ACTIVE turns EXPIRED."""
    spring = await pagemeter(
        "credits", "grant", "acme", "pages", "100", "--grant-id", "spring",
        "--reason", "po 7", "--priority", "10", "--expires-at", "2026-04-01T00:00:00+02:00",
    )  # fmt: skip
    assert spring.code == 0, spring.err
    assert row(spring.out, "balance:") == ["100"] and row(spring.out, "duplicate:") == ["no"]
    await pagemeter("credits", "grant", "acme", "pages", "50", "--grant-id", "goodwill")
    await pagemeter(
        "credits", "grant", "acme", "pages", "30", "--grant-id", "promo",
        "--expires-at", "2026-03-20T12:00:00Z",
    )  # fmt: skip
    later = await pagemeter(
        "credits", "grant", "acme", "pages", "20", "--grant-id", "later",
        "--effective-at", "2026-03-16T00:00:00Z", "--priority", "0",
    )  # fmt: skip
    assert later.code == 0, later.err
    assert row(later.out, "balance:") == ["180"], "a pending grant is not usable yet"
    await pagemeter("credits", "grant", "acme", "documents", "5", "--grant-id", "docs")

    listing = await pagemeter("credits", "list", "acme")
    assert listing.code == 0, listing.err
    assert table(listing.out) == [
        ["docs", "documents", "5/5", "ACTIVE", "50", "2026-03-15T12:00:00Z", "never"],
        ["later", "pages", "20/20", "PENDING", "0", "2026-03-16T00:00:00Z", "never"],
        ["spring", "pages", "100/100", "ACTIVE", "10", "2026-03-15T12:00:00Z",
         "2026-03-31T22:00:00Z"],
        ["promo", "pages", "30/30", "ACTIVE", "50", "2026-03-15T12:00:00Z",
         "2026-03-20T12:00:00Z"],
        ["goodwill", "pages", "50/50", "ACTIVE", "50", "2026-03-15T12:00:00Z", "never"],
    ]  # fmt: skip

    # 120 past the contract quota: spring's 100, then 20 of promo (later is not effective yet).
    await pagemeter("record", "acme", "job-1", "pages=2120")
    pagemeter_server.clock.set(START_MS + 5 * DAY_MS)
    pages = await pagemeter("credits", "list", "acme", "--metric", "pages")
    assert [(r[0], r[2], r[3]) for r in table(pages.out)] == [
        ("later", "20/20", "ACTIVE"),
        ("spring", "0/100", "EXHAUSTED"),
        ("promo", "10/30", "EXPIRED"),
        ("goodwill", "50/50", "ACTIVE"),
    ]
    usage = await pagemeter("usage", "acme", "--json")
    pages_usage = next(m for m in usage.json()["metrics"] if m["metric"] == "pages")
    assert pages_usage["prepaid_balance"] == "70"


async def test_list_json_and_an_empty_list(pagemeter: Cli) -> None:
    """--json prints the ListCreditGrantsResponse (enum names, RFC 3339 times, no
    expires_at for a grant that never expires); no grants is one line."""
    empty = await pagemeter("credits", "list", "acme")
    assert empty.code == 0 and empty.out == "no credit grants\n"
    assert (await pagemeter("credits", "list", "acme", "--json")).json() == {"grants": []}

    await pagemeter(
        "credits", "grant", "acme", "pages", "10", "--grant-id", "g-1",
        "--expires-at", "2026-03-16T12:00:00Z", "--priority", "5",
    )  # fmt: skip
    await pagemeter("credits", "grant", "acme", "pages", "7", "--grant-id", "g-2")
    as_json = await pagemeter("credits", "list", "acme", "--json")
    assert as_json.code == 0, as_json.err
    first, second = as_json.json()["grants"]
    assert first == {
        "grant_id": "g-1",
        "metric": "pages",
        "units": "10",
        "remaining": "10",
        "effective_at": "2026-03-15T12:00:00Z",
        "expires_at": "2026-03-16T12:00:00Z",
        "priority": 5,
        "status": "CREDIT_GRANT_STATUS_ACTIVE",
    }
    assert "expires_at" not in second and second["priority"] == 50
    other = await pagemeter("credits", "list", "acme", "--metric", "documents", "--json")
    assert other.json() == {"grants": []}


async def test_void_then_list_shows_voided_and_a_second_void_says_so(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    """`credits void` prints the units that stop counting; the grant is then listed
    VOIDED with 0 left; voiding it again voids nothing and says already voided."""
    await pagemeter("credits", "grant", "acme", "pages", "40", "--grant-id", "refund-me")
    await pagemeter("record", "acme", "job-1", "pages=2015")
    voided = await pagemeter("credits", "void", "acme", "refund-me", "--reason", "chargeback 12")
    assert voided.code == 0, voided.err
    assert row(voided.out, "grant id:") == ["refund-me"]
    assert row(voided.out, "voided units:") == ["25"]
    assert row(voided.out, "already voided:") == ["no"]

    listing = await pagemeter("credits", "list", "acme")
    assert table(listing.out)[0][:4] == ["refund-me", "pages", "0/40", "VOIDED"]

    again = await pagemeter("credits", "void", "acme", "refund-me", "--reason", "chargeback 12")
    assert again.code == 0, again.err
    assert row(again.out, "voided units:") == ["0"]
    assert row(again.out, "already voided:") == ["yes"]
    as_json = await pagemeter(
        "credits", "void", "acme", "refund-me", "--reason", "chargeback 12", "--json"
    )
    assert as_json.json() == {"voided_units": "0", "already_voided": True}

    audit = await pagemeter("audit", "acme", "--json")
    (event,) = [e for e in audit.json()["events"] if e["action"] == "credits.void"]
    assert event["reason"] == "chargeback 12" and event["target"] == "pages"


async def test_voiding_an_unknown_grant_is_a_not_found_error(pagemeter: Cli) -> None:
    """Like any NOT_FOUND: exit 1, `error: NOT_FOUND: ...` and the ErrorInfo reason."""
    missing = await pagemeter("credits", "void", "acme", "nope", "--reason", "typo")
    assert missing.code == 1 and missing.out == ""
    assert missing.err.splitlines() == [
        "error: NOT_FOUND: the organization has no credit grant 'nope' (or it ran out and "
        "was dropped)",
        "  reason: GRANT_NOT_FOUND (domain pagemeter)",
    ]


async def test_void_needs_a_reason(pagemeter: Cli) -> None:
    """--reason is required (exit 2, nothing sent); a blank one is the server's to
    refuse (exit 1, naming the field)."""
    await pagemeter("credits", "grant", "acme", "pages", "40", "--grant-id", "g-1")
    without = await pagemeter("credits", "void", "acme", "g-1")
    assert without.code == 2 and "the following arguments are required: --reason" in without.err
    blank = await pagemeter("credits", "void", "acme", "g-1", "--reason", " ")
    assert blank.code == 1
    assert blank.err.startswith("error: INVALID_ARGUMENT: ")
    assert "  reason: reason is required: say why the grant is voided" in blank.err
    listing = await pagemeter("credits", "list", "acme")
    assert table(listing.out)[0][3] == "ACTIVE"


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--expires-at", "2026-04-01", "expires_at must be an RFC 3339 time with a UTC offset"),
        ("--expires-at", "2026-04-01T00:00:00", "expires_at must be an RFC 3339 time"),
        ("--expires-at", "2026-04-01 00:00:00Z", "expires_at must be an RFC 3339 time"),
        ("--expires-at", "2026-02-30T00:00:00Z", "expires_at must be an RFC 3339 time"),
        ("--expires-at", "next month", "(got 'next month')"),
        ("--effective-at", "2026-04-01T00:00:00+1:00", "effective_at must be an RFC 3339 time"),
        ("--effective-at", "1743465600", "effective_at must be an RFC 3339 time"),
        ("--priority", "high", "priority must be a whole number from 0 to 100 (got 'high')"),
        ("--priority", "-1", "priority must be a whole number from 0 to 100"),
        ("--priority", "101", "priority must be a whole number from 0 to 100 (got '101')"),
        ("--priority", "2.5", "priority must be a whole number from 0 to 100"),
        ("--priority", "99999999999", "priority must be a whole number from 0 to 100"),
    ],
)
def test_malformed_terms_exit_2_without_calling_the_server(
    flag: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed time or priority is refused as a malformed --billing-anchor is:
    exit code 2, the option and the field named, nothing sent."""
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: any call would fail differently
    argv = ["--target", nowhere, "credits", "grant", "acme", "pages", "10", "--grant-id", "g-1"]
    code = cli.main([*argv, flag, value])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert f"argument {flag}: " in captured.err and problem in captured.err, captured.err


@pytest.mark.parametrize(
    ("terms", "field", "problem"),
    [
        (["--expires-at", "2026-03-01T00:00:00Z"], "expires_at", "must be after effective_at"),
        (
            ["--effective-at", "2026-03-20T00:00:00Z", "--expires-at", "2026-03-19T00:00:00Z"],
            "expires_at",
            "must be after effective_at and after now",
        ),
        (["--expires-at", "1960-01-01T00:00:00Z"], "expires_at", "between 1970 and 9999"),
    ],
    ids=["expired", "before-effective", "before-1970"],
)
async def test_terms_only_the_server_can_judge_are_invalid_argument(
    pagemeter: Cli,
    pagemeter_server: RunningServer,
    terms: list[str],
    field: str,
    problem: str,
) -> None:
    """An expiry that is not after now and after --effective-at is refused by the
    server like any invalid argument: exit 1, the field named; nothing is granted."""
    run = await pagemeter("credits", "grant", "acme", "pages", "10", "--grant-id", "g-1", *terms)
    assert run.code == 1 and run.out == ""
    assert run.err.startswith("error: INVALID_ARGUMENT: ")
    assert f"  {field}: " in run.err and problem in run.err, run.err
    assert await grants(pagemeter_server) == []


async def test_too_many_live_grants_is_refused_with_its_reason(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    """Past 100 grants that can still count: FAILED_PRECONDITION, exit 1, with the
    reason TOO_MANY_CREDIT_GRANTS; voiding one makes room."""
    async with AsyncPagemeterClient(pagemeter_server.target) as sdk:
        for number in range(100):
            await sdk.grant_credits("acme", "pages", 1, f"g-{number}")
    full = await pagemeter("credits", "grant", "acme", "pages", "1", "--grant-id", "g-100")
    assert full.code == 1
    assert full.err.startswith("error: FAILED_PRECONDITION: the organization has 100 credit")
    assert "  reason: TOO_MANY_CREDIT_GRANTS (domain pagemeter)" in full.err
    await pagemeter("credits", "void", "acme", "g-7", "--reason", "make room")
    room = await pagemeter("credits", "grant", "acme", "pages", "1", "--grant-id", "g-100")
    assert room.code == 0, room.err


async def test_a_balance_of_an_earlier_release_is_listed_as_a_grant(
    pagemeter: Cli, redis_client: aioredis.Redis
) -> None:
    """A prepaid balance written by an earlier release is the never-expiring grant
    prepaid-<metric>, effective since ever (printed "-"), and can be voided under
    that id before the migration makes it a grant of its own."""
    await redis_client.hset(OrgKeys("acme").credits, "pages", "40")
    listing = await pagemeter("credits", "list", "acme")
    assert listing.code == 0, listing.err
    assert table(listing.out) == [["prepaid-pages", "pages", "40/40", "ACTIVE", "50", "-", "never"]]
    void = await pagemeter("credits", "void", "acme", "prepaid-pages", "--reason", "refund")
    assert void.code == 0, void.err
    after = await pagemeter("credits", "list", "acme")
    assert table(after.out) == [["prepaid-pages", "pages", "0/40", "VOIDED", "50", "-", "never"]]


@pytest.mark.usefixtures("plans_migrated")
async def test_a_rollover_from_the_command_line(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    """`rollover=50,rollover_cap=30` is shown with the plan; once a whole period
    under the plan has passed, `credits list` shows the next period's rollover grant,
    expiring at that period's end, and `credits void` voids it."""
    plan = await pagemeter(
        "plan", "set", "acme", "--name", "R", "--metric", "pages:quota=100,rollover=50,rollover_cap=30"
    )  # fmt: skip
    assert plan.code == 0, plan.err
    assert row(plan.out, "pages")[-4:] == ["50%", "up", "to", "30"]
    # March was not wholly under the plan (set on the 15th): April takes nothing in.
    pagemeter_server.clock.set(START_MS + 20 * DAY_MS)
    assert (await pagemeter("credits", "list", "acme")).out.strip() == "no credit grants"
    pagemeter_server.clock.set(START_MS + 50 * DAY_MS)
    listed = await pagemeter("credits", "list", "acme")
    assert listed.code == 0, listed.err
    assert table(listed.out) == [
        ["rollover-2026-05-pages", "pages", "30/30", "ACTIVE", "50", "2026-05-01T00:00:00Z",
         "2026-06-01T00:00:00Z"],
    ]  # fmt: skip
    voided = await pagemeter(
        "credits", "void", "acme", "rollover-2026-05-pages", "--reason", "not in contract"
    )
    assert voided.code == 0, voided.err
    assert table((await pagemeter("credits", "list", "acme")).out)[0][2:4] == ["0/30", "VOIDED"]


async def test_grant_ids_pagemeter_gives_itself_are_refused(pagemeter: Cli) -> None:
    """A grant named like a rollover or a prepaid balance would be mistaken for one."""
    for grant_id in ("rollover-2026-03-pages", "prepaid-pages"):
        refused = await pagemeter("credits", "grant", "acme", "pages", "5", "--grant-id", grant_id)
        assert refused.code == 1 and "INVALID_ARGUMENT" in refused.err
        assert "pagemeter's own" in refused.err
