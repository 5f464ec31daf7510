"""The Redis store: key layout, the Lua scripts, and typed results.

Every key of an organization starts with `pm:{org_id}:` so that all of them hash
to one Redis Cluster slot and each script call is atomic on one node. Scripts are
loaded once per connection pool by redis-py's Script objects, which run EVALSHA
and reload the script on NOSCRIPT (after a Redis restart, for example).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from typing import Any, Literal, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

from pagemeter_server.coalesce import Coalescer
from pagemeter_server.faults import StoreUnavailable, is_transient
from pagemeter_server.periods import Month, day_end_ms, local_date, month_at, month_of, zone
from pagemeter_server.replica_acks import ReplicaAcks

DAY_MS = 86_400_000
# check.lua's reason for a metric that is not in the plan.
UNKNOWN_METRIC = 8
# A record counts in the month of its completion, which ends at most 31 days
# after the record was made: its counters outlive it by the retention plus that.
NAMES_GRACE_MS = 31 * DAY_MS

ScriptReply = list[Any]
# The organizations that have a plan: the per-organization exporter's list, so
# that it never scans the keyspace. Written after SetPlan's script (it is not
# under the org's hash tag, so it cannot be in the same script).
ORGS_KEY = "pm:orgs"
ScriptArg = str | int | float


class StoreError(Exception):
    """Base class of errors the store reports to the service."""


class RequestIdReused(StoreError):
    """The request_id (or grant_id) already belongs to a different payload."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class NegativeUnits(StoreError):
    """Negative units were sent for a metric that is not a lifetime gauge."""

    def __init__(self, metric: str) -> None:
        super().__init__(metric)
        self.metric = metric


class TooManyMetrics(StoreError):
    """A record names a metric not in the plan, and the org already uses the most allowed."""

    def __init__(self, metric: str, cap: int) -> None:
        super().__init__(metric)
        self.metric = metric
        self.cap = cap


class LimitReached(StoreError):
    """An organization has the most of something it may have; `reason` names what."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PlanMissing(StoreError):
    """The organization has no plan (or the plan lacks the metric)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class PlanNotFound(StoreError):
    """A read of an organization's plan found none."""

    def __init__(self, org_id: str) -> None:
        super().__init__(org_id)
        self.org_id = org_id


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

    def month(self, period_id: str) -> str:
        return f"{self.prefix}u:{period_id}"

    def day(self, day: date) -> str:
        return f"{self.prefix}d:{day.isoformat()}"

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


def _opt_int(text: str) -> int | None:
    return int(text) if text != "" else None


def _rows(encoded: str) -> list[list[str]]:
    return [row.split(",") for row in encoded.split(";")] if encoded else []


