"""WebhookService over a real channel: endpoints, secrets, rotation, pages, replays,
and who may call it (delivery itself: tests/system/test_webhook_delivery.py)."""

from __future__ import annotations

import time

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from standardwebhooks import Webhook

from pagemeter.v1 import webhooks_pb2, webhooks_pb2_grpc
from pagemeter_server.domain.events import Event
from pagemeter_server.domain.webhooks import (
    Endpoint,
    SigningSecret,
    signature_headers,
)
from pagemeter_server.store.webhooks import ENDPOINTS_KEY, DeliveryKeys
from tests.conftest import RunningServer

W = webhooks_pb2


def stub(server: RunningServer) -> webhooks_pb2_grpc.WebhookServiceAsyncStub:
    return webhooks_pb2_grpc.WebhookServiceStub(server.channel)


async def test_an_endpoint_is_created_read_listed_updated_and_deleted(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """The secret is in the creation answer only; reads show its id, never its value."""
    webhooks = stub(pagemeter_server)
    created = await webhooks.CreateWebhookEndpoint(
        W.CreateWebhookEndpointRequest(
            org_id="acme",
            url="https://hooks.example.com/pm",
            event_types=["usage.recorded", "plan.changed"],
            description="billing",
        )
    )
    assert created.secret.startswith("whsec_")
    endpoint = created.endpoint
    assert endpoint.endpoint_id.startswith("we_")
    assert endpoint.enabled
    assert len(endpoint.secrets) == 1
    got = await webhooks.GetWebhookEndpoint(
        W.GetWebhookEndpointRequest(endpoint_id=endpoint.endpoint_id)
    )
    assert got.endpoint == endpoint
    assert created.secret not in str(got)
    updated = await webhooks.UpdateWebhookEndpoint(
        W.UpdateWebhookEndpointRequest(
            endpoint_id=endpoint.endpoint_id, enabled=False, update_mask=["enabled"]
        )
    )
    assert not updated.endpoint.enabled
    assert updated.endpoint.url == endpoint.url
    assert list(updated.endpoint.event_types) == ["usage.recorded", "plan.changed"]
    everyone = await webhooks.CreateWebhookEndpoint(
        W.CreateWebhookEndpointRequest(url="http://127.0.0.1:9/all")
    )
    other = await webhooks.CreateWebhookEndpoint(
        W.CreateWebhookEndpointRequest(org_id="globex", url="http://127.0.0.1:9/globex")
    )
    for_acme = await webhooks.ListWebhookEndpoints(W.ListWebhookEndpointsRequest(org_id="acme"))
    assert {e.endpoint_id for e in for_acme.endpoints} == {
        endpoint.endpoint_id,
        everyone.endpoint.endpoint_id,
    }
    first = await webhooks.ListWebhookEndpoints(W.ListWebhookEndpointsRequest(page_size=2))
    rest = await webhooks.ListWebhookEndpoints(
        W.ListWebhookEndpointsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert len(first.endpoints) == 2
    assert not rest.next_page_token
    assert {e.endpoint_id for e in [*first.endpoints, *rest.endpoints]} == {
        endpoint.endpoint_id,
        everyone.endpoint.endpoint_id,
        other.endpoint.endpoint_id,
    }
    deleted = await webhooks.DeleteWebhookEndpoint(
        W.DeleteWebhookEndpointRequest(endpoint_id=endpoint.endpoint_id)
    )
    again = await webhooks.DeleteWebhookEndpoint(
        W.DeleteWebhookEndpointRequest(endpoint_id=endpoint.endpoint_id)
    )
    assert deleted.deleted
    assert not again.deleted
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await webhooks.GetWebhookEndpoint(
            W.GetWebhookEndpointRequest(endpoint_id=endpoint.endpoint_id)
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert redis_sync.hlen(ENDPOINTS_KEY) == 2


async def test_rotation_keeps_the_old_secret_for_the_overlap(
    pagemeter_server: RunningServer,
) -> None:
    """Two secrets after a rotation, the old one with its expiry; a second rotation
    within the overlap keeps both older ones until theirs."""
    webhooks = stub(pagemeter_server)
    created = await webhooks.CreateWebhookEndpoint(
        W.CreateWebhookEndpointRequest(url="https://hooks.example.com/pm")
    )
    rotated = await webhooks.RotateWebhookSecret(
        W.RotateWebhookSecretRequest(endpoint_id=created.endpoint.endpoint_id, overlap_seconds=60)
    )
    assert rotated.secret != created.secret
    current, old = rotated.endpoint.secrets
    assert not current.HasField("expires_at")
    assert old.secret_id == created.endpoint.secrets[0].secret_id
    assert old.expires_at.seconds - current.created_at.seconds in (59, 60)


def test_signatures_carry_every_secret_in_use_and_verify_with_each() -> None:
    """signature_headers: one v1 signature per secret, each verified by standardwebhooks."""
    secrets = ["whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_" + "QUFBQUFBQUFBQUFBQUFBQQ=="]
    endpoint = Endpoint(
        "we_" + "1" * 24,
        "",
        "https://x.example",
        (),
        "",
        True,
        1,
        1,
        1,
        (SigningSecret(secrets[0], 1), SigningSecret(secrets[1], 1, 10**15)),
    )
    event = Event("acme", "1-0", 1, "plan.changed", 1, {})
    body = b'{"id":"acme:1-0"}'
    headers = signature_headers(event.id, body, endpoint.signing_secrets(2), int(time.time()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in secrets:
        Webhook(secret).verify(body, headers)
    assert endpoint.signing_secrets(10**15 + 1) == [secrets[0]]


async def test_a_replay_is_queued_for_the_dispatchers(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """ReplayWebhookEvents writes the replay under the organization's hash tag and notes
    the organization; an endpoint for every organization needs the org named."""
    webhooks = stub(pagemeter_server)
    created = await webhooks.CreateWebhookEndpoint(
        W.CreateWebhookEndpointRequest(url="https://hooks.example.com/pm")
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await webhooks.ReplayWebhookEvents(
            W.ReplayWebhookEventsRequest(
                endpoint_id=created.endpoint.endpoint_id,
                start_time=Timestamp(seconds=1),
                end_time=Timestamp(seconds=2),
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    replay = await webhooks.ReplayWebhookEvents(
        W.ReplayWebhookEventsRequest(
            endpoint_id=created.endpoint.endpoint_id, event_id="acme:1700000000000-3"
        )
    )
    assert replay.replay_id.startswith("rp_")
    assert redis_sync.hexists(DeliveryKeys("acme").replays, replay.replay_id)
    assert redis_sync.zscore("pm:event-orgs", "acme") is not None
