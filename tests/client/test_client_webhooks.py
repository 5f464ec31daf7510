"""The SDK's WebhookService methods, on the async and the blocking client: what they
send (an update names only the fields given) and what they refuse before sending."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
import redis.asyncio as aioredis

from pagemeter_client.sdk import update_webhook_endpoint_request
from pagemeter_server.store.webhooks import ENDPOINTS_KEY, WebhookStore
from tests.client.client_flavours import Connect
from tests.conftest import RunningServer

URL = "https://hooks.example.com/pagemeter"


async def test_endpoints_are_created_listed_updated_rotated_and_deleted(
    pagemeter_server: RunningServer, connect: Connect
) -> None:
    async with connect(pagemeter_server.target) as client:
        created = await client.create_webhook_endpoint(
            URL, org_id="acme", event_types=["usage.recorded"], description="billing"
        )
        assert created.secret.startswith("whsec_")
        endpoint_id = created.endpoint.endpoint_id
        everyone = await client.create_webhook_endpoint("http://127.0.0.1:9/all")
        listed = [e.endpoint_id async for e in client.iter_webhook_endpoints(page_size=1)]
        assert sorted(listed) == sorted([endpoint_id, everyone.endpoint.endpoint_id])
        page = await client.list_webhook_endpoints("globex")
        assert [e.endpoint_id for e in page.endpoints] == [everyone.endpoint.endpoint_id]

        updated = await client.update_webhook_endpoint(endpoint_id, enabled=False)
        assert not updated.endpoint.enabled
        assert list(updated.endpoint.event_types) == ["usage.recorded"]
        assert updated.endpoint.description == "billing"
        every_type = await client.update_webhook_endpoint(endpoint_id, event_types=())
        assert list(every_type.endpoint.event_types) == []

        rotated = await client.rotate_webhook_secret(endpoint_id, overlap=timedelta(hours=1))
        current, old = rotated.endpoint.secrets
        assert old.expires_at.seconds - current.created_at.seconds in (3599, 3600)
        got = await client.get_webhook_endpoint(endpoint_id)
        assert rotated.secret not in str(got) and created.secret not in str(got)

        assert (await client.delete_webhook_endpoint(endpoint_id)).deleted
        assert not (await client.delete_webhook_endpoint(endpoint_id)).deleted
        with pytest.raises(grpc.RpcError) as missing:
            await client.get_webhook_endpoint(endpoint_id)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_deliveries_dead_letters_and_replays(
    pagemeter_server: RunningServer, connect: Connect, redis_client: aioredis.Redis
) -> None:
    store = WebhookStore(redis_client)
    async with connect(pagemeter_server.target) as client:
        endpoint_id = (
            await client.create_webhook_endpoint(URL, org_id="acme")
        ).endpoint.endpoint_id
        for n in range(3):
            await store.log(endpoint_id, {"event_id": f"acme:1-{n}", "outcome": "delivered"})
            await store.dead_letter(endpoint_id, {"event_id": f"acme:1-{n}", "attempts": 9})
        log = [d.event_id async for d in client.iter_webhook_deliveries(endpoint_id, page_size=2)]
        assert log == ["acme:1-2", "acme:1-1", "acme:1-0"]
        dead = [
            d.attempts async for d in client.iter_webhook_dead_letters(endpoint_id, page_size=2)
        ]
        assert dead == [9, 9, 9]
        one = await client.replay_webhook_events(endpoint_id, event_id="acme:1-2")
        span = await client.replay_webhook_events(
            endpoint_id,
            start_time=datetime(2026, 1, 1, tzinfo=UTC),
            end_time=datetime(2026, 1, 2, tzinfo=UTC),
        )
        assert one.replay_id.startswith("rp_") and span.replay_id != one.replay_id


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({}, id="neither"),
        pytest.param(
            {"event_id": "acme:1-0", "start_time": datetime(2026, 1, 1, tzinfo=UTC)}, id="both"
        ),
        pytest.param({"start_time": datetime(2026, 1, 1, tzinfo=UTC)}, id="no-end"),
        pytest.param(
            {"start_time": datetime(2026, 1, 1), "end_time": datetime(2026, 1, 2)}, id="naive"
        ),
    ],
)
async def test_a_replay_without_one_event_or_a_whole_range_is_refused_before_sending(
    pagemeter_server: RunningServer,
    connect: Connect,
    redis_client: aioredis.Redis,
    arguments: dict[str, object],
) -> None:
    async with connect(pagemeter_server.target) as client:
        endpoint_id = (
            await client.create_webhook_endpoint(URL, org_id="acme")
        ).endpoint.endpoint_id
        with pytest.raises(ValueError, match=r"event_id|start_time|end_time"):
            await client.replay_webhook_events(endpoint_id, **arguments)  # type: ignore[arg-type]
    assert not await redis_client.keys("pm:{acme}:whreplays")


async def test_an_update_or_rotation_that_says_nothing_is_refused_before_sending(
    pagemeter_server: RunningServer, connect: Connect, redis_client: aioredis.Redis
) -> None:
    async with connect(pagemeter_server.target) as client:
        endpoint_id = (await client.create_webhook_endpoint(URL)).endpoint.endpoint_id
        before = await redis_client.hgetall(ENDPOINTS_KEY)
        with pytest.raises(ValueError, match="at least one field"):
            await client.update_webhook_endpoint(endpoint_id)
        with pytest.raises(TypeError):
            await client.update_webhook_endpoint(endpoint_id, event_types="usage.recorded")
        with pytest.raises(ValueError, match="at least 1 second"):
            await client.rotate_webhook_secret(endpoint_id, overlap=0)
        assert await redis_client.hgetall(ENDPOINTS_KEY) == before


def test_an_update_request_names_exactly_the_fields_given() -> None:
    request = update_webhook_endpoint_request("we_x", description="", enabled=True)
    assert list(request.update_mask) == ["description", "enabled"]
    assert request.enabled and request.description == ""
