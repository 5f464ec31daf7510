"""`pagemeter webhooks ...` end to end: a real server and Redis, the CLI in a thread.

Each command against WebhookService, its text and its --json; the signing secret
printed by create and rotate-secret once, and by no other command; bad input
refused with exit 2 and nothing changed. The delivery log and dead letters are
written by the dispatchers (tests/system/test_webhook_delivery.py); here they are
written with the dispatchers' own store calls.
"""

from __future__ import annotations

import re

import pytest
import redis.asyncio as aioredis

from pagemeter_client.cli.render.webhooks import SHOWN_ONCE_NOTE
from pagemeter_server.store.webhooks import ENDPOINTS_KEY, WebhookStore
from tests.client.test_cli import Cli, Run
from tests.conftest import RunningServer

URL = "https://hooks.example.com/pagemeter"
MISSING = "we_" + "0" * 24
SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")


@pytest.fixture
def pagemeter(pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(pagemeter_server.target, capsys)


@pytest.fixture
def store(redis_client: aioredis.Redis) -> WebhookStore:
    return WebhookStore(redis_client)


def field(run: Run, label: str) -> str:
    """The value of a `label: value` line."""
    line = next(line for line in run.out.splitlines() if line.startswith(f"{label}:"))
    return line.split(":", 1)[1].strip()


async def create(pagemeter: Cli, *argv: str) -> tuple[str, str]:
    """Create an endpoint; its id and secret."""
    run = await pagemeter("webhooks", "create", URL, "--json", *argv)
    assert run.code == 0, run.err
    answer = run.json()
    return answer["endpoint"]["endpoint_id"], answer["secret"]


async def endpoint_count(redis_client: aioredis.Redis) -> int:
    return int(await redis_client.hlen(ENDPOINTS_KEY))


async def test_create_prints_the_secret_once_and_no_read_shows_it(pagemeter: Cli) -> None:
    created = await pagemeter(
        "webhooks",
        "create",
        URL,
        "--org",
        "acme",
        "--type",
        "usage.recorded",
        "--type",
        "plan.changed",
        "--description",
        "billing",
    )
    assert created.code == 0, created.err
    secret = field(created, "secret")
    assert SECRET.fullmatch(secret)
    assert SHOWN_ONCE_NOTE in created.out
    assert created.out.count(secret) == 1
    endpoint_id = field(created, "endpoint id")
    assert re.fullmatch(r"we_[0-9a-f]{24}", endpoint_id)
    assert field(created, "organization") == "acme"
    assert field(created, "event types") == "usage.recorded, plan.changed"
    assert field(created, "enabled") == "yes"
    assert field(created, "signing secrets").endswith("(current)")

    reads = [
        await pagemeter("webhooks", "show", endpoint_id),
        await pagemeter("webhooks", "show", endpoint_id, "--json"),
        await pagemeter("webhooks", "list"),
        await pagemeter("webhooks", "list", "--json"),
    ]
    for read in reads:
        assert read.code == 0, read.err
        assert secret not in read.out + read.err
        assert "whsec_" not in read.out
        assert endpoint_id in read.out
    assert field(reads[0], "description") == "billing"


async def test_create_with_json_keeps_stdout_one_document(pagemeter: Cli) -> None:
    run = await pagemeter("webhooks", "create", URL, "--json", "--disabled")
    assert run.code == 0, run.err
    answer = run.json()
    assert answer["secret"].startswith("whsec_")
    assert answer["endpoint"]["enabled"] is False
    assert answer["endpoint"]["org_id"] == ""
    assert SHOWN_ONCE_NOTE in run.err


async def test_list_filters_by_organization_and_follows_pages(pagemeter: Cli) -> None:
    acme, _ = await create(pagemeter, "--org", "acme")
    everyone, _ = await create(pagemeter)
    globex, _ = await create(pagemeter, "--org", "globex")
    for_acme = await pagemeter("webhooks", "list", "--org", "acme", "--json")
    assert {e["endpoint_id"] for e in for_acme.json()["endpoints"]} == {acme, everyone}

    first = await pagemeter("webhooks", "list", "--page-size", "2")
    assert first.code == 0, first.err
    token = field(first, "next page token")
    rest = await pagemeter("webhooks", "list", "--page-size", "2", "--page-token", token)
    assert "next page token" not in rest.out
    every = await pagemeter("webhooks", "list", "--all", "--page-size", "1", "--json")
    assert {e["endpoint_id"] for e in every.json()["endpoints"]} == {acme, everyone, globex}
    table = await pagemeter("webhooks", "list")
    line = next(line for line in table.out.splitlines() if line.startswith(everyone))
    assert "(every organization)" in line and "(all)" in line


async def test_update_changes_only_the_fields_named(pagemeter: Cli) -> None:
    endpoint_id, _ = await create(pagemeter, "--org", "acme", "--type", "usage.recorded")
    disabled = await pagemeter("webhooks", "update", endpoint_id, "--disable")
    assert disabled.code == 0, disabled.err
    assert field(disabled, "enabled") == "no"
    assert field(disabled, "url") == URL
    assert field(disabled, "event types") == "usage.recorded"

    changed = await pagemeter(
        "webhooks",
        "update",
        endpoint_id,
        "--url",
        "http://127.0.0.1:9/new",
        "--all-types",
        "--description",
        "moved",
        "--enable",
        "--json",
    )
    assert changed.code == 0, changed.err
    endpoint = changed.json()["endpoint"]
    assert endpoint["url"] == "http://127.0.0.1:9/new"
    assert endpoint["event_types"] == []
    assert endpoint["description"] == "moved"
    assert endpoint["enabled"] is True
    assert endpoint["org_id"] == "acme"

    types = await pagemeter(
        "webhooks", "update", endpoint_id, "--type", "hold.placed", "--type", "hold.released"
    )
    assert field(types, "event types") == "hold.placed, hold.released"
    assert field(types, "description") == "moved"


async def test_delete_is_idempotent_and_a_deleted_endpoint_is_not_found(pagemeter: Cli) -> None:
    endpoint_id, _ = await create(pagemeter)
    deleted = await pagemeter("webhooks", "delete", endpoint_id)
    assert deleted.code == 0, deleted.err
    assert field(deleted, "deleted") == "yes"
    again = await pagemeter("webhooks", "delete", endpoint_id, "--json")
    assert again.json() == {"deleted": False}
    gone = await pagemeter("webhooks", "show", endpoint_id)
    assert gone.code == 1
    assert gone.err.startswith("error: NOT_FOUND")
    assert "ENDPOINT_NOT_FOUND" in gone.err


async def test_rotate_secret_shows_the_new_secret_once_and_keeps_the_old_one_signing(
    pagemeter: Cli,
) -> None:
    endpoint_id, first = await create(pagemeter)
    rotated = await pagemeter("webhooks", "rotate-secret", endpoint_id, "--overlap-hours", "2")
    assert rotated.code == 0, rotated.err
    second = field(rotated, "secret")
    assert SECRET.fullmatch(second) and second != first
    assert first not in rotated.out
    assert SHOWN_ONCE_NOTE in rotated.out
    secrets = field(rotated, "signing secrets")
    assert "(current)" in secrets and "(signs until " in secrets

    as_json = await pagemeter("webhooks", "rotate-secret", endpoint_id, "--json")
    assert as_json.code == 0, as_json.err
    current, *older = as_json.json()["endpoint"]["secrets"]
    assert "expires_at" not in current or not current["expires_at"]
    assert len(older) == 2
    assert SHOWN_ONCE_NOTE in as_json.err
    shown = await pagemeter("webhooks", "show", endpoint_id)
    assert "whsec_" not in shown.out


async def test_deliveries_and_dead_letters_list_the_log_newest_first(
    pagemeter: Cli, store: WebhookStore
) -> None:
    endpoint_id, _ = await create(pagemeter, "--org", "acme")
    empty = await pagemeter("webhooks", "deliveries", endpoint_id)
    assert empty.out.strip() == "no deliveries"
    for n, (outcome, status, error) in enumerate(
        [("failed", 503, "HTTP 503"), ("failed", 0, "timeout"), ("delivered", 204, "")]
    ):
        await store.log(
            endpoint_id,
            {
                "event_id": "acme:1767225600000-0",
                "org": "acme",
                "type": "usage.recorded",
                "at": 1_767_225_600_000 + n * 1000,
                "attempt": n + 1,
                "status": status,
                "duration_ms": 12,
                "error": error,
                "replay": 0,
                "outcome": outcome,
            },
        )
    await store.dead_letter(
        endpoint_id,
        {
            "event_id": "acme:1767225600000-1",
            "org": "acme",
            "type": "plan.changed",
            "at": 1_767_312_000_000,
            "attempts": 17,
            "error": "connection refused",
        },
    )

    log = await pagemeter("webhooks", "deliveries", endpoint_id)
    assert log.code == 0, log.err
    lines = log.out.splitlines()
    assert lines[0].split()[:4] == ["at", "event", "id", "type"]
    assert [line.split()[3] for line in lines[1:]] == ["delivered", "failed", "failed"], log.out
    assert lines[1].split()[4:6] == ["3", "204"]
    assert lines[3].rstrip().endswith("HTTP 503")

    paged = await pagemeter("webhooks", "deliveries", endpoint_id, "--page-size", "2", "--json")
    assert len(paged.json()["deliveries"]) == 2 and paged.json()["next_page_token"]
    every = await pagemeter("webhooks", "deliveries", endpoint_id, "--all", "--page-size", "1")
    assert every.out.count("acme:1767225600000-0") == 3

    dead = await pagemeter("webhooks", "dead-letters", endpoint_id)
    assert dead.code == 0, dead.err
    row = dead.out.splitlines()[1]
    assert row.split()[:4] == ["2026-01-02T00:00:00Z", "acme:1767225600000-1", "plan.changed", "17"]
    assert row.endswith("connection refused")
    as_json = await pagemeter("webhooks", "dead-letters", endpoint_id, "--json")
    assert as_json.json()["dead_letters"][0]["attempts"] == 17


async def test_replay_queues_one_event_or_a_time_range(pagemeter: Cli) -> None:
    acme_only, _ = await create(pagemeter, "--org", "acme")
    one = await pagemeter("webhooks", "replay", acme_only, "--event", "acme:1767225600000-1")
    assert one.code == 0, one.err
    assert re.fullmatch(r"rp_[0-9a-f]{16}", field(one, "replay id"))
    assert field(one, "events") == "event acme:1767225600000-1"

    span = await pagemeter(
        "webhooks",
        "replay",
        acme_only,
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-02T00:00:00+01:00",
        "--json",
    )
    assert span.code == 0, span.err
    assert span.json()["replay_id"].startswith("rp_")
    text = await pagemeter(
        "webhooks",
        "replay",
        acme_only,
        "--from",
        "2026-01-01T01:00:00+01:00",
        "--to",
        "2026-01-02T00:00:00Z",
    )
    assert field(text, "events") == "from 2026-01-01T00:00:00Z to 2026-01-02T00:00:00Z"

    everyone, _ = await create(pagemeter)
    unnamed = await pagemeter(
        "webhooks",
        "replay",
        everyone,
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-02T00:00:00Z",
    )
    assert unnamed.code == 1
    assert "INVALID_ARGUMENT" in unnamed.err and "org_id" in unnamed.err
    named = await pagemeter(
        "webhooks",
        "replay",
        everyone,
        "--org",
        "globex",
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-02T00:00:00Z",
    )
    assert named.code == 0, named.err
    assert field(named, "events").endswith("of globex")


BAD_INPUT = [
    pytest.param(
        ["create", "ftp://example.com/x"], "must start with http:// or https://", id="url"
    ),
    pytest.param(["create", URL, "--type", "usage.exploded"], "invalid choice", id="type"),
    pytest.param(["show", "we_nope"], "is not an endpoint id", id="show-id"),
    pytest.param(["delete", "42"], "is not an endpoint id", id="delete-id"),
    pytest.param(["update", "{id}"], "name something to change", id="update-nothing"),
    pytest.param(["update", "{id}", "--url", "mailto:x@example.com"], "http://", id="update-url"),
    pytest.param(
        ["update", "{id}", "--type", "hold.placed", "--all-types"], "not allowed", id="types-both"
    ),
    pytest.param(["update", "{id}", "--enable", "--disable"], "not allowed", id="enable-disable"),
    pytest.param(["rotate-secret", "{id}", "--overlap-hours", "0"], "above 0", id="overlap-0"),
    pytest.param(["rotate-secret", "{id}", "--overlap-hours", "721"], "at most 720", id="overlap"),
    pytest.param(["rotate-secret", "{id}", "--overlap-hours", "soon"], "hours", id="overlap-word"),
    pytest.param(["replay", "{id}"], "name one event", id="replay-nothing"),
    pytest.param(["replay", "{id}", "--event", "acme-1"], "is not an event id", id="event-id"),
    pytest.param(
        ["replay", "{id}", "--event", "acme:1-0", "--from", "2026-01-01T00:00:00Z"],
        "not both",
        id="event-and-range",
    ),
    pytest.param(
        ["replay", "{id}", "--from", "2026-01-01T00:00:00Z"], "--from and --to", id="no-to"
    ),
    pytest.param(
        ["replay", "{id}", "--from", "2026-01-02T00:00:00Z", "--to", "2026-01-01T00:00:00Z"],
        "must not be after",
        id="backwards",
    ),
    pytest.param(
        ["replay", "{id}", "--from", "2026-01-01", "--to", "2026-01-02T00:00:00Z"],
        "no UTC offset",
        id="naive-time",
    ),
    pytest.param(["deliveries", "{id}", "--page-size", "-1"], "whole number", id="page-size"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT)
async def test_bad_input_exits_2_and_changes_nothing(
    pagemeter: Cli, redis_client: aioredis.Redis, argv: list[str], message: str
) -> None:
    endpoint_id, _ = await create(pagemeter, "--org", "acme", "--description", "kept")
    before = await redis_client.hgetall(ENDPOINTS_KEY)
    run = await pagemeter("webhooks", *(arg.replace("{id}", endpoint_id) for arg in argv))
    assert run.code == 2, (run.out, run.err)
    assert message in run.err
    assert run.out == ""
    assert await redis_client.hgetall(ENDPOINTS_KEY) == before
    assert not await redis_client.keys("pm:{acme}:whreplays")
