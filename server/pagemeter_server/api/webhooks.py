"""gRPC handlers of WebhookService: endpoints, secrets, delivery log, replays.

Admin credentials only. Delivery is the dispatchers' (dispatch/, docs/webhooks.md);
this service only writes what they read: the endpoints and replay requests.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc

from pagemeter.v1 import webhooks_pb2, webhooks_pb2_grpc
from pagemeter_server.api.auth import Access, Authenticator, authorized
from pagemeter_server.domain.clock import Clock
from pagemeter_server.domain.errors import BadPageToken, LimitReached, NotFound
from pagemeter_server.domain.page_tokens import decode_page_token, encode_page_token
from pagemeter_server.domain.periods import timestamp, timestamp_ms
from pagemeter_server.domain.validation import (
    Violations,
    bad_page_token,
    invalid,
    page_request,
)
from pagemeter_server.domain.webhooks import (
    ENDPOINT_ID,
    MAX_ENDPOINTS,
    MAX_OVERLAP_SECONDS,
    Endpoint,
    SigningSecret,
    check_endpoint_fields,
    endpoint_from_json,
    entry_before,
    last_entry_of,
    new_endpoint_id,
    new_replay_id,
    new_secret,
    parse_entry_id,
    parse_event_id,
    secret_id,
)
from pagemeter_server.settings import Settings
from pagemeter_server.store.events import note_event_orgs
from pagemeter_server.store.webhooks import (
    MAX_REPLAYS_PER_ORG,
    EndpointConflict,
    LogEntry,
    Replay,
    WebhookStore,
)

Context = grpc.aio.ServicerContext[Any, Any]

ENDPOINTS_LIST = "webhook-endpoints"
DELIVERIES_LIST = "webhook-deliveries"
DEAD_LETTERS_LIST = "webhook-dead-letters"
ALL = "*"
UPDATABLE = ("url", "event_types", "description", "enabled")
DAY_MS = 86_400_000


def endpoint_message(endpoint: Endpoint) -> webhooks_pb2.WebhookEndpoint:
    message = webhooks_pb2.WebhookEndpoint(
        endpoint_id=endpoint.endpoint_id,
        org_id=endpoint.org_id,
        url=endpoint.url,
        event_types=list(endpoint.event_types),
        description=endpoint.description,
        enabled=endpoint.enabled,
        created_at=timestamp(endpoint.created_ms),
        updated_at=timestamp(endpoint.updated_ms),
    )
    for secret in endpoint.secrets:
        info = message.secrets.add(
            secret_id=secret_id(secret.secret), created_at=timestamp(secret.created_ms)
        )
        if secret.expires_ms:
            info.expires_at.CopyFrom(timestamp(secret.expires_ms))
    return message


def _int(fields: dict[str, str], name: str) -> int:
    try:
        return int(fields.get(name, "0"))
    except ValueError:
        return 0


def delivery_message(entry: LogEntry) -> webhooks_pb2.WebhookDelivery:
    f = entry.fields
    return webhooks_pb2.WebhookDelivery(
        event_id=f.get("event_id", ""),
        org_id=f.get("org", ""),
        event_type=f.get("type", ""),
        at=timestamp(_int(f, "at")),
        outcome=f.get("outcome", ""),
        attempt=_int(f, "attempt"),
        http_status=_int(f, "status"),
        duration_ms=_int(f, "duration_ms"),
        error=f.get("error", ""),
        replay=f.get("replay") == "1",
    )


def dead_letter_message(entry: LogEntry) -> webhooks_pb2.WebhookDeadLetter:
    f = entry.fields
    return webhooks_pb2.WebhookDeadLetter(
        event_id=f.get("event_id", ""),
        org_id=f.get("org", ""),
        event_type=f.get("type", ""),
        at=timestamp(_int(f, "at")),
        attempts=_int(f, "attempts"),
        last_error=f.get("error", ""),
    )


def check_endpoint_id(problems: Violations, endpoint_id: str) -> None:
    if not ENDPOINT_ID.fullmatch(endpoint_id):
        problems.add(
            "endpoint_id", "endpoint_id must be an id CreateWebhookEndpoint returned (we_...)"
        )


class WebhookService(webhooks_pb2_grpc.WebhookServiceServicer):
    def __init__(
        self, store: WebhookStore, settings: Settings, clock: Clock, auth: Authenticator
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.auth = auth

    async def _endpoint(self, endpoint_id: str) -> tuple[str, Endpoint]:
        raw = await self.store.get_raw(endpoint_id)
        if raw is None:
            raise NotFound(f"there is no webhook endpoint {endpoint_id!r}", "ENDPOINT_NOT_FOUND")
        return raw, endpoint_from_json(raw)

    @authorized(Access.ADMIN)
    async def CreateWebhookEndpoint(
        self, request: webhooks_pb2.CreateWebhookEndpointRequest, context: Context
    ) -> webhooks_pb2.CreateWebhookEndpointResponse:
        problems = Violations()
        check_endpoint_fields(
            problems,
            org_id=request.org_id,
            url=request.url,
            event_types=list(request.event_types),
            description=request.description,
        )
        problems.raise_if_any()
        now_ms = self.clock.now_ms()
        # Events from now on, on the stream's clock (Redis's): earlier ones only by a replay.
        start_ms = await self.store.redis_time_ms()
        secret = new_secret()
        while True:
            endpoint = Endpoint(
                endpoint_id=new_endpoint_id(),
                org_id=request.org_id,
                url=request.url,
                event_types=tuple(request.event_types),
                description=request.description,
                enabled=not request.disabled,
                created_ms=now_ms,
                updated_ms=now_ms,
                start_ms=start_ms,
                secrets=(SigningSecret(secret, now_ms),),
            )
            outcome = await self.store.create(endpoint)
            if outcome == "TOO_MANY":
                raise LimitReached(
                    f"there are {MAX_ENDPOINTS} webhook endpoints: the most pagemeter keeps",
                    "TOO_MANY_WEBHOOK_ENDPOINTS",
                )
            if outcome == "OK":
                break
        return webhooks_pb2.CreateWebhookEndpointResponse(
            endpoint=endpoint_message(endpoint), secret=secret
        )

    @authorized(Access.ADMIN)
    async def GetWebhookEndpoint(
        self, request: webhooks_pb2.GetWebhookEndpointRequest, context: Context
    ) -> webhooks_pb2.GetWebhookEndpointResponse:
        problems = Violations()
        check_endpoint_id(problems, request.endpoint_id)
        problems.raise_if_any()
        _, endpoint = await self._endpoint(request.endpoint_id)
        return webhooks_pb2.GetWebhookEndpointResponse(endpoint=endpoint_message(endpoint))

    @authorized(Access.ADMIN)
    async def ListWebhookEndpoints(
        self, request: webhooks_pb2.ListWebhookEndpointsRequest, context: Context
    ) -> webhooks_pb2.ListWebhookEndpointsResponse:
        page_size = page_request(request.org_id or None, request.page_size, request.page_token)
        scope = request.org_id or ALL
        after = ""
        if request.page_token:
            try:
                after = decode_page_token(request.page_token, ENDPOINTS_LIST, scope)
            except BadPageToken:
                raise bad_page_token() from None
        endpoints = [
            e
            for e in await self.store.all_endpoints()
            if e.endpoint_id > after and (not request.org_id or e.receives_org(request.org_id))
        ]
        page = endpoints[:page_size]
        response = webhooks_pb2.ListWebhookEndpointsResponse(
            endpoints=[endpoint_message(e) for e in page]
        )
        if len(endpoints) > page_size:
            response.next_page_token = encode_page_token(
                ENDPOINTS_LIST, scope, page[-1].endpoint_id
            )
        return response

    @authorized(Access.ADMIN)
    async def UpdateWebhookEndpoint(
        self, request: webhooks_pb2.UpdateWebhookEndpointRequest, context: Context
    ) -> webhooks_pb2.UpdateWebhookEndpointResponse:
        problems = Violations()
        check_endpoint_id(problems, request.endpoint_id)
        mask = list(request.update_mask)
        if not mask:
            problems.add("update_mask", f"name the fields to change: {', '.join(UPDATABLE)}")
        for index, path in enumerate(mask):
            if path not in UPDATABLE:
                problems.add(
                    f"update_mask[{index}]",
                    f"{path[:40]!r} cannot be changed; use {', '.join(UPDATABLE)}",
                )
        check_endpoint_fields(
            problems,
            url=request.url if "url" in mask else None,
            event_types=list(request.event_types) if "event_types" in mask else None,
            description=request.description if "description" in mask else None,
        )
        problems.raise_if_any()
        while True:
            before, endpoint = await self._endpoint(request.endpoint_id)
            changes: dict[str, Any] = {"updated_ms": self.clock.now_ms()}
            if "url" in mask:
                changes["url"] = request.url
            if "event_types" in mask:
                changes["event_types"] = tuple(request.event_types)
            if "description" in mask:
                changes["description"] = request.description
            if "enabled" in mask:
                changes["enabled"] = request.enabled
            updated = replace(endpoint, **changes)
            try:
                if not await self.store.replace(before, updated):
                    raise NotFound(
                        f"there is no webhook endpoint {request.endpoint_id!r}",
                        "ENDPOINT_NOT_FOUND",
                    )
            except EndpointConflict:
                continue
            return webhooks_pb2.UpdateWebhookEndpointResponse(endpoint=endpoint_message(updated))

    @authorized(Access.ADMIN)
    async def DeleteWebhookEndpoint(
        self, request: webhooks_pb2.DeleteWebhookEndpointRequest, context: Context
    ) -> webhooks_pb2.DeleteWebhookEndpointResponse:
        problems = Violations()
        check_endpoint_id(problems, request.endpoint_id)
        problems.raise_if_any()
        deleted = await self.store.delete(request.endpoint_id)
        return webhooks_pb2.DeleteWebhookEndpointResponse(deleted=deleted)

    @authorized(Access.ADMIN)
    async def RotateWebhookSecret(
        self, request: webhooks_pb2.RotateWebhookSecretRequest, context: Context
    ) -> webhooks_pb2.RotateWebhookSecretResponse:
        problems = Violations()
        check_endpoint_id(problems, request.endpoint_id)
        if not 0 <= request.overlap_seconds <= MAX_OVERLAP_SECONDS:
            problems.add(
                "overlap_seconds",
                f"overlap_seconds must be between 0 (the default) and {MAX_OVERLAP_SECONDS}",
            )
        problems.raise_if_any()
        overlap_ms = request.overlap_seconds * 1000 or int(
            self.settings.webhook_secret_overlap_hours * 3_600_000
        )
        secret = new_secret()
        while True:
            before, endpoint = await self._endpoint(request.endpoint_id)
            # On the store's clock, which the dispatchers' clocks follow (the rules'
            # clock may be another in tests).
            rotated = endpoint.rotated(secret, await self.store.redis_time_ms(), overlap_ms)
            try:
                if not await self.store.replace(before, rotated):
                    raise NotFound(
                        f"there is no webhook endpoint {request.endpoint_id!r}",
                        "ENDPOINT_NOT_FOUND",
                    )
            except EndpointConflict:
                continue
            return webhooks_pb2.RotateWebhookSecretResponse(
                endpoint=endpoint_message(rotated), secret=secret
            )

    async def _page(
        self, kind: str, endpoint_id: str, page_size: int, page_token: str
    ) -> tuple[int, str]:
        problems = Violations()
        check_endpoint_id(problems, endpoint_id)
        problems.raise_if_any()
        size = page_request(None, page_size, page_token)
        before = ""
        if page_token:
            try:
                before = decode_page_token(page_token, kind, endpoint_id)
            except BadPageToken:
                raise bad_page_token() from None
            if parse_entry_id(before) is None:
                raise bad_page_token()
        await self._endpoint(endpoint_id)
        return size, before

    @authorized(Access.ADMIN)
    async def ListWebhookDeliveries(
        self, request: webhooks_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> webhooks_pb2.ListWebhookDeliveriesResponse:
        size, before = await self._page(
            DELIVERIES_LIST, request.endpoint_id, request.page_size, request.page_token
        )
        entries = await self.store.deliveries(request.endpoint_id, before=before, count=size + 1)
        response = webhooks_pb2.ListWebhookDeliveriesResponse(
            deliveries=[delivery_message(e) for e in entries[:size]]
        )
        if len(entries) > size:
            response.next_page_token = encode_page_token(
                DELIVERIES_LIST, request.endpoint_id, entries[size - 1].entry_id
            )
        return response

    @authorized(Access.ADMIN)
    async def ListWebhookDeadLetters(
        self, request: webhooks_pb2.ListWebhookDeadLettersRequest, context: Context
    ) -> webhooks_pb2.ListWebhookDeadLettersResponse:
        size, before = await self._page(
            DEAD_LETTERS_LIST, request.endpoint_id, request.page_size, request.page_token
        )
        entries = await self.store.dead_letters(request.endpoint_id, before=before, count=size + 1)
        response = webhooks_pb2.ListWebhookDeadLettersResponse(
            dead_letters=[dead_letter_message(e) for e in entries[:size]]
        )
        if len(entries) > size:
            response.next_page_token = encode_page_token(
                DEAD_LETTERS_LIST, request.endpoint_id, entries[size - 1].entry_id
            )
        return response

    @authorized(Access.ADMIN)
    async def ReplayWebhookEvents(
        self, request: webhooks_pb2.ReplayWebhookEventsRequest, context: Context
    ) -> webhooks_pb2.ReplayWebhookEventsResponse:
        problems = Violations()
        check_endpoint_id(problems, request.endpoint_id)
        has_range = request.HasField("start_time") or request.HasField("end_time")
        org_id, after, until = request.org_id, "", ""
        if request.event_id:
            parsed = parse_event_id(request.event_id)
            if has_range:
                problems.add("event_id", "name one event or a time range, not both")
            if parsed is None:
                problems.add(
                    "event_id", "event_id must be an event id as in webhook-id: <org_id>:<ms>-<n>"
                )
            else:
                if org_id and org_id != parsed[0]:
                    problems.add("org_id", "org_id differs from the event_id's organization")
                org_id, entry = parsed
                after, until = entry_before(entry), entry
        else:
            if org_id:
                problems.check_org_id(org_id)
            if not (request.HasField("start_time") and request.HasField("end_time")):
                problems.add("start_time", "name an event_id, or both start_time and end_time")
            else:
                good = problems.check_timestamp(request.start_time, "start_time")
                good = problems.check_timestamp(request.end_time, "end_time") and good
                if good:
                    start_ms = timestamp_ms(request.start_time)
                    end_ms = timestamp_ms(request.end_time)
                    if start_ms > end_ms:
                        problems.add("end_time", "end_time must not be before start_time")
                    after, until = entry_before(f"{max(start_ms, 0)}-0"), last_entry_of(end_ms)
        problems.raise_if_any()
        _, endpoint = await self._endpoint(request.endpoint_id)
        if not org_id:
            org_id = endpoint.org_id
            if not org_id:
                raise invalid(
                    "org_id", "this endpoint receives every organization's events: name one"
                )
        if not endpoint.receives_org(org_id):
            raise invalid("org_id", f"endpoint {endpoint.endpoint_id} does not receive {org_id}")
        now_ms = self.clock.now_ms()
        replay = Replay(new_replay_id(), endpoint.endpoint_id, after, until, now_ms)
        ttl_ms = (self.settings.event_retention_days + 1) * DAY_MS
        if not await self.store.add_replay(org_id, replay, ttl_ms=ttl_ms):
            raise LimitReached(
                f"organization {org_id!r} has {MAX_REPLAYS_PER_ORG} replays pending: wait for "
                "them to finish",
                "TOO_MANY_REPLAYS",
            )
        # The dispatchers look at organizations noted here (as the servers note a
        # change: on this machine's clock).
        await note_event_orgs(self.store.client, [org_id])
        return webhooks_pb2.ReplayWebhookEventsResponse(replay_id=replay.replay_id)
