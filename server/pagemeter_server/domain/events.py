"""Events: what the scripts append to an organization's stream, read back.

Every change of state appends its events in the same atomic script call that
makes it (store/lua/_lib.lua, emit), so an event exists exactly when its change
does. An event read back here has a stable id (the organization and the stream
entry id), the organization's sequence number, the rules' clock and the data
the script wrote; `cloudevent` gives its CloudEvents 1.0 form. docs/events.md
describes each type and its data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from google.protobuf import json_format

from pagemeter_server.domain.plans import doc_to_plan, plan_doc_from_json

# The types the scripts write, and what each means (docs/events.md).
EVENT_TYPES: dict[str, str] = {
    "usage.recorded": "a job's usage was recorded, with its split into included, "
    "prepaid and overage units per metric",
    "usage.corrected": "an operator corrected a metric's committed usage",
    "hold.placed": "CheckQuota reserved a job's units",
    "hold.released": "ReleaseQuota freed a job's hold",
    "hold.expired": "a hold ran past its expiry and stopped counting",
    "plan.changed": "the organization's plan was set",
    "credits.granted": "a credit grant was added",
    "credits.voided": "what was left of a credit grant stopped counting",
    "threshold.crossed": "a notification threshold of a metric was crossed",
    "threshold.resolved": "a crossed threshold no longer holds",
}

# CloudEvents `type` is the event type under this prefix; `source` names the org.
CLOUDEVENT_TYPE_PREFIX = "pagemeter."
CLOUDEVENT_SOURCE_PREFIX = "/pagemeter/orgs/"

# Data fields the scripts write as decimal strings (Lua's JSON encoder keeps only
# 14 digits) that are integers; fields ending in `_at` are times (ms) rendered
# as RFC 3339, with 0 meaning "never" (null).
_INTEGER_FIELDS = frozenset(
    {
        "units",
        "included",
        "prepaid",
        "overage",
        "committed",
        "balance",
        "voided_units",
        "before",
        "after",
        "version",
        "percent",
        "level",
        "limit",
        "priority",
        "amount",
        "value",
    }
)
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Event:
    """One entry of an organization's event stream."""

    org_id: str
    entry_id: str  # the stream entry id, "<ms>-<n>" on Redis's clock
    seq: int
    type: str
    time_ms: int  # the rules' clock when the change was made
    data: dict[str, Any]

    @property
    def id(self) -> str:
        """Unique across organizations and stable: the webhook-id and CloudEvents id."""
        return f"{self.org_id}:{self.entry_id}"


def event_from_entry(
    org_id: str, entry_id: str, fields: dict[str, str], data: dict[str, Any] | None = None
) -> Event:
    """An event from a stream entry's fields as the scripts wrote them: its data
    the JSON of field `data`, or `data` as the store read it from other fields."""
    raw = json.loads(fields.get("data", "{}")) if data is None else data
    data = _typed(raw) if isinstance(raw, dict) else {}
    if fields["type"] == "plan.changed" and isinstance(data.get("plan"), str):
        # The stored document (of either schema) as the Plan GetPlan answers.
        doc = plan_doc_from_json(data["plan"])
        plan = doc_to_plan(org_id, doc, int(data.get("version", 0)), int(fields["at"]))
        data["plan"] = json_format.MessageToDict(plan, preserving_proto_field_name=True)
    return Event(
        org_id=org_id,
        entry_id=entry_id,
        seq=int(fields["seq"]),
        type=fields["type"],
        time_ms=int(fields["at"]),
        data=data,
    )


def _typed(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        out[name] = _typed_value(name, value)
    return out


def _typed_value(name: str, value: Any) -> Any:
    if isinstance(value, dict):
        # Lua's JSON encoder writes an empty list as an empty object.
        return [] if not value and name == "metrics" else _typed(value)
    if isinstance(value, list):
        return [_typed_value(name, item) for item in value]
    if not isinstance(value, str) or not _INTEGER.fullmatch(value):
        return value
    if name.endswith("_at"):
        return rfc3339(int(value)) if int(value) > 0 else None
    if name in _INTEGER_FIELDS:
        return int(value)
    return value


def rfc3339(ms: int) -> str:
    """A time (ms since the epoch) as RFC 3339 in UTC, with milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def cloudevent(event: Event) -> CloudEvent:
    """The event as a CloudEvents 1.0 event.

    `sequence` is the CloudEvents sequence extension (the org's sequence number,
    as a string); `orgid` names the organization."""
    subject = event.data.get("request_id") or event.data.get("grant_id") or event.data.get("metric")
    attributes: dict[str, Any] = {
        "specversion": "1.0",
        "id": event.id,
        "source": CLOUDEVENT_SOURCE_PREFIX + event.org_id,
        "type": CLOUDEVENT_TYPE_PREFIX + event.type,
        "time": datetime.fromtimestamp(event.time_ms / 1000, tz=UTC),
        "datacontenttype": "application/json",
        "sequence": str(event.seq),
        "orgid": event.org_id,
    }
    if isinstance(subject, str) and subject:
        attributes["subject"] = subject
    return CloudEvent(attributes, dict(event.data))


_FORMAT = JSONFormat()


def cloudevent_json(event: Event) -> bytes:
    """The event in the CloudEvents JSON format (structured mode), one line."""
    return _FORMAT.write(cloudevent(event))