def fingerprint(*parts: object) -> str:
    """A short, stable digest of a request's payload, for idempotency checks."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    allowed: bool
    reason: int
    requested: int
    committed: int
    held: int
    contract_quota: int | None
    hard_limit: int | None
    overage_allowed: bool
    max_admissible: int | None
    remaining: int | None
    included: int
    prepaid: int
    overage: int
    overage_price: str
    prepaid_available: int
    lifetime: bool

    @classmethod
    def from_row(cls, row: Sequence[str]) -> MetricCheck:
        return cls(
            metric=row[0],
            allowed=row[1] == "1",
            reason=int(row[2]),
            requested=int(row[3]),
            committed=int(row[4]),
            held=int(row[5]),
            contract_quota=_opt_int(row[6]),
            hard_limit=_opt_int(row[7]),
            overage_allowed=row[8] == "1",
            max_admissible=_opt_int(row[9]),
            remaining=_opt_int(row[10]),
            included=int(row[11]),
            prepaid=int(row[12]),
            overage=int(row[13]),
            overage_price=row[14],
            prepaid_available=int(row[15]),
            lifetime=row[16] == "N",
        )


@dataclass(frozen=True)
class CheckResult:
    outcome: Literal["ok", "no_plan", "rate_limited"]
    allowed: bool
    held: bool
    hold_expires_ms: int
    duplicate: bool
    retry_after_ms: int
    month: Month
    metrics: list[MetricCheck]
    # Units of holds this call found expired, per metric.
    expired: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricRecord:
    metric: str
    units: int
    included: int
    prepaid: int
    overage: int
    committed: int
    contract_quota: int | None
    hard_limit: int | None
    over_contract_quota: bool
    over_hard_limit: bool
    overage_not_allowed: bool
    lifetime: bool
    overage_price: str
    # In the plan when it was recorded (results stored before this column
    # existed read as planned).
    planned: bool = True

    @classmethod
    def from_row(cls, row: Sequence[str]) -> MetricRecord:
        return cls(
            metric=row[0],
            units=int(row[1]),
            included=int(row[2]),
            prepaid=int(row[3]),
            overage=int(row[4]),
            committed=int(row[5]),
            contract_quota=_opt_int(row[6]),
            hard_limit=_opt_int(row[7]),
            over_contract_quota=row[8] == "1",
            over_hard_limit=row[9] == "1",
            overage_not_allowed=row[10] == "1",
            lifetime=row[11] == "N",
            overage_price=row[12],
            planned=len(row) < 14 or row[13] == "1",
        )


@dataclass(frozen=True)
class RecordResult:
    duplicate: bool
    status: Literal["completed", "failed"]
    hold_released: bool
    hold_expired: bool
    over_limit: bool
    month_id: str
    completed_ms: int
    metrics: list[MetricRecord]
    expired: dict[str, int] = field(default_factory=dict)
    # The job's document type counted as '_other' in the statistics (the org
    # uses the most document types allowed).
    document_type_folded: bool = False


@dataclass(frozen=True)
class ReleaseResult:
    outcome: Literal["released", "already_released", "expired", "already_recorded", "not_found"]
    released: dict[str, int]
    expired: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredPlan:
    """A plan as stored: the server-built JSON document and its version."""

    doc: dict[str, Any]
    version: int
    updated_ms: int


@dataclass(frozen=True)
class UsageSnapshot:
    """One month of an organization, read atomically.

    `plan` is the plan version whose terms applied to the month (for a past
    month the one in effect at its end; None when there was none yet).
    """

    plan: StoredPlan | None
    timezone: str
    month: Month
    month_fields: dict[str, int]
    lifetime_fields: dict[str, int]
    held_fields: dict[str, int]
    credits: dict[str, int]
    previous_month_fields: dict[str, int]
    expired: dict[str, int] = field(default_factory=dict)


def _record_result(reply: ScriptReply) -> RecordResult:
    tag = reply[0]
    if tag == "ERR":
        raise ItemFailed(str(reply[1]))
    if tag == "REUSED":
        raise RequestIdReused(str(reply[1]))
    if tag == "NEGATIVE":
        raise NegativeUnits(str(reply[1]))
    if tag == "TOO_MANY_METRICS":
        raise TooManyMetrics(str(reply[1]), int(reply[2]))
    _, duplicate, status, released, hold_expired, over_limit, month_id, cms, rows, gone, folded = (
        reply
    )
    return RecordResult(
        duplicate=duplicate == "1",
        status=status,
        hold_released=released == "1",
        hold_expired=hold_expired == "1",
        over_limit=over_limit == "1",
        month_id=month_id,
        completed_ms=int(cms),
        metrics=[MetricRecord.from_row(row) for row in _rows(rows)],
        expired=held_units(gone),
        document_type_folded=folded == "1",
    )


Outcome = TypeVar("Outcome")


def _item_outcome(parse: Callable[[], Outcome]) -> Outcome | StoreError:
    """A batch item's result, or the store error it ended in (the others go on)."""
    try:
        return parse()
    except StoreError as exc:
        return exc


def held_units(encoded: str) -> dict[str, int]:
    """Units per metric of a hold encoding "metric:units:prepaid;..." (see _lib.lua)."""
    units: dict[str, int] = {}
    for part in filter(None, str(encoded).split(";")):
        metric, amount, _prepaid = part.split(":")
        units[metric] = units.get(metric, 0) + int(amount)
    return units


def _pairs(flat: Sequence[str]) -> dict[str, int]:
    return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _script_parts(name: str) -> tuple[str, str, str]:
    """(header comment, shared helpers, body) of a script file."""
    folder = resources.files("pagemeter_server") / "lua"
    lib = (folder / "_lib.lua").read_text(encoding="utf-8")
    lines = (folder / name).read_text(encoding="utf-8").splitlines(keepends=True)
    header_end = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return "".join(lines[:header_end]), lib, "".join(lines[header_end:])


