"""Credit grants through the SDK (async and blocking clients) against a real server:
grant_credits with effective_at, expires_at and priority, list_credit_grants,
void_credit_grant, their errors and their retries.

The suite's clock stands at 2026-03-15 12:00 UTC (tests/conftest.py); the server's
ManualClock is moved to let grants become effective and expire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest

from pagemeter.v1 import admin_pb2
from pagemeter_client import AsyncPagemeterClient, error_details
from pagemeter_client.sdk import (
    ADMIN_SERVICE,
    NOT_RETRIED,
    credit_grant_status_name,
    grant_credits_request,
)
from tests.client.client_flavours import Connect
from tests.client.test_client_sdk import CuttingProxy
from tests.conftest import START_MS, RunningServer, eagle_plan

A = admin_pb2
NOW = datetime.fromtimestamp(START_MS / 1000, UTC)
DAY = timedelta(days=1)
DAY_MS = 86_400_000


@pytest.fixture
async def client(
    connect: Connect, pagemeter_server: RunningServer
) -> AsyncIterator[AsyncPagemeterClient]:
    """A client of the test server (async, then blocking); "acme" has Eagle Doc's plan
    (2000 pages included, then credits, then overage)."""
    async with connect(pagemeter_server.target) as sdk:
        await sdk.set_plan(eagle_plan())
        yield sdk


async def failure(call: Awaitable[object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        await call
    return refused.value


def listed(response: admin_pb2.ListCreditGrantsResponse) -> list[tuple[str, int, int, str]]:
    """(grant id, remaining, units, status) of each grant, in the answer's order."""
    return [
        (g.grant_id, g.remaining, g.units, credit_grant_status_name(g.status))
        for g in response.grants
    ]


async def prepaid_balance(client: AsyncPagemeterClient) -> int:
    usage = await client.get_usage("acme")
    return {m.metric: m.prepaid_balance for m in usage.metrics}["pages"]


async def test_grants_are_listed_in_draw_order_with_their_terms_and_statuses(
    client: AsyncPagemeterClient, pagemeter_server: RunningServer
) -> None:
    """Priority first (0 is sent, not taken for unset), then the earliest expiry,
    never-expiring last; a grant not yet effective is PENDING and not in the balance.
    Drawing and time passing move the statuses."""
    first = await client.grant_credits(
        "acme", "pages", 100, "spring", "po 7", priority=0, expires_at=NOW + 10 * DAY
    )
    assert first.balance == 100 and not first.duplicate
    await client.grant_credits("acme", "pages", 50, "goodwill")
    berlin = ZoneInfo("Europe/Berlin")
    await client.grant_credits(
        "acme", "pages", 30, "promo", expires_at=datetime(2026, 3, 20, 13, 0, tzinfo=berlin)
    )
    pending = await client.grant_credits(
        "acme", "pages", 20, "later", effective_at=NOW + DAY, priority=50
    )
    assert pending.balance == 180, "the balance usable now leaves out the pending grant"
    await client.grant_credits("acme", "documents", 5, "docs")

    grants = await client.list_credit_grants("acme")
    assert listed(grants) == [
        ("docs", 5, 5, "ACTIVE"),
        ("spring", 100, 100, "ACTIVE"),
        ("promo", 30, 30, "ACTIVE"),
        ("goodwill", 50, 50, "ACTIVE"),
        ("later", 20, 20, "PENDING"),
    ]
    by_id = {g.grant_id: g for g in grants.grants}
    assert [by_id[g].priority for g in ("spring", "promo", "goodwill", "later")] == [0, 50, 50, 50]
    assert by_id["spring"].metric == "pages" and by_id["docs"].metric == "documents"
    assert by_id["spring"].effective_at.ToDatetime(UTC) == NOW, "unset: from now"
    assert by_id["spring"].expires_at.ToDatetime(UTC) == NOW + 10 * DAY
    assert by_id["promo"].expires_at.ToJsonString() == "2026-03-20T12:00:00Z"
    assert by_id["later"].effective_at.ToDatetime(UTC) == NOW + DAY
    assert not by_id["goodwill"].HasField("expires_at"), "unset: never expires"
    only_pages = await client.list_credit_grants("acme", "pages")
    assert [g.grant_id for g in only_pages.grants] == ["spring", "promo", "goodwill", "later"]

    await client.record_usage("acme", "job-1", {"pages": 2000 + 120})
    assert listed(await client.list_credit_grants("acme", "pages"))[:2] == [
        ("spring", 0, 100, "EXHAUSTED"),
        ("promo", 10, 30, "ACTIVE"),
    ]
    pagemeter_server.clock.set(START_MS + 5 * DAY_MS)
    assert listed(await client.list_credit_grants("acme", metric="pages")) == [
        ("spring", 0, 100, "EXHAUSTED"),
        ("promo", 10, 30, "EXPIRED"),
        ("goodwill", 50, 50, "ACTIVE"),
        ("later", 20, 20, "ACTIVE"),
    ]
    assert await prepaid_balance(client) == 70


