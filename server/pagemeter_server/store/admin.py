"""The store side of operator work: tenant API keys, usage corrections, audit trail.

Every change runs in a Lua script that writes the organization's audit trail in
the same atomic step; reads are plain pipelined commands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, cast

from pagemeter_server.domain.errors import BadPageToken, LimitReached, PlanMissing, RequestIdReused
from pagemeter_server.domain.page_tokens import decode_page_token, encode_page_token
from pagemeter_server.domain.periods import Month, calendar
from pagemeter_server.domain.validation import invalid
from pagemeter_server.store.keys import OrgKeys, fingerprint
from pagemeter_server.store.quota import Store
from pagemeter_server.store.scripts import PreparedCall


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    org_id: str
    name: str
    created_ms: int
    last_used_ms: int
    revoked: bool
    revoked_ms: int


@dataclass(frozen=True)
class Adjustment:
    period_id: str
    before: int
    after: int
    duplicate: bool


@dataclass(frozen=True)
class AuditEntry:
    event_id: str
    fields: dict[str, str]


KeyCheck = Literal["ok", "invalid", "revoked", "rate_limited"]


class AdminStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = store.client

    # -- API keys ----------------------------------------------------------------

    async def create_key(
        self, org_id: str, key_id: str, digest: str, name: str, *, now_ms: int, actor: str
    ) -> bool:
        """Store a key's digest; False when key_id is already taken (nothing changed).

        Raises LimitReached when the organization has MAX_KEYS_PER_ORG keys.
        """
        keys = OrgKeys(org_id)
        reply = await self.store.run(
            "key_create",
            [keys.api_key(key_id), keys.api_keys, keys.audit],
            [now_ms, key_id, digest, name, actor, self.store.audit_max_events, MAX_KEYS_PER_ORG],
        )
        if reply[0] == "TOO_MANY":
            raise LimitReached(
                f"organization {org_id!r} has {MAX_KEYS_PER_ORG} API keys, revoked ones "
                "included: the most it may have",
                "TOO_MANY_API_KEYS",
            )
        return bool(reply[0] == "OK")

    async def revoke_key(self, org_id: str, key_id: str, *, now_ms: int, actor: str) -> bool | None:
        """Revoke a key: None when unknown, else whether it had been revoked already."""
        keys = OrgKeys(org_id)
        reply = await self.store.run(
            "key_revoke",
            [keys.api_key(key_id), keys.audit],
            [now_ms, key_id, actor, self.store.audit_max_events],
        )
        if reply[0] == "NOT_FOUND":
            return None
        return bool(reply[1] == "1")

    async def get_key(self, org_id: str, key_id: str) -> StoredKey | None:
        raw = cast(dict[str, str], await self.client.hgetall(OrgKeys(org_id).api_key(key_id)))
        return _stored_key(org_id, key_id, raw) if raw else None

    async def list_keys(self, org_id: str) -> list[StoredKey]:
        keys = OrgKeys(org_id)
        key_ids = cast(list[str], await self.client.zrevrange(keys.api_keys, 0, -1))
        async with self.client.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(keys.api_key(key_id))
            rows = cast(list[dict[str, str]], await pipe.execute())
        return [
            _stored_key(org_id, key_id, raw)
            for key_id, raw in zip(key_ids, rows, strict=True)
            if raw
        ]

    async def check_key(
        self,
        org_id: str,
        key_id: str,
        digest: str,
        *,
        now_ms: int,
        rate: float,
        burst: int,
        touch_ms: int = 60_000,
    ) -> tuple[KeyCheck, int]:
        """Authenticate a tenant key and count the call against its flood limit."""
        keys = OrgKeys(org_id)
        reply = await self.store.run(
            "key_auth",
            [keys.api_key(key_id), keys.key_rate(key_id)],
            [now_ms, digest, touch_ms, repr(float(rate)), burst],
        )
        outcome = cast(KeyCheck, str(reply[0]).lower())
        retry_after_ms = int(reply[1]) if outcome == "rate_limited" else 0
        return outcome, retry_after_ms

    # -- usage corrections -------------------------------------------------------

    async def adjust_usage(
        self,
        org_id: str,
        metric: str,
        units: int,
        *,
        year_month: tuple[int, int] | None,
        reason: str,
        adjustment_id: str,
        now_ms: int,
        actor: str,
    ) -> Adjustment:
        keys = OrgKeys(org_id)
        payload_fp = fingerprint("adjust", metric, units, year_month, reason)

        def prepare(tz: str) -> PreparedCall:
            billing = calendar(tz)
            month: Month = (
                billing.period_at(now_ms)
                if year_month is None
                else billing.period_starting_in(*year_month)
            )
            if month.start_ms > now_ms:
                raise invalid(
                    "month", f"month {month.period_id} has not begun; correct a past month"
                )
            if month.end_ms + self.store.usage_retention_ms <= now_ms:
                raise invalid(
                    "month",
                    f"month {month.period_id} is past the usage retention; its counters are gone",
                )
            return PreparedCall(
                [
                    keys.plan,
                    keys.month(month.period_id),
                    keys.lifetime,
                    keys.adjustment(adjustment_id),
                    keys.audit,
                    keys.planlog,
                    keys.planver,
                    keys.events,
                    keys.evstate,
                ],
                [
                    now_ms,
                    tz,
                    self.store.default_timezone,
                    metric,
                    units,
                    payload_fp,
                    self.store.usage_retention_ms,
                    month.period_id,
                    month.end_ms + self.store.usage_retention_ms,
                    actor,
                    reason,
                    self.store.audit_max_events,
                    # The month's terms: the plan version in effect at its end.
                    min(month.end_ms, now_ms + 1),
                    self.store.event_spec(),
                    "1" if month.start_ms <= now_ms < month.end_ms else "0",
                ],
                month,
                tz,
            )

        reply, _ = await self.store.call_in_timezone(org_id, "adjust", prepare)
        if reply[0] == "NO_PLAN":
            raise PlanMissing("the organization has no plan")
        if reply[0] == "UNKNOWN_METRIC":
            raise PlanMissing(f"metric {metric!r} is not in the organization's plan")
        if reply[0] == "REUSED":
            raise RequestIdReused("adjusted")
        _, period_id, before, after, duplicate = reply
        return Adjustment(str(period_id), int(before), int(after), duplicate == "1")

    # -- audit trail ---------------------------------------------------------------

    async def audit_page(
        self, org_id: str, page_size: int, page_token: str
    ) -> tuple[list[AuditEntry], str]:
        """Newest first; the token carries the last event id shown (BadPageToken otherwise)."""
        top = "+"
        if page_token:
            position = _stream_position(decode_page_token(page_token, AUDIT, org_id))
            if position == (0, 0):
                return [], ""  # nothing comes before the first possible entry
            top = f"({position[0]}-{position[1]}"
        rows = cast(
            list[tuple[str, dict[str, str]]],
            await self.client.xrevrange(OrgKeys(org_id).audit, top, "-", count=page_size + 1),
        )
        entries = [AuditEntry(event_id, fields) for event_id, fields in rows[:page_size]]
        next_token = self.audit_token(org_id, entries[-1].event_id) if len(rows) > page_size else ""
        return entries, next_token

    @staticmethod
    def audit_token(org_id: str, event_id: str) -> str:
        """The token of the audit page after event_id."""
        return encode_page_token(AUDIT, org_id, event_id)


AUDIT = "audit"
# API keys per organization, revoked ones included: ListApiKeys lists them all
# in one answer, which must fit the message size limit (about 300 bytes a key).
MAX_KEYS_PER_ORG = 1000
_UINT64_MAX = 2**64 - 1


def _stream_position(token: str) -> tuple[int, int]:
    """A page token is the last event id shown: "<ms>-<seq>", unsigned 64-bit each."""
    first, sep, second = token.partition("-")
    parts = (first, second)
    if not sep or len(token) > 41 or not all(p.isascii() and p.isdigit() for p in parts):
        raise BadPageToken(token)
    ms, seq = int(first), int(second)
    if ms > _UINT64_MAX or seq > _UINT64_MAX:
        raise BadPageToken(token)
    return ms, seq


def _stored_key(org_id: str, key_id: str, raw: dict[str, str]) -> StoredKey:
    return StoredKey(
        key_id=key_id,
        org_id=org_id,
        name=raw.get("name", ""),
        created_ms=int(raw.get("created_ms", "0")),
        last_used_ms=int(raw.get("last_used_ms", "0")),
        revoked=raw.get("revoked") == "1",
        revoked_ms=int(raw.get("revoked_ms", "0")),
    )


def audit_json(text: str) -> str:
    """Audit before/after values are JSON written by the scripts; pass them on as is."""
    return text if not text else json.dumps(json.loads(text), sort_keys=True)