def _load_script_text(name: str) -> str:
    # The script's header comment stays first, so a script read back from Redis
    # still says what it is; the shared helpers go between header and body.
    header, lib, body = _script_parts(name)
    return header + lib + body


_BATCH_TEMPLATE = """\
-- {name}_batch: {name}.lua applied to several calls of ONE organization in one
-- atomic script call, in order (a later item sees what an earlier one did).
-- Generated from {name}.lua when the store loads its scripts.
--
-- KEYS    the keys of every item, one item after the other (all under the
--         organization's hash tag, so the call stays on one cluster slot)
-- ARGV[1] item count N; ARGV[2 .. 1+2N] per item: its key count, its ARGV count;
--         then the ARGV of every item, one item after the other
--
-- Returns one reply per item, each what {name}.lua returns for it, or
-- {{'ERR', message}} for an item whose script raised an error (the other items
-- are not affected by it).
{lib}
local function one(KEYS, ARGV)
{body}
end

local count = tonumber(ARGV[1])
local replies = {{}}
local next_key, next_arg = 1, 2 + 2 * count
for i = 1, count do
  local nkeys, nargs = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local item_keys, item_args = {{}}, {{}}
  for k = 1, nkeys do
    item_keys[k] = KEYS[next_key + k - 1]
  end
  for a = 1, nargs do
    item_args[a] = ARGV[next_arg + a - 1]
  end
  next_key, next_arg = next_key + nkeys, next_arg + nargs
  local ok, reply = pcall(one, item_keys, item_args)
  if ok then
    replies[i] = reply
  else
    replies[i] = {{'ERR', tostring(reply)}}
  end
end
return replies
"""


def _load_batch_script_text(name: str) -> str:
    _, lib, body = _script_parts(f"{name}.lua")
    return _BATCH_TEMPLATE.format(name=name, lib=lib, body=body)


@dataclass(frozen=True)
class CheckCall:
    """One CheckQuota's inputs, as the store needs them."""

    units: Mapping[str, int]
    request_id: str = ""
    hold: bool = False
    hold_ttl_ms: int = 0


@dataclass(frozen=True)
class RecordCall:
    """One RecordUsage's inputs, as the store needs them."""

    request_id: str
    units: Mapping[str, int]
    completed_ms: int
    completed_given: bool
    success: bool
    requested_ms: int | None = None
    document_type: str = ""


@dataclass(frozen=True)
class PreparedCall:
    """One script call's keys and arguments, for a given timezone guess."""

    keys: list[str]
    args: list[ScriptArg]


class ItemFailed(StoreError):
    """A batch item whose script raised an error; the other items are unaffected."""


SCRIPTS = (
    "check",
    "record",
    "release",
    "usage",
    "set_plan",
    "grant",
    "adjust",
    "key_create",
    "key_revoke",
    "key_auth",
)
# Scripts that also run as batches of one organization's calls (see _BATCH_TEMPLATE).
BATCH_SCRIPTS = ("check", "record")
# Scripts whose every call may change what a caller is told was kept: with
# --replica-acks their acknowledgement waits for the replicas (replica_acks.py).
# check.lua changes state only when it places a hold (its callers say so).
CHANGING_SCRIPTS = frozenset(
    {
        "record",
        "record_batch",
        "release",
        "set_plan",
        "grant",
        "adjust",
        "key_create",
        "key_revoke",
    }
)


