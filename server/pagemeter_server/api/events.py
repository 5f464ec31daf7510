"""gRPC handlers of EventService: the organizations' event streams, read.

The scripts write the events with the changes (store/lua/_lib.lua, emit); these
handlers only page through them. Types, data and guarantees: docs/events.md.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2

from pagemeter.v1 import events_pb2, events_pb2_grpc
from pagemeter_server.api.auth import Access, Authenticator, authorized
from pagemeter_server.domain.errors import BadPageToken
from pagemeter_server.domain.events import EVENT_TYPES, Event, cloudevent_json
from pagemeter_server.domain.page_tokens import decode_page_token, encode_page_token
from pagemeter_server.domain.periods import timestamp, timestamp_ms
from pagemeter_server.domain.validation import Violations, bad_page_token
from pagemeter_server.store.events import ENTRY_ID, EventStore

Context = grpc.aio.ServicerContext[Any, Any]

EVENTS, EVENT_ORGS, ALL_ORGS = "events", "event-orgs", "*"
DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_TYPES = len(EVENT_TYPES)
# Reads of one ListEvents call at most, when a type filter skips most events.
MAX_READS = 10


class EventService(events_pb2_grpc.EventServiceServicer):
    def __init__(self, events: EventStore, auth: Authenticator) -> None:
        self.events = events
        self.auth = auth

    @authorized(Access.READ)
    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: Context
    ) -> events_pb2.ListEventsResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        size = _page_size(request.page_size, problems)
        since_ms = 0
        if request.HasField("since") and problems.check_timestamp(request.since, "since"):
            since_ms = timestamp_ms(request.since)
        if len(request.types) > MAX_TYPES:
            problems.add("types", f"at most {MAX_TYPES} types")
        for kind in request.types:
            if kind not in EVENT_TYPES:
                problems.add("types", f"unknown event type {kind[:64]!r} (docs/events.md)")
        problems.raise_if_any()
        position = _position(request.page_token, request.org_id)
        wanted = frozenset(request.types)
        response = events_pb2.ListEventsResponse()
        # Events of other types still move the position: read on until the page
        # fills or the stream ends (a few reads at most).
        for _ in range(MAX_READS):
            read = await self.events.read(
                request.org_id, after=position, since_ms=since_ms, count=size
            )
            # More follow when the read was full, or when the page filled up
            # before the end of what was read.
            response.more = len(read) == size
            for index, event in enumerate(read):
                position = event.entry_id
                if not wanted or event.type in wanted:
                    response.events.append(_event(event))
                    if len(response.events) == size:
                        response.more = response.more or index < len(read) - 1
                        break
            if len(response.events) == size or not response.more:
                break
        if position:
            response.next_page_token = encode_page_token(EVENTS, request.org_id, position)
        return response

    @authorized(Access.WRITE)
    async def ListEventOrganizations(
        self, request: events_pb2.ListEventOrganizationsRequest, context: Context
    ) -> events_pb2.ListEventOrganizationsResponse:
        problems = Violations()
        size = _page_size(request.page_size, problems)
        since_ms = 0
        if request.HasField("since") and problems.check_timestamp(request.since, "since"):
            since_ms = timestamp_ms(request.since)
        problems.raise_if_any()
        after = ""
        if request.page_token:
            try:
                after = decode_page_token(request.page_token, EVENT_ORGS, ALL_ORGS)
            except BadPageToken:
                raise bad_page_token() from None
        noted = await self.events.noted_orgs(since_ms=since_ms)
        orgs = sorted(org for org, _ in noted if org > after)
        page = orgs[:size]
        response = events_pb2.ListEventOrganizationsResponse(org_ids=page)
        if len(orgs) > size:
            response.next_page_token = encode_page_token(EVENT_ORGS, ALL_ORGS, page[-1])
        return response


def _page_size(page_size: int, problems: Violations) -> int:
    if not 0 <= page_size <= MAX_PAGE:
        problems.add("page_size", f"page_size must be between 1 and {MAX_PAGE}")
    return page_size or DEFAULT_PAGE


def _position(token: str, org_id: str) -> str:
    """The stream entry id a page token carries ('' for none)."""
    if not token:
        return ""
    try:
        position = decode_page_token(token, EVENTS, org_id)
    except BadPageToken:
        raise bad_page_token() from None
    if not ENTRY_ID.fullmatch(position) or "-" not in position:
        raise bad_page_token()
    return position


def _event(event: Event) -> events_pb2.Event:
    data = struct_pb2.Struct()
    data.update(event.data)
    return events_pb2.Event(
        id=event.id,
        org_id=event.org_id,
        sequence=event.seq,
        type=event.type,
        time=timestamp(event.time_ms),
        data=data,
        cloudevent=cloudevent_json(event).decode(),
    )