async def test_a_repeated_grant_is_a_duplicate_and_other_terms_are_refused(
    client: AsyncPagemeterClient,
) -> None:
    """The same grant_id with the same terms adds nothing; with another expiry it is
    ALREADY_EXISTS."""
    for _ in range(2):
        granted = await client.grant_credits(
            "acme", "pages", 10, "g-1", expires_at=NOW + DAY, priority=20
        )
    assert granted.duplicate and granted.balance == 10
    error = await failure(
        client.grant_credits("acme", "pages", 10, "g-1", expires_at=NOW + 2 * DAY, priority=20)
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_void_stops_a_grant_and_a_second_void_says_already_voided(
    client: AsyncPagemeterClient,
) -> None:
    """void_credit_grant answers the units that stop counting; the grant is listed
    VOIDED with nothing remaining; a repeat voids nothing and says so."""
    await client.grant_credits("acme", "pages", 40, "refund-me")
    await client.grant_credits("acme", "pages", 10, "keep", priority=90)
    await client.record_usage("acme", "job-1", {"pages": 2000 + 15})

    voided = await client.void_credit_grant("acme", "refund-me", "chargeback 12")
    assert (voided.voided_units, voided.already_voided) == (25, False)
    assert listed(await client.list_credit_grants("acme")) == [
        ("refund-me", 0, 40, "VOIDED"),
        ("keep", 10, 10, "ACTIVE"),
    ]
    assert await prepaid_balance(client) == 10

    again = await client.void_credit_grant("acme", "refund-me", "chargeback 12")
    assert (again.voided_units, again.already_voided) == (0, True)
    actions = [e.action async for e in client.iter_audit_events("acme")]
    assert actions.count("credits.void") == 1, "a repeat changes nothing and audits nothing"


async def test_voiding_an_unknown_grant_is_not_found(client: AsyncPagemeterClient) -> None:
    error = await failure(client.void_credit_grant("acme", "nope", "typo"))
    details = error_details(error)
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert "no credit grant 'nope'" in details.message
    assert [info.reason for info in details.error_infos] == ["GRANT_NOT_FOUND"]


async def test_bad_terms_are_the_servers_to_refuse(client: AsyncPagemeterClient) -> None:
    """An expiry in the past or before effective_at, a priority past 100 and a void
    without a reason are INVALID_ARGUMENT naming the field; nothing is granted."""
    cases = [
        ({"expires_at": NOW - DAY}, "expires_at"),
        ({"effective_at": NOW + 2 * DAY, "expires_at": NOW + DAY}, "expires_at"),
        ({"priority": 101}, "priority"),
        ({"priority": -1}, "priority"),
    ]
    for terms, field in cases:
        error = await failure(client.grant_credits("acme", "pages", 10, "bad", **terms))  # type: ignore[arg-type]
        details = error_details(error)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, terms
        assert [name for name, _ in details.field_violations] == [field], terms
    assert listed(await client.list_credit_grants("acme")) == []
    error = await failure(client.void_credit_grant("acme", "bad", " "))
    assert [name for name, _ in error_details(error).field_violations] == ["reason"]


async def test_naive_grant_times_are_refused_before_sending(
    client: AsyncPagemeterClient,
) -> None:
    """A grant time without a timezone raises ValueError (protobuf would read it as UTC)."""
    with pytest.raises(ValueError, match="expires_at must be timezone-aware"):
        await client.grant_credits("acme", "pages", 10, "g-1", expires_at=datetime(2026, 4, 1))
    with pytest.raises(ValueError, match="effective_at must be timezone-aware"):
        grant_credits_request("acme", "pages", 10, "g-1", effective_at=datetime(2026, 4, 1))
    assert listed(await client.list_credit_grants("acme")) == []


def test_unset_terms_are_left_unset() -> None:
    """No effective_at, expires_at or priority in the request unless given (the
    server's defaults: now, never, 50); priority 0 is sent."""
    plain = grant_credits_request("acme", "pages", 10, "g-1")
    assert not plain.HasField("effective_at") and not plain.HasField("expires_at")
    assert not plain.HasField("priority")
    first = grant_credits_request("acme", "pages", 10, "g-1", priority=0)
    assert first.HasField("priority") and first.priority == 0


async def test_too_many_live_grants_is_failed_precondition(client: AsyncPagemeterClient) -> None:
    """The 101st grant that could still count is refused with TOO_MANY_CREDIT_GRANTS;
    voiding one makes room."""
    for number in range(100):
        await client.grant_credits("acme", "pages", 1, f"g-{number}")
    error = await failure(client.grant_credits("acme", "pages", 1, "g-100"))
    details = error_details(error)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [info.reason for info in details.error_infos] == ["TOO_MANY_CREDIT_GRANTS"]
    await client.void_credit_grant("acme", "g-0", "make room")
    assert (await client.grant_credits("acme", "pages", 1, "g-100")).balance == 100


def test_the_grant_calls_are_retried() -> None:
    """Only CreateApiKey is exempt from the AdminService retry policy."""
    for method in ("GrantCredits", "VoidCreditGrant", "ListCreditGrants"):
        assert (ADMIN_SERVICE, method) not in NOT_RETRIED


async def test_lost_answers_of_void_and_list_are_retried(
    connect: Connect, pagemeter_server: RunningServer
) -> None:
    """A VoidCreditGrant whose answer is lost is retried with the same request: the
    retry finds the grant voided (already_voided), and it was voided once. A lost
    ListCreditGrants answer is simply asked again."""
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        connect(proxy.target, initial_backoff=0.05) as client,
    ):
        await client.set_plan(eagle_plan())
        await client.grant_credits("acme", "pages", 40, "g-1", expires_at=NOW + DAY)
        proxy.lose_next_answer()
        voided = await client.void_credit_grant("acme", "g-1", "refund")
        assert proxy.cuts == 1 and proxy.connections == 2, "the first answer was really lost"
        assert voided.already_voided and voided.voided_units == 0
        proxy.lose_next_answer()
        grants = await client.list_credit_grants("acme")
        assert proxy.cuts == 2
        events = [e async for e in client.iter_audit_events("acme")]
    assert listed(grants) == [("g-1", 0, 40, "VOIDED")]
    voids = [e for e in events if e.action == "credits.void"]
    assert len(voids) == 1 and voids[0].reason == "refund"