class Store:
    """pagemeter's state in Redis, reached only through the Lua scripts."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        default_timezone: str,
        record_retention_days: int,
        usage_retention_days: int,
        max_records_per_org: int = 100_000,
        max_unplanned_metrics: int = 16,
        max_document_types: int = 100,
        audit_max_events: int = 10_000,
        coalesce: bool = False,
        tz_cache_size: int = 100_000,
        observer: Callable[[str, float, bool], None] | None = None,
        replica_acks: ReplicaAcks | None = None,
    ) -> None:
        self.client = client
        self._observe = observer
        # Whether a call with these keys may go to the store now; create_server
        # points it at the health probe's finding (per node in a cluster).
        self.available: Callable[[Sequence[str]], bool] = lambda keys: True
        self.replica_acks = replica_acks
        self.default_timezone = default_timezone
        self.record_ttl_ms = record_retention_days * DAY_MS
        self.usage_retention_ms = usage_retention_days * DAY_MS
        self.max_records_per_org = max_records_per_org
        self.max_unplanned_metrics = max_unplanned_metrics
        self.max_document_types = max_document_types
        self._tz_cache: OrderedDict[str, str] = OrderedDict()
        self._policy_cache: OrderedDict[str, tuple[str, frozenset[str]]] = OrderedDict()
        self._month_cache: dict[str, Month] = {}
        self._tz_cache_size = tz_cache_size
        self.audit_max_events = audit_max_events
        self._coalescer = Coalescer(client) if coalesce else None
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(_load_script_text(f"{name}.lua")) for name in SCRIPTS
        }
        for name in BATCH_SCRIPTS:
            self.scripts[f"{name}_batch"] = client.register_script(_load_batch_script_text(name))

    # -- timezone cache ---------------------------------------------------------
    # The month key depends on the plan's timezone, which lives in Redis. The
    # server guesses it from this cache; each script checks the guess against the
    # plan inside the same atomic call and answers STALE_TZ if it was wrong.

    def _month_at(self, instant_ms: int, tz: str) -> Month:
        """month_at, remembered per timezone: most calls fall in the month of the last."""
        cached = self._month_cache.get(tz)
        if cached is not None and cached.start_ms <= instant_ms < cached.end_ms:
            return cached
        month = month_at(instant_ms, zone(tz))
        if len(self._month_cache) > 1024:
            self._month_cache.clear()
        self._month_cache[tz] = month
        return month

    # -- store failure policy cache -------------------------------------------------
    # While Redis is unreachable the plan cannot be read, so CheckQuota's
    # fail-open/closed answer uses the policy this replica last saw for the org.

    def failure_policy(self, org_id: str) -> str:
        """'open', 'closed' or '' (the service default) as last seen for the org."""
        return self._policy_cache.get(org_id, ("", frozenset()))[0]

    def known_plan_metrics(self, org_id: str) -> frozenset[str]:
        """The org's plan metrics this replica has seen (for labels while Redis is down)."""
        return self._policy_cache.get(org_id, ("", frozenset()))[1]

    def _remember_policy(self, org_id: str, policy: str, metrics: Iterable[str] = ()) -> None:
        known = self.known_plan_metrics(org_id)
        seen = frozenset(metrics)
        if not seen <= known:  # the usual check names metrics already known
            known = known | seen
        self._policy_cache[org_id] = (policy, known)
        self._policy_cache.move_to_end(org_id)
        while len(self._policy_cache) > self._tz_cache_size:
            self._policy_cache.popitem(last=False)

    def _cached_timezone(self, org_id: str) -> str:
        return self._tz_cache.get(org_id, self.default_timezone)

    def _remember_timezone(self, org_id: str, tz: str) -> None:
        self._tz_cache[org_id] = tz
        self._tz_cache.move_to_end(org_id)
        while len(self._tz_cache) > self._tz_cache_size:
            self._tz_cache.popitem(last=False)

    async def run_with_timezone(
        self, org_id: str, call: Callable[[str], Awaitable[ScriptReply]]
    ) -> tuple[ScriptReply, str]:
        tz = self._cached_timezone(org_id)
        for _ in range(3):
            reply = await call(tz)
            if reply[0] != "STALE_TZ":
                return reply, tz
            tz = str(reply[1])
            self._remember_timezone(org_id, tz)
        raise StoreError(f"timezone of organization {org_id} keeps changing")

    async def run(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        *,
        changes: bool | None = None,
    ) -> ScriptReply:
        """One script call. `changes` says whether it may change state (by default
        whether the script is one of CHANGING_SCRIPTS); with --replica-acks such a
        call is acknowledged only once the replicas have it.

        Every transient failure leaves as StoreUnavailable (a ConnectionError):
        UNAVAILABLE, or CheckQuota's fail-open answer; never INTERNAL.
        """
        if not self.available(keys):
            # The health probe found the node of these keys down: the call fails
            # at once, as UNAVAILABLE (or CheckQuota's fail-open answer), instead
            # of waiting out --redis-timeout.
            raise StoreUnavailable("the last health probe found this organization's Redis down")
        if changes is None:
            changes = name in CHANGING_SCRIPTS
        started = time.perf_counter()
        ok = False
        try:
            if changes and self.replica_acks is not None:
                reply: ScriptReply = await self.replica_acks.run(self.scripts[name], keys, args)
            elif self._coalescer is not None:
                reply = await self._coalescer.call(self.scripts[name], keys, args)
            else:
                reply = await self.scripts[name](keys=list(keys), args=list(args))
            ok = True
            return reply
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            raise
        except Exception as error:
            if is_transient(error, inside_client=True):
                raise StoreUnavailable(f"{type(error).__name__}: {error}") from error
            raise
        finally:
            if self._observe is not None:
                self._observe(name, time.perf_counter() - started, ok)

    # -- CheckQuota -------------------------------------------------------------

    async def check(
        self,
        org_id: str,
        units: Mapping[str, int],
        *,
        now_ms: int,
        request_id: str = "",
        hold: bool = False,
        hold_ttl_ms: int = 0,
    ) -> CheckResult:
        call = CheckCall(units, request_id, hold, hold_ttl_ms)
        months: list[Month] = []

        async def run(tz: str) -> ScriptReply:
            prepared, month = self._prepare_check(org_id, call, now_ms, tz)
            months.append(month)
            return await self.run("check", prepared.keys, prepared.args, changes=hold)

        reply, _ = await self.run_with_timezone(org_id, run)
        return self._check_result(org_id, reply, months[-1])

    async def check_batch(
        self, org_id: str, calls: Sequence[CheckCall], *, now_ms: int
    ) -> list[CheckResult | StoreError]:
        """Several checks of one organization in one atomic script call, in order."""
        replies = await self._run_batch(
            org_id,
            "check",
            calls,
            lambda call, tz: self._prepare_check(org_id, call, now_ms, tz),
            changes=any(call.hold for call in calls),
        )
        return [
            _item_outcome(functools.partial(self._check_result, org_id, reply, month))
            for reply, month in replies
        ]

    def _prepare_check(
        self, org_id: str, call: CheckCall, now_ms: int, tz: str
    ) -> tuple[PreparedCall, Month]:
        keys = OrgKeys(org_id)
        month = self._month_at(now_ms, tz)
        flat_units = [item for pair in sorted(call.units.items()) for item in pair]
        prepared = PreparedCall(
            [
                keys.plan,
                keys.holds,
                keys.holddata,
                keys.held,
                keys.credits,
                keys.month(month.period_id),
                keys.lifetime,
                keys.rate,
                keys.record(call.request_id),
                keys.records_index,
            ],
            [
                now_ms,
                tz,
                self.default_timezone,
                "1" if call.hold else "0",
                now_ms + call.hold_ttl_ms,
                # Only a hold is remembered (and so compared on a retry).
                (
                    fingerprint("check", sorted(call.units.items()), call.hold_ttl_ms)
                    if call.hold
                    else ""
                ),
                self.record_ttl_ms,
                call.request_id,
                now_ms - self.record_ttl_ms,
                self.max_records_per_org,
                len(call.units),
                *flat_units,
            ],
        )
        return prepared, month

    def _check_result(self, org_id: str, reply: ScriptReply, month: Month) -> CheckResult:
        tag = reply[0]
        if tag == "ERR":
            raise ItemFailed(str(reply[1]))
        if tag == "REUSED":
            raise RequestIdReused(str(reply[1]))
        if tag == "NO_PLAN":
            return CheckResult("no_plan", False, False, 0, False, 0, month, [])
        if tag == "RATE_LIMITED":
            return CheckResult("rate_limited", False, False, 0, False, int(reply[1]), month, [])
        _, allowed, held, expiry, duplicate, rows, expired, policy = reply
        metrics = [MetricCheck.from_row(row) for row in _rows(rows)]
        self._remember_policy(
            org_id, str(policy), (m.metric for m in metrics if m.reason != UNKNOWN_METRIC)
        )
        return CheckResult(
            outcome="ok",
            allowed=allowed == "1",
            held=held == "1",
            hold_expires_ms=int(expiry),
            duplicate=duplicate == "1",
            retry_after_ms=0,
            month=month,
            metrics=metrics,
            expired=held_units(expired),
        )

    # -- RecordUsage ------------------------------------------------------------

    async def record(
        self,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        *,
        now_ms: int,
        completed_ms: int,
        completed_given: bool,
        success: bool,
        requested_ms: int | None = None,
        document_type: str = "",
    ) -> RecordResult:
        call = RecordCall(
            request_id, units, completed_ms, completed_given, success, requested_ms, document_type
        )

        async def run(tz: str) -> ScriptReply:
            prepared = self._prepare_record(org_id, call, now_ms, tz)
            return await self.run("record", prepared.keys, prepared.args)

        reply, _ = await self.run_with_timezone(org_id, run)
        return _record_result(reply)

    async def record_batch(
        self, org_id: str, calls: Sequence[RecordCall], *, now_ms: int
    ) -> list[RecordResult | StoreError]:
        """Several records of one organization in one atomic script call, in order."""
        replies = await self._run_batch(
            org_id,
            "record",
            calls,
            lambda call, tz: (self._prepare_record(org_id, call, now_ms, tz), None),
        )
        return [_item_outcome(functools.partial(_record_result, reply)) for reply, _ in replies]

    def _prepare_record(self, org_id: str, call: RecordCall, now_ms: int, tz: str) -> PreparedCall:
        keys = OrgKeys(org_id)
        # completed_at is part of the payload only when the caller chose it: a
        # retry that lets the server default it again is the same job.
        payload_fp = fingerprint(
            "record",
            sorted(call.units.items()),
            call.success,
            call.document_type,
            call.completed_ms if call.completed_given else None,
        )
        flat_units = [item for pair in sorted(call.units.items()) for item in pair]
        tzinfo = zone(tz)
        month = self._month_at(call.completed_ms, tz)
        day = local_date(call.completed_ms, tzinfo)
        return PreparedCall(
            [
                keys.plan,
                keys.holds,
                keys.holddata,
                keys.held,
                keys.credits,
                keys.month(month.period_id),
                keys.lifetime,
                keys.record(call.request_id),
                keys.day(day),
                keys.records_index,
                keys.unplanned,
                keys.doctypes,
            ],
            [
                now_ms,
                tz,
                self.default_timezone,
                month.period_id,
                month.end_ms + self.usage_retention_ms,
                self.record_ttl_ms,
                payload_fp,
                "1" if call.success else "0",
                call.completed_ms,
                "" if call.requested_ms is None else call.requested_ms,
                call.document_type,
                call.request_id,
                day_end_ms(day, tzinfo) + self.usage_retention_ms,
                now_ms - self.record_ttl_ms,
                self.max_records_per_org,
                self.max_unplanned_metrics,
                self.max_document_types,
                # A name last recorded before this has no counter left: its
                # month ended more than the usage retention ago.
                now_ms - self.usage_retention_ms - NAMES_GRACE_MS,
                len(call.units),
                *flat_units,
            ],
        )

    # -- batches -----------------------------------------------------------------

    async def _run_batch(
        self,
        org_id: str,
        name: str,
        items: Sequence[Any],
        prepare: Callable[[Any, str], tuple[PreparedCall, Any]],
        changes: bool | None = None,
    ) -> list[tuple[ScriptReply, Any]]:
        """Run items of one org as one batch script call; re-run those whose timezone
        guess was stale (a stale item changed nothing, so running it again is safe)."""
        tz = self._cached_timezone(org_id)
        done: dict[int, tuple[ScriptReply, Any]] = {}
        pending = list(range(len(items)))
        for _ in range(3):
            prepared = [prepare(items[i], tz) for i in pending]
            keys: list[str] = []
            counts: list[ScriptArg] = []
            args: list[ScriptArg] = []
            for call, _context in prepared:
                keys += call.keys
                counts += [len(call.keys), len(call.args)]
                args += call.args
            replies = await self.run(
                f"{name}_batch", keys, [len(prepared), *counts, *args], changes=changes
            )
            stale = []
            for index, (_call, context), reply in zip(pending, prepared, replies, strict=True):
                if reply[0] == "STALE_TZ":
                    tz = str(reply[1])
                    self._remember_timezone(org_id, tz)
                    stale.append(index)
                else:
                    done[index] = (reply, context)
            pending = stale
            if not pending:
                return [done[i] for i in range(len(items))]
        raise StoreError(f"timezone of organization {org_id} keeps changing")

    # -- ReleaseQuota -----------------------------------------------------------

    async def release(self, org_id: str, request_id: str, *, now_ms: int) -> ReleaseResult:
        keys = OrgKeys(org_id)
        outcome, parts, expired = await self.run(
            "release",
            [keys.holds, keys.holddata, keys.held, keys.record(request_id)],
            [now_ms, request_id, self.record_ttl_ms],
        )
        return ReleaseResult(
            outcome=outcome, released=held_units(parts), expired=held_units(expired)
        )

    # -- GetUsage ---------------------------------------------------------------

    async def usage(
        self, org_id: str, *, now_ms: int, year_month: tuple[int, int] | None = None
    ) -> UsageSnapshot:
        keys = OrgKeys(org_id)
        month_box: list[Month] = []

        async def call(tz: str) -> ScriptReply:
            tzinfo = zone(tz)
            month = (
                month_at(now_ms, tzinfo) if year_month is None else month_of(*year_month, tzinfo)
            )
            month_box.append(month)
            return await self.run(
                "usage",
                [
                    keys.plan,
                    keys.holds,
                    keys.holddata,
                    keys.held,
                    keys.credits,
                    keys.month(month.period_id),
                    keys.lifetime,
                    keys.month(month.previous(tzinfo).period_id),
                    keys.planlog,
                    keys.planver,
                ],
                # A month's terms are the plan's at its end (now for the current one).
                [now_ms, tz, self.default_timezone, min(month.end_ms, now_ms + 1)],
            )

        reply, tz = await self.run_with_timezone(org_id, call)
        _, plan_json, version, month_flat, life_flat, held_flat, credit_flat, prev_flat, gone = (
            reply
        )
        plan = StoredPlan(json.loads(plan_json), int(version), 0) if plan_json else None
        return UsageSnapshot(
            plan=plan,
            timezone=tz,
            month=month_box[-1],
            month_fields=_pairs(month_flat),
            lifetime_fields=_pairs(life_flat),
            held_fields=_pairs(held_flat),
            credits=_pairs(credit_flat),
            previous_month_fields=_pairs(prev_flat),
            expired=held_units(gone),
        )

    # -- plans and credits ------------------------------------------------------

    async def set_plan(
        self, org_id: str, doc: Mapping[str, Any], *, now_ms: int, actor: str = ""
    ) -> StoredPlan:
        keys = OrgKeys(org_id)
        version, _previous = await self.run(
            "set_plan",
            [keys.plan, keys.planlog, keys.planver, keys.audit, keys.unplanned, keys.lifetime],
            [
                json.dumps(doc, separators=(",", ":")),
                now_ms,
                now_ms - self.usage_retention_ms,
                actor,
                self.audit_max_events,
            ],
        )
        self._remember_timezone(org_id, str(doc["tz"]))
        self._remember_policy(org_id, str(doc.get("sfp", "")), doc.get("metrics", {}))
        await self.client.zadd(ORGS_KEY, {org_id: 0})
        return StoredPlan(dict(doc), int(version), now_ms)

    async def get_plan(self, org_id: str) -> StoredPlan | None:
        raw = cast(dict[str, str], await self.client.hgetall(OrgKeys(org_id).plan))
        if "json" not in raw:
            return None
        return StoredPlan(json.loads(raw["json"]), int(raw["version"]), int(raw["updated_ms"]))

    async def grant_credits(
        self,
        org_id: str,
        metric: str,
        units: int,
        grant_id: str,
        reason: str,
        *,
        now_ms: int,
        actor: str = "",
    ) -> tuple[int, bool]:
        keys = OrgKeys(org_id)
        reply = await self.run(
            "grant",
            [keys.plan, keys.credits, keys.grant(grant_id), keys.audit],
            [
                metric,
                units,
                fingerprint("grant", metric, units, reason),
                self.usage_retention_ms,
                now_ms,
                reason,
                actor,
                self.audit_max_events,
            ],
        )
        if reply[0] == "NO_PLAN":
            raise PlanMissing("the organization has no plan")
        if reply[0] == "UNKNOWN_METRIC":
            raise PlanMissing(f"metric {metric!r} is not in the organization's plan")
        if reply[0] == "REUSED":
            raise RequestIdReused("granted")
        return int(reply[1]), reply[2] == "1"
