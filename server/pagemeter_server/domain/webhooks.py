"""Webhook endpoints, their signing secrets, and the Standard Webhooks signature.

An endpoint receives the events of one organization (or of all of them) whose
types it asks for. Deliveries are signed per the Standard Webhooks
specification: `webhook-id` (the event's id, the same on every attempt and
replay), `webhook-timestamp` (seconds) and `webhook-signature` (`v1,<base64>`
per secret in use, space-separated: two during a rotation's overlap).
docs/webhooks.md describes what a receiver sees.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks import Webhook

from pagemeter_server.domain.events import EVENT_TYPES
from pagemeter_server.domain.validation import ORG_ID, Violations

ENDPOINT_ID = re.compile(r"we_[0-9a-f]{24}")
# Replays and their ids ("rp_" and 16 hex digits).
REPLAY_ID = re.compile(r"rp_[0-9a-f]{16}")
MAX_URL = 2048
MAX_DESCRIPTION = 256
MAX_ENDPOINTS = 1000
"""Endpoints of the whole deployment (every organization's and the global ones)."""
MAX_OVERLAP_SECONDS = 30 * 86_400
SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
SECRET_BYTES = 32
# Standard Webhooks: the body is JSON; here a CloudEvent in structured mode.
CONTENT_TYPE = "application/cloudevents+json"
# A stream entry id's largest sequence part: "<ms>-<this>" is the last id of a ms.
_LAST_SEQ = 18_446_744_073_709_551_615
_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})")


def new_endpoint_id() -> str:
    return "we_" + secrets.token_hex(12)


def new_replay_id() -> str:
    return "rp_" + secrets.token_hex(8)


def new_secret() -> str:
    """A Standard Webhooks signing secret: "whsec_" and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_id(secret: str) -> str:
    """A short public name of a secret (its digest's first 12 hex digits)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SigningSecret:
    secret: str
    created_ms: int
    # 0 for the current secret; when an older one stops signing.
    expires_ms: int = 0


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    org_id: str  # "" for every organization
    url: str
    event_types: tuple[str, ...]  # () for every type
    description: str
    enabled: bool
    created_ms: int
    updated_ms: int
    # The stream time (Redis's clock, ms) from which it receives events: its
    # creation. Earlier events reach it only by a replay.
    start_ms: int
    secrets: tuple[SigningSecret, ...] = field(default=())

    def receives_org(self, org_id: str) -> bool:
        return not self.org_id or self.org_id == org_id

    def receives(self, event_type: str) -> bool:
        return not self.event_types or event_type in self.event_types

    def signing_secrets(self, now_ms: int) -> list[str]:
        """The secrets to sign with now: the current one and those still in overlap."""
        return [s.secret for s in self.secrets if not s.expires_ms or s.expires_ms > now_ms]

    def rotated(self, secret: str, now_ms: int, overlap_ms: int) -> Endpoint:
        """With `secret` as the current secret; the current one signs for overlap_ms more,
        older ones keep their expiry; expired ones are dropped."""
        kept = [
            SigningSecret(s.secret, s.created_ms, s.expires_ms or now_ms + overlap_ms)
            for s in self.secrets
            if not s.expires_ms or s.expires_ms > now_ms
        ]
        kept = [s for s in kept if s.expires_ms > now_ms]
        return replace(self, secrets=(SigningSecret(secret, now_ms), *kept[:4]), updated_ms=now_ms)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.endpoint_id,
                "org": self.org_id,
                "url": self.url,
                "types": list(self.event_types),
                "description": self.description,
                "enabled": self.enabled,
                "created_ms": self.created_ms,
                "updated_ms": self.updated_ms,
                "start_ms": self.start_ms,
                "secrets": [[s.secret, s.created_ms, s.expires_ms] for s in self.secrets],
            },
            separators=(",", ":"),
        )


