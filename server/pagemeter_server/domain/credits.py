"""Credit grants: prepaid units of one metric, usable from an effective time to
an optional expiry, drawn by priority then earliest expiry.

The store keeps them in one hash per organization, read and changed by the Lua
scripts (`_lib.lua`: load_credits, credit_balance, draw_credits); this module
reads the same hash for answers (balances, the list of grants). A field named
after a metric is a prepaid balance of an earlier release: credits that never
expire, shown as the grant "prepaid-<metric>", which is what
`pagemeter-server migrate-plans` turns it into.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PRIORITY = 50
MAX_PRIORITY = 100
# Grants that can still count (not drawn to zero, expired or voided) per organization.
MAX_LIVE_GRANTS = 100
GRANT_PREFIX = "g:"

PENDING, ACTIVE, EXHAUSTED, EXPIRED, VOIDED = "pending", "active", "exhausted", "expired", "voided"


# Grant ids pagemeter gives itself: "prepaid-<metric>" (a prepaid balance of an
# earlier release) and "rollover-<period id>-<metric>" (_lib.lua, rollover_grant).
LEGACY_PREFIX = "prepaid-"
ROLLOVER_PREFIX = "rollover-"


def legacy_grant_id(metric: str) -> str:
    return f"{LEGACY_PREFIX}{metric}"


def reserved_grant_prefix(grant_id: str) -> str:
    """The reserved prefix grant_id starts with ('' for none): GrantCredits refuses it."""
    for prefix in (LEGACY_PREFIX, ROLLOVER_PREFIX):
        if grant_id.startswith(prefix):
            return prefix
    return ""


@dataclass(frozen=True)
class Grant:
    grant_id: str
    metric: str
    units: int
    remaining: int
    effective_ms: int
    expires_ms: int  # 0: never
    priority: int
    voided: bool = False
    legacy: bool = False  # a balance of an earlier release, not yet migrated

    def status(self, now_ms: int) -> str:
        if self.voided:
            return VOIDED
        if self.expires_ms and now_ms >= self.expires_ms:
            return EXPIRED
        if self.remaining <= 0:
            return EXHAUSTED
        if now_ms < self.effective_ms:
            return PENDING
        return ACTIVE

    def draw_key(self) -> tuple[int, float, int, str]:
        """The order grants are drawn in (as drawn_before in _lib.lua)."""
        return (
            self.priority,
            self.expires_ms or float("inf"),
            self.effective_ms,
            "" if self.legacy else self.grant_id,
        )


def encode_grant(grant: Grant) -> str:
    """A grant's field value, as the scripts write it."""
    state = "V" if grant.voided else "A"
    return (
        f"{grant.metric}|{grant.remaining}|{grant.effective_ms}|{grant.expires_ms}|"
        f"{grant.priority}|{grant.units}|{state}"
    )


def parse_credits(raw: Mapping[str, str]) -> list[Grant]:
    """The grants of a credits hash, in draw order per metric (metrics by name)."""
    grants = []
    for field, value in raw.items():
        if field.startswith(GRANT_PREFIX):
            parts = value.split("|")
            if len(parts) != 7:
                continue
            metric, remaining, effective, expires, priority, units, state = parts
            grants.append(
                Grant(
                    grant_id=field[len(GRANT_PREFIX) :],
                    metric=metric,
                    units=int(units),
                    remaining=int(remaining),
                    effective_ms=int(effective),
                    expires_ms=int(expires),
                    priority=int(priority),
                    voided=state == "V",
                )
            )
        else:
            balance = int(value)
            grants.append(
                Grant(
                    legacy_grant_id(field),
                    field,
                    balance,
                    balance,
                    0,
                    0,
                    DEFAULT_PRIORITY,
                    legacy=True,
                )
            )
    return sorted(grants, key=lambda g: (g.metric, g.draw_key()))


def credit_balances(raw: Mapping[str, str], now_ms: int) -> dict[str, int]:
    """Per metric, the units its live grants have at now_ms (metrics with none left out)."""
    balances: dict[str, int] = {}
    for grant in parse_credits(raw):
        if grant.status(now_ms) == ACTIVE:
            balances[grant.metric] = balances.get(grant.metric, 0) + grant.remaining
    return balances
