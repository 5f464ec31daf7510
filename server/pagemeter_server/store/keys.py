"""The Redis key layout.

Every key of an organization starts with `pm:{org_id}:` so that all of them hash
to one Redis Cluster slot and each script call is atomic on one node.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date

# The organizations that have a plan: the per-organization exporter's list, so
# that it never scans the keyspace. Written after SetPlan's script (it is not
# under the org's hash tag, so it cannot be in the same script).
ORGS_KEY = "pm:orgs"

# "2" once the deployment's stored plans were migrated to the plan document of
# schema 2 (domain/plans.py, store/plan_migration.py); absent before. Servers
# write plans in schema 1 until they see it.
PLAN_SCHEMA_KEY = "pm:plan-schema"


# Organizations with events lately (org -> last event, ms): the webhook
# dispatchers' list of streams to read. Written by the servers after the scripts
# (it is not under the org's hash tag); a dispatcher also finds streams by SCAN.
EVENT_ORGS_KEY = "pm:event-orgs"


class OrgKeys:
    """The keys of one organization, all under its `{org_id}` hash tag."""

    def __init__(self, org_id: str) -> None:
        self.prefix = f"pm:{{{org_id}}}:"
        self.plan = self.prefix + "plan"
        self.holds = self.prefix + "holds"
        self.holddata = self.prefix + "holddata"
        self.held = self.prefix + "held"
        self.credits = self.prefix + "credits"
        self.lifetime = self.prefix + "u:lifetime"
        self.rate = self.prefix + "rate"
        self.records_index = self.prefix + "recs"
        self.planlog = self.prefix + "planlog"
        self.planver = self.prefix + "planver"
        self.audit = self.prefix + "audit"
        self.api_keys = self.prefix + "keys"
        self.unplanned = self.prefix + "unplanned"
        self.doctypes = self.prefix + "doctypes"
        # The organization's event stream and its state (the sequence, the
        # thresholds crossed): store/lua/_lib.lua, emit; docs/events.md.
        self.events = self.prefix + "events"
        self.evstate = self.prefix + "evstate"

    def month(self, period_id: str) -> str:
        return f"{self.prefix}u:{period_id}"

    def day(self, day: date) -> str:
        return self.day_named(day.isoformat())

    def day_named(self, day_id: str) -> str:
        return f"{self.prefix}d:{day_id}"

    def window(self, kind: str, window_id: str) -> str:
        """A minute, hour or week window's counters (a day window's are the day hash)."""
        return f"{self.prefix}w:{kind}:{window_id}"

    def record(self, request_id: str) -> str:
        return f"{self.prefix}r:{request_id}"

    def grant(self, grant_id: str) -> str:
        return f"{self.prefix}g:{grant_id}"

    def adjustment(self, adjustment_id: str) -> str:
        return f"{self.prefix}adj:{adjustment_id}"

    def api_key(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}"

    def key_rate(self, key_id: str) -> str:
        return f"{self.prefix}krate:{key_id}"


def fingerprint(*parts: object) -> str:
    """A short, stable digest of a request's payload, for idempotency checks."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