def endpoint_from_json(text: str) -> Endpoint:
    raw: dict[str, Any] = json.loads(text)
    return Endpoint(
        endpoint_id=raw["id"],
        org_id=raw["org"],
        url=raw["url"],
        event_types=tuple(raw["types"]),
        description=raw["description"],
        enabled=bool(raw["enabled"]),
        created_ms=int(raw["created_ms"]),
        updated_ms=int(raw["updated_ms"]),
        start_ms=int(raw["start_ms"]),
        secrets=tuple(SigningSecret(s[0], int(s[1]), int(s[2])) for s in raw["secrets"]),
    )


def check_endpoint_fields(
    problems: Violations,
    *,
    org_id: str | None = None,
    url: str | None = None,
    event_types: list[str] | None = None,
    description: str | None = None,
) -> None:
    """Add a violation for each field given that is malformed."""
    if org_id:
        problems.check_org_id(org_id)
    if url is not None:
        problem = url_problem(url)
        if problem:
            problems.add("url", problem)
    if event_types is not None:
        if len(event_types) > len(EVENT_TYPES):
            problems.add("event_types", f"at most {len(EVENT_TYPES)} event types")
        for index, kind in enumerate(event_types):
            if kind not in EVENT_TYPES:
                problems.add(
                    f"event_types[{index}]",
                    f"unknown event type {kind[:40]!r}; known: {', '.join(EVENT_TYPES)}",
                )
        if len(set(event_types)) != len(event_types):
            problems.add("event_types", "an event type is named twice")
    if description is not None:
        problems.check_length(description, "description", MAX_DESCRIPTION)


def url_problem(url: str) -> str:
    """What is wrong with an endpoint URL ('' when nothing is)."""
    if not url:
        return "url is required (http:// or https://)"
    if len(url) > MAX_URL:
        return f"url must be at most {MAX_URL} characters"
    if not url.isascii() or any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in url):
        return "url must be ASCII without spaces or control characters (percent-encode the rest)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "url is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "url must start with http:// or https://"
    if not parts.hostname:
        return "url must name a host"
    if port == 0:
        return "url must not name port 0"
    if parts.fragment:
        return "url must not have a #fragment"
    return ""


def is_org_id(value: str) -> bool:
    return bool(ORG_ID.fullmatch(value))


# -- stream entry ids ----------------------------------------------------------------


def parse_entry_id(entry_id: str) -> tuple[int, int] | None:
    found = _ENTRY_ID.fullmatch(entry_id)
    if found is None:
        return None
    ms, seq = int(found.group(1)), int(found.group(2))
    if ms > _LAST_SEQ or seq > _LAST_SEQ:
        return None
    return ms, seq


def entry_before(entry_id: str) -> str:
    """The entry id just before `entry_id` (an exclusive cursor that reads it next)."""
    parsed = parse_entry_id(entry_id)
    assert parsed is not None, entry_id
    ms, seq = parsed
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_LAST_SEQ}" if ms > 0 else "0-0"


def last_entry_of(ms: int) -> str:
    """The last possible entry id of millisecond `ms`."""
    return f"{ms}-{_LAST_SEQ}"


def entry_le(entry_id: str, bound: str) -> bool:
    """Whether stream entry `entry_id` is at or before `bound`."""
    left, right = parse_entry_id(entry_id), parse_entry_id(bound)
    assert left is not None, entry_id
    assert right is not None, bound
    return left <= right


def parse_event_id(event_id: str) -> tuple[str, str] | None:
    """(org_id, entry id) of an event id "<org_id>:<entry id>"; None if malformed."""
    org_id, sep, entry_id = event_id.rpartition(":")
    if not sep or not is_org_id(org_id) or parse_entry_id(entry_id) is None:
        return None
    return org_id, entry_id


# -- signing ---------------------------------------------------------------------------


def signature_headers(
    webhook_id: str, body: bytes, secrets_in_use: list[str], now_s: int
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one v1 signature per secret."""
    moment = datetime.fromtimestamp(now_s, tz=UTC)
    payload = body.decode()
    signatures = [Webhook(s).sign(webhook_id, moment, payload) for s in secrets_in_use]
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(now_s),
        "webhook-signature": " ".join(signatures),
        "content-type": CONTENT_TYPE,
    }
