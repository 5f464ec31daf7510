"""The Redis store: key layout, the Lua scripts, and typed results.

Every key of an organization starts with `pm:{org_id}:` so that all of them hash
to one Redis Cluster slot and each script call is atomic on one node. Scripts are
loaded once per connection pool by redis-py's Script objects, which run EVALSHA
and reload the script on NOSCRIPT (after a Redis restart, for example).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from pagemeter.v1 import quota_pb2
from pagemeter_server.domain.credits import (
    DEFAULT_PRIORITY,
    MAX_LIVE_GRANTS,
    ROLLOVER_PREFIX,
    Grant,
    credit_balances,
    parse_credits,
)
from pagemeter_server.domain.decisions import (
    CheckCall,
    CheckResult,
    MetricCheck,
    MetricRecord,
    RecordCall,
    RecordResult,
    ReleaseResult,
    StoredPlan,
    UsageSnapshot,
)
from pagemeter_server.domain.errors import (
    ItemFailed,
    LimitReached,
    NotFound,
    PlanMissing,
    PlansNotMigrated,
    RequestIdReused,
    StoreError,
)
from pagemeter_server.domain.periods import (
    Calendar,
    Month,
    WindowSpan,
    calendar,
    parse_segments,
    segments_spec,
    tz_of,
    window_at,
)
from pagemeter_server.domain.plans import (
    SCHEMA,
    WINDOW_KINDS,
    PlanDoc,
    needs_schema_2,
    plan_doc_from_json,
    plan_doc_json,
    plan_token,
    schema_1_json,
)
from pagemeter_server.store.coalesce import PipelinedScripts
from pagemeter_server.store.events import note_event_orgs
from pagemeter_server.store.faults import StoreUnavailable, is_transient
from pagemeter_server.store.keys import (
    ORGS_KEY,
    PLAN_SCHEMA_KEY,
    OrgKeys,
    fingerprint,
)
from pagemeter_server.store.replica_acks import ReplicaAcks
from pagemeter_server.store.replies import (
    held_units,
    int_pairs,
    item_outcome,
    metric_check,
    record_result,
    split_rows,
)
from pagemeter_server.store.scripts import (
    BATCH_SCRIPTS,
    CHANGING_SCRIPTS,
    SCRIPTS,
    PreparedCall,
    ScriptArg,
    ScriptReply,
    script_text,
)

DAY_MS = 86_400_000
# check.lua's reason for a metric that is not in the plan.
UNKNOWN_METRIC = quota_pb2.DECISION_REASON_UNKNOWN_METRIC
# A record counts in the month of its completion, which ends at most 31 days
# after the record was made: its counters outlive it by the retention plus that.
NAMES_GRACE_MS = 31 * DAY_MS
# How often a server writes the organizations whose scripts wrote events to
# pm:event-orgs (seconds), and the last key of such a script call.
EVENT_ORGS_INTERVAL = 0.5
EVSTATE_SUFFIX = "}:evstate"
# Why a crossed threshold that is no longer watched resolves (alerts.lua).
PLAN_CHANGED = "plan_changed"
NO_LONGER_HOLDS = "no_longer_holds"


Call = TypeVar("Call")
Outcome = TypeVar("Outcome")


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
        event_max_per_org: int = 100_000,
        event_retention_days: int = 7,
        coalesce: bool = False,
        tz_cache_size: int = 100_000,
        observer: Callable[[str, float, bool], None] | None = None,
        replica_acks: ReplicaAcks | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.client = client
        self._observe = observer
        # A span per script call when tracing is on (ops/tracing.py); None: no cost.
        self._tracer = tracer
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
        self._previous_cache: dict[str, tuple[Month, Month]] = {}
        self._window_cache: dict[tuple[str, str], WindowSpan] = {}
        self._window_key_cache: dict[str, tuple[int, int, str, list[str]]] = {}
        self._tz_cache_size = tz_cache_size
        self._plans_migrated_seen = False
        self.audit_max_events = audit_max_events
        self.event_max_per_org = event_max_per_org
        self.event_retention_ms = event_retention_days * DAY_MS
        # Organizations whose scripts ran since pm:event-orgs was last written:
        # the dispatchers' list of streams to read (store/events.py). Written
        # at most every EVENT_ORGS_INTERVAL by the call that finds it due.
        self._event_orgs: set[str] = set()
        self._event_orgs_written = time.monotonic()
        # Cluster mode has no single connection pool: its calls go through redis-py.
        self._coalescer = (
            PipelinedScripts(client)
            if coalesce and not isinstance(cast(Any, client), RedisCluster)
            else None
        )
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(script_text(name))
            for name in (*SCRIPTS, *(f"{batch}_batch" for batch in BATCH_SCRIPTS))
        }

    def event_spec(self) -> str:
        """The scripts' events argument (_lib.lua, event_sink): the most entries an
        organization's stream keeps, the oldest entry id it keeps and the
        retention, or '' when
        events are off. The id is a time on this server's clock, which Redis's
        entry ids follow (they are its clock), not the rules' clock."""
        if self.event_max_per_org <= 0:
            return ""
        oldest = int(time.time() * 1000) - self.event_retention_ms
        return f"{self.event_max_per_org}|{max(0, oldest)}|{self.event_retention_ms}"

    # -- timezone cache ---------------------------------------------------------
    # The month key depends on the plan's timezone, which lives in Redis. The
    # server guesses it from this cache; each script checks the guess against the
    # plan inside the same atomic call and answers STALE_TZ if it was wrong.

    def _month_at(self, instant_ms: int, tz: str) -> Month:
        """month_at, remembered per timezone: most calls fall in the month of the last."""
        cached = self._month_cache.get(tz)
        if cached is not None and cached.start_ms <= instant_ms < cached.end_ms:
            return cached
        month = calendar(tz).period_at(instant_ms)
        if len(self._month_cache) > 1024:
            self._month_cache.clear()
        self._month_cache[tz] = month
        return month

    def _previous_of(self, month: Month, tz: str) -> Month:
        """The period before `month`, remembered as the month is."""
        cached = self._previous_cache.get(tz)
        if cached is not None and cached[0] == month:
            return cached[1]
        previous = month.previous(calendar(tz))
        if len(self._previous_cache) > 1024:
            self._previous_cache.clear()
        self._previous_cache[tz] = (month, previous)
        return previous

    def _rollover_context(self, keys: OrgKeys, month: Month, tz: str) -> tuple[list[str], str]:
        """The KEYS and the ARGV a script needs to work out a period's rollover
        grants (_lib.lua, rollover_period): the previous period's hash and the
        plan log; the period's bounds, with the previous period's start."""
        previous = self._previous_of(month, tz)
        return (
            [keys.month(previous.period_id), keys.planlog, keys.planver],
            period_bounds(month, previous),
        )

    def _windows_at(self, instant_ms: int, tz: str) -> tuple[WindowSpan, ...]:
        """The minute, hour, day and week that contain the instant; a timezone's
        day and week are remembered, as its month is."""
        spans = []
        for kind in WINDOW_KINDS:
            cached = self._window_cache.get((kind, tz))
            if cached is None or not cached.start_ms <= instant_ms < cached.end_ms:
                cached = window_at(kind, instant_ms, tz_of(tz))
                if len(self._window_cache) > 4096:
                    self._window_cache.clear()
                self._window_cache[kind, tz] = cached
            spans.append(cached)
        return tuple(spans)

    def _spans_for(
        self, rows: Sequence[MetricCheck | MetricRecord], instant_ms: int, tz: str
    ) -> tuple[WindowSpan, ...]:
        """The windows at the instant, for an answer that has any."""
        if not any(row.windows for row in rows):
            return ()
        return self._windows_at(instant_ms, tz)

    def _record_result(self, reply: ScriptReply, prepared: PreparedCall) -> RecordResult:
        result = record_result(reply)
        spans = self._spans_for(result.metrics, result.completed_ms, prepared.timezone)
        return dataclasses.replace(result, spans=spans) if spans else result

    def _window_keys(self, keys: OrgKeys, instant_ms: int, tz: str) -> list[str]:
        """The counters of the windows that contain the instant (the day's is the day
        hash), remembered per organization while the instant stays in all four: a
        busy organization's calls share them for up to a minute."""
        cached = self._window_key_cache.get(keys.prefix)
        if cached is not None:
            start, end, cached_tz, window_keys = cached
            if start <= instant_ms < end and cached_tz == tz:
                return window_keys
        spans = self._windows_at(instant_ms, tz)
        minute, hour, day, week = spans
        window_keys = [
            keys.window("minute", minute.window_id),
            keys.window("hour", hour.window_id),
            keys.day_named(day.window_id),
            keys.window("week", week.window_id),
        ]
        if len(self._window_key_cache) > self._tz_cache_size:
            self._window_key_cache.clear()
        self._window_key_cache[keys.prefix] = (
            max(span.start_ms for span in spans),
            min(span.end_ms for span in spans),
            tz,
            window_keys,
        )
        return window_keys

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

    async def call_in_timezone(
        self,
        org_id: str,
        name: str,
        prepare: Callable[[str], PreparedCall],
        *,
        changes: bool | None = None,
    ) -> tuple[ScriptReply, PreparedCall]:
        """One script call whose keys depend on the organization's timezone: prepared
        for the timezone the server guesses, run again (at most twice) when the
        script answers STALE_TZ (a stale call changed nothing). The one-call form of
        _calls_in_timezone, without its lists: it is on every single RPC's path."""
        tz = self._cached_timezone(org_id)
        for _ in range(3):
            prepared = prepare(tz)
            reply = await self.run(name, prepared.keys, prepared.args, changes=changes)
            if reply[0] != "STALE_TZ":
                return reply, prepared
            tz = str(reply[1])
            self._remember_timezone(org_id, tz)
        raise StoreError(f"timezone of organization {org_id} keeps changing")

    async def _calls_in_timezone(
        self,
        org_id: str,
        name: str,
        calls: Sequence[Call],
        prepare: Callable[[Call, str], PreparedCall],
        *,
        changes: bool | None,
        batch: bool,
    ) -> list[tuple[ScriptReply, PreparedCall]]:
        """Run calls of one organization, prepared for the timezone the server
        guesses; re-run those a script answered STALE_TZ (a stale call changed
        nothing, so running it again is safe). One call runs its script; a batch
        runs them all in one atomic call of the script's batch form."""
        tz = self._cached_timezone(org_id)
        done: dict[int, tuple[ScriptReply, PreparedCall]] = {}
        pending = list(range(len(calls)))
        for _ in range(3):
            prepared = [prepare(calls[i], tz) for i in pending]
            if batch:
                replies = await self._run_batch(name, prepared, changes)
            else:
                [single] = prepared
                replies = [await self.run(name, single.keys, single.args, changes=changes)]
            stale = []
            for index, call, reply in zip(pending, prepared, replies, strict=True):
                if reply[0] == "STALE_TZ":
                    tz = str(reply[1])
                    self._remember_timezone(org_id, tz)
                    stale.append(index)
                else:
                    done[index] = (reply, call)
            pending = stale
            if not pending:
                return [done[i] for i in range(len(calls))]
        raise StoreError(f"timezone of organization {org_id} keeps changing")

    async def _run_batch(
        self, name: str, prepared: Sequence[PreparedCall], changes: bool | None
    ) -> list[ScriptReply]:
        """Calls of one organization as one call of the script's batch form."""
        keys: list[str] = []
        counts: list[ScriptArg] = []
        args: list[ScriptArg] = []
        for call in prepared:
            keys += call.keys
            counts += [len(call.keys), len(call.args)]
            args += call.args
        replies: list[ScriptReply] = await self.run(
            f"{name}_batch", keys, [len(prepared), *counts, *args], changes=changes
        )
        return replies

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

        Every script call of the server comes through here (single calls, batches,
        the coalesced and replica-acknowledged paths, every Redis mode), so this is
        where a traced call gets its script span.
        """
        if self._tracer is None:
            return await self._run(name, keys, args, changes)
        with self._tracer.start_as_current_span(
            f"script {name}",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "redis",
                "db.operation.name": "EVALSHA",
                "pagemeter.script": name,
                "pagemeter.script_keys": len(keys),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await self._run(name, keys, args, changes)
            except Exception as error:
                # A refusal the rules decided is a reply, not an exception: what
                # arrives here failed (Redis unreachable, a script error).
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.record_exception(error)
                raise

    async def _run(
        self, name: str, keys: Sequence[str], args: Sequence[ScriptArg], changes: bool | None
    ) -> ScriptReply:
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
            await self._note_event_org(keys, reply)
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

    async def _note_event_org(self, keys: Sequence[str], reply: ScriptReply) -> None:
        """Note the organization of a script call that may have written events; every
        EVENT_ORGS_INTERVAL, write the noted ones to pm:event-orgs (one ZADD). A
        call the script refused (it changed nothing) neither notes nor writes. A
        failure leaves them noted for the next time: it never fails the call, and
        the dispatchers find any stream by SCAN as well."""
        if not self.event_max_per_org or not keys or not keys[-1].endswith(EVSTATE_SUFFIX):
            return
        if not _may_have_changed(reply):
            return
        self._event_orgs.add(keys[-1][len("pm:{") : -len(EVSTATE_SUFFIX)])
        if time.monotonic() - self._event_orgs_written < EVENT_ORGS_INTERVAL:
            return
        self._event_orgs_written = time.monotonic()
        noted, self._event_orgs = self._event_orgs, set()
        try:
            await note_event_orgs(self.client, noted)
        except (redis.exceptions.RedisError, OSError):
            self._event_orgs |= noted

    # -- CheckQuota -------------------------------------------------------------

    async def check(self, org_id: str, call: CheckCall, *, now_ms: int) -> CheckResult:
        reply, prepared = await self.call_in_timezone(
            org_id,
            "check",
            lambda tz: self._prepare_check(org_id, call, now_ms, tz),
            changes=call.hold,
        )
        return self._check_result(org_id, reply, prepared)

    async def check_batch(
        self, org_id: str, calls: Sequence[CheckCall], *, now_ms: int
    ) -> list[CheckResult | StoreError]:
        """Several checks of one organization in one atomic script call, in order."""
        return await self._batch(
            org_id,
            "check",
            calls,
            lambda call, tz: self._prepare_check(org_id, call, now_ms, tz),
            lambda reply, prepared: self._check_result(org_id, reply, prepared),
            changes=any(call.hold for call in calls),
        )

    def _prepare_check(self, org_id: str, call: CheckCall, now_ms: int, tz: str) -> PreparedCall:
        keys = OrgKeys(org_id)
        month = self._month_at(now_ms, tz)
        flat_units = [item for pair in sorted(call.units.items()) for item in pair]
        rollover_keys, rollover_bounds = self._rollover_context(keys, month, tz)
        return PreparedCall(
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
                *self._window_keys(keys, now_ms, tz),
                *rollover_keys,
                keys.events,
                keys.evstate,
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
                self.record_ttl_ms if call.record_ttl_ms is None else call.record_ttl_ms,
                call.request_id,
                now_ms - self.record_ttl_ms,
                self.max_records_per_org,
                rollover_bounds,
                self.event_spec(),
                len(call.units),
                *flat_units,
            ],
            month,
            tz,
            now_ms,
        )

    def _check_result(self, org_id: str, reply: ScriptReply, prepared: PreparedCall) -> CheckResult:
        month = prepared.month
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
        metrics = [metric_check(row) for row in split_rows(rows)]
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
            now_ms=prepared.instant_ms,
            spans=self._spans_for(metrics, prepared.instant_ms, prepared.timezone),
        )

    # -- RecordUsage ------------------------------------------------------------

    async def record(self, org_id: str, call: RecordCall, *, now_ms: int) -> RecordResult:
        reply, prepared = await self.call_in_timezone(
            org_id, "record", lambda tz: self._prepare_record(org_id, call, now_ms, tz)
        )
        return self._record_result(reply, prepared)

    async def record_batch(
        self, org_id: str, calls: Sequence[RecordCall], *, now_ms: int
    ) -> list[RecordResult | StoreError]:
        """Several records of one organization in one atomic script call, in order."""
        return await self._batch(
            org_id,
            "record",
            calls,
            lambda call, tz: self._prepare_record(org_id, call, now_ms, tz),
            lambda reply, prepared: self._record_result(reply, prepared),
        )

    async def _batch(
        self,
        org_id: str,
        name: str,
        calls: Sequence[Call],
        prepare: Callable[[Call, str], PreparedCall],
        answer: Callable[[ScriptReply, PreparedCall], Outcome],
        *,
        changes: bool | None = None,
    ) -> list[Outcome | StoreError]:
        """Calls of one organization as one batch: each item's answer, or the store
        error it ended in (the other items go on)."""
        replies = await self._calls_in_timezone(
            org_id, name, calls, prepare, changes=changes, batch=True
        )
        return [
            item_outcome(functools.partial(answer, reply, prepared)) for reply, prepared in replies
        ]

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
        month = self._month_at(call.completed_ms, tz)
        minute, hour, day, week = self._windows_at(call.completed_ms, tz)
        rollover_keys, rollover_bounds = self._rollover_context(keys, month, tz)
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
                keys.day_named(day.window_id),
                keys.records_index,
                keys.unplanned,
                keys.doctypes,
                keys.window("minute", minute.window_id),
                keys.window("hour", hour.window_id),
                keys.window("week", week.window_id),
                *rollover_keys,
                keys.events,
                keys.evstate,
            ],
            [
                now_ms,
                tz,
                self.default_timezone,
                month.period_id,
                month.end_ms + self.usage_retention_ms,
                self.record_ttl_ms if call.record_ttl_ms is None else call.record_ttl_ms,
                payload_fp,
                "1" if call.success else "0",
                call.completed_ms,
                "" if call.requested_ms is None else call.requested_ms,
                call.document_type,
                call.request_id,
                day.end_ms + self.usage_retention_ms,
                now_ms - self.record_ttl_ms,
                self.max_records_per_org,
                self.max_unplanned_metrics,
                self.max_document_types,
                # A name last recorded before this has no counter left: its
                # month ended more than the usage retention ago.
                now_ms - self.usage_retention_ms - NAMES_GRACE_MS,
                minute.end_ms,
                hour.end_ms,
                week.end_ms,
                rollover_bounds,
                self.event_spec(),
                len(call.units),
                *flat_units,
            ],
            month,
            tz,
            call.completed_ms,
        )

    # -- ReleaseQuota -----------------------------------------------------------

    async def release(self, org_id: str, request_id: str, *, now_ms: int) -> ReleaseResult:
        keys = OrgKeys(org_id)
        outcome, parts, expired = await self.run(
            "release",
            [
                keys.holds,
                keys.holddata,
                keys.held,
                keys.record(request_id),
                keys.events,
                keys.evstate,
            ],
            [now_ms, request_id, self.record_ttl_ms, self.event_spec()],
        )
        return ReleaseResult(
            outcome=outcome, released=held_units(parts), expired=held_units(expired)
        )

    # -- GetUsage ---------------------------------------------------------------

    async def usage(
        self, org_id: str, *, now_ms: int, year_month: tuple[int, int] | None = None
    ) -> UsageSnapshot:
        keys = OrgKeys(org_id)

        def prepare(tz: str) -> PreparedCall:
            billing = calendar(tz)
            month = (
                billing.period_at(now_ms)
                if year_month is None
                else billing.period_starting_in(*year_month)
            )
            return PreparedCall(
                [
                    keys.plan,
                    keys.holds,
                    keys.holddata,
                    keys.held,
                    keys.credits,
                    keys.month(month.period_id),
                    keys.lifetime,
                    keys.month(month.previous(billing).period_id),
                    keys.planlog,
                    keys.planver,
                    keys.events,
                    keys.evstate,
                ],
                # A month's terms are the plan's at its end (now for the current one).
                [
                    now_ms,
                    tz,
                    self.default_timezone,
                    min(month.end_ms, now_ms + 1),
                    period_bounds(month, month.previous(billing)),
                    self.event_spec(),
                ],
                month,
                tz,
            )

        reply, prepared = await self.call_in_timezone(org_id, "usage", prepare)
        (
            _,
            plan_json,
            version,
            month_flat,
            life_flat,
            held_flat,
            credit_flat,
            prev_flat,
            gone,
            rollover_flat,
        ) = reply
        plan = StoredPlan(plan_doc_from_json(plan_json), int(version), 0) if plan_json else None
        return UsageSnapshot(
            plan=plan,
            timezone=prepared.timezone,
            month=prepared.month,
            month_fields=int_pairs(month_flat),
            lifetime_fields=int_pairs(life_flat),
            held_fields=int_pairs(held_flat),
            credits=credit_balances(flat_fields(credit_flat, rollover_flat), now_ms),
            previous_month_fields=int_pairs(prev_flat),
            expired=held_units(gone),
        )

    # -- plans and credits ------------------------------------------------------

    async def set_plan(
        self, org_id: str, doc: PlanDoc, *, now_ms: int, actor: str = ""
    ) -> StoredPlan:
        keys = OrgKeys(org_id)
        migrated = await self._plans_migrated()
        if not migrated and needs_schema_2(doc):
            raise PlansNotMigrated(
                "windows, shadow limits, spend caps, rollovers and billing anchors need the "
                "current plan document, and this deployment still writes "
                "plans the way earlier releases read them: once every server runs this "
                "release, run `pagemeter-server migrate-plans` (docs/operations.md, upgrading)"
            )
        for _ in range(SET_PLAN_ATTEMPTS):
            stored = await self.get_plan(org_id)
            joined = with_calendar(doc, stored.doc if stored else None, now_ms)
            reply = await self.run(
                "set_plan",
                [
                    keys.plan,
                    keys.planlog,
                    keys.planver,
                    keys.audit,
                    keys.unplanned,
                    keys.lifetime,
                    keys.events,
                    keys.evstate,
                ],
                [
                    plan_doc_json(joined) if migrated else schema_1_json(joined),
                    now_ms,
                    now_ms - self.usage_retention_ms,
                    actor,
                    self.audit_max_events,
                    stored.doc.get("calendar", "") if stored else "",
                    self.event_spec(),
                ],
            )
            if reply[0] != "STALE_CALENDAR":
                break
        else:
            raise StoreUnavailable("the plan's billing calendar kept changing; retry")
        version, doc = reply[0], joined
        self._remember_timezone(org_id, plan_token(doc))
        self._remember_policy(org_id, doc["store_failure_policy"], doc["metrics"])
        await self.client.zadd(ORGS_KEY, {org_id: 0})
        # The thresholds under the new terms: crossed, resolved or dropped.
        await self.sweep_alerts(org_id, now_ms=now_ms, reason=PLAN_CHANGED)
        return StoredPlan(doc, int(version), now_ms)

    async def sweep_alerts(self, org_id: str, *, now_ms: int, reason: str = NO_LONGER_HOLDS) -> int:
        """Watch every notification threshold of the organization at now_ms
        (alerts.lua); the number of events it wrote."""
        if not self.event_max_per_org:
            return 0
        keys = OrgKeys(org_id)

        def prepare(tz: str) -> PreparedCall:
            month = self._month_at(now_ms, tz)
            return PreparedCall(
                [
                    keys.plan,
                    keys.credits,
                    keys.month(month.period_id),
                    keys.lifetime,
                    keys.events,
                    keys.evstate,
                ],
                [now_ms, tz, self.default_timezone, month.period_id, self.event_spec(), reason],
                month,
                tz,
            )

        reply, _ = await self.call_in_timezone(org_id, "alerts", prepare)
        return int(reply[1])

    async def _plans_migrated(self) -> bool:
        """Whether plans are written in the current schema (else in schema 1).

        Schema 1 until the deployment's plans were migrated, because a server of
        an earlier release may still be running and reads only that
        (store/plan_migration.py). Once seen, the marker is not read again. Schema
        1 is the safe answer when the marker cannot be read: every server reads it.
        """
        if not self._plans_migrated_seen and self.available([PLAN_SCHEMA_KEY]):
            try:
                marker = await self.client.get(PLAN_SCHEMA_KEY)
            except redis.exceptions.RedisError:
                return False
            self._plans_migrated_seen = marker == str(SCHEMA)
        return self._plans_migrated_seen

    async def plan_orgs(self, after: str, count: int) -> tuple[list[str], bool]:
        """Up to `count` organizations with a plan, by id, after `after` ('' for the
        first); and whether more follow."""
        low = f"({after}" if after else "-"
        orgs = cast(
            list[str], await self.client.zrangebylex(ORGS_KEY, low, "+", start=0, num=count + 1)
        )
        return orgs[:count], len(orgs) > count

    async def get_plans(self, org_ids: Sequence[str]) -> list[StoredPlan | None]:
        """Several organizations' plans in one pipelined read (not one call each: a
        page of a thousand must not take a thousand connections)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for org_id in org_ids:
                pipe.hgetall(OrgKeys(org_id).plan)
            replies = cast(list[dict[str, str]], await pipe.execute())
        return [_stored_plan(raw) for raw in replies]

    async def get_plan(self, org_id: str) -> StoredPlan | None:
        raw = cast(dict[str, str], await self.client.hgetall(OrgKeys(org_id).plan))
        return _stored_plan(raw)

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
        effective_ms: int | None = None,
        expires_ms: int | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> tuple[int, bool]:
        keys = OrgKeys(org_id)
        # A grant with none of the newer terms keeps the fingerprint earlier
        # releases gave it, and a retry that lets the server default
        # effective_at again is the same grant.
        terms = (effective_ms, expires_ms, priority)
        newer_terms = terms if terms != (None, None, DEFAULT_PRIORITY) else ()
        reply = await self.run(
            "grant",
            [
                keys.plan,
                keys.credits,
                keys.grant(grant_id),
                keys.audit,
                keys.events,
                keys.evstate,
            ],
            [
                metric,
                units,
                fingerprint("grant", metric, units, reason, *newer_terms),
                self.usage_retention_ms,
                now_ms,
                reason,
                actor,
                self.audit_max_events,
                now_ms if effective_ms is None else effective_ms,
                expires_ms or 0,
                priority,
                MAX_LIVE_GRANTS,
                grant_id,
                self.event_spec(),
            ],
        )
        if reply[0] == "NO_PLAN":
            raise PlanMissing("the organization has no plan")
        if reply[0] == "UNKNOWN_METRIC":
            raise PlanMissing(f"metric {metric!r} is not in the organization's plan")
        if reply[0] == "REUSED":
            raise RequestIdReused("granted")
        if reply[0] == "TOO_MANY_GRANTS":
            raise LimitReached(
                f"the organization has {MAX_LIVE_GRANTS} credit grants that can still count; "
                "void one, or wait until some run out or expire",
                "TOO_MANY_CREDIT_GRANTS",
            )
        return int(reply[1]), reply[2] == "1"

    async def void_grant(
        self, org_id: str, grant_id: str, reason: str, *, now_ms: int, actor: str = ""
    ) -> tuple[int, bool]:
        """(units voided, already voided); GrantNotFound when there is no such grant."""
        keys = OrgKeys(org_id)

        def prepare(tz: str) -> PreparedCall:
            month = self._month_at(now_ms, tz)
            rollover_keys, rollover_bounds = self._rollover_context(keys, month, tz)
            return PreparedCall(
                [
                    keys.credits,
                    keys.audit,
                    keys.plan,
                    keys.month(month.period_id),
                    *rollover_keys,
                    keys.events,
                    keys.evstate,
                ],
                [
                    grant_id,
                    now_ms,
                    reason,
                    actor,
                    self.audit_max_events,
                    tz,
                    self.default_timezone,
                    rollover_bounds,
                    self.event_spec(),
                ],
                month,
                tz,
            )

        reply, _ = await self.call_in_timezone(org_id, "void_grant", prepare)
        if reply[0] == "NOT_FOUND":
            why = (
                "a rollover grant exists only for the billing period in progress, and only "
                "when the plan rolls over the metric's unused quota"
                if grant_id.startswith(ROLLOVER_PREFIX)
                else "or it ran out and was dropped"
            )
            raise NotFound(
                f"the organization has no credit grant {grant_id!r} ({why})", "GRANT_NOT_FOUND"
            )
        return int(reply[1]), reply[2] == "1"

    async def credit_grants(self, org_id: str, *, now_ms: int) -> list[Grant]:
        """The organization's grants, in draw order per metric, with the rollover
        grants of the billing period at now_ms."""
        keys = OrgKeys(org_id)

        def prepare(tz: str) -> PreparedCall:
            month = self._month_at(now_ms, tz)
            rollover_keys, rollover_bounds = self._rollover_context(keys, month, tz)
            return PreparedCall(
                [keys.plan, keys.credits, keys.month(month.period_id), *rollover_keys],
                [now_ms, tz, self.default_timezone, rollover_bounds],
                month,
                tz,
            )

        reply, _ = await self.call_in_timezone(org_id, "list_grants", prepare)
        return parse_credits(flat_fields(reply[1], reply[2]))


def _stored_plan(raw: dict[str, str]) -> StoredPlan | None:
    """A plan hash as read, or None when the organization has no plan."""
    if "json" not in raw:
        return None
    return StoredPlan(plan_doc_from_json(raw["json"]), int(raw["version"]), int(raw["updated_ms"]))


# SetPlan reads the stored calendar, joins the new anchor to it and stores the
# plan only if the calendar is still the one read; tries this often.
SET_PLAN_ATTEMPTS = 5


def with_calendar(doc: PlanDoc, stored: PlanDoc | None, now_ms: int) -> PlanDoc:
    """The plan `doc` (whose calendar, if any, is the anchor it asks for) joined
    to the billing calendar the organization had: a new anchor applies from the
    end of the period in progress (Calendar.with_anchor)."""
    wanted = parse_segments(doc.get("calendar", ""))[-1]
    if stored is None:
        return doc
    # The periods so far, in the timezone the plan now has.
    had = Calendar(doc["timezone"], parse_segments(stored.get("calendar", "")))
    joined = had.with_anchor(wanted.kind, wanted.anchor_ms, now_ms)
    result = cast(PlanDoc, {k: v for k, v in doc.items() if k != "calendar"})
    spec = segments_spec(joined.segments)
    if spec:
        result["calendar"] = spec
    return result


# The first element of a script's answer when it refused the call and changed
# nothing (store/lua/*.lua, "Returns").
REFUSALS = frozenset(
    {
        "ERR",
        "REUSED",
        "NEGATIVE",
        "TOO_MANY_METRICS",
        "NO_PLAN",
        "UNKNOWN_METRIC",
        "STALE_TZ",
        "STALE_CALENDAR",
        "RATE_LIMITED",
        "NOT_FOUND",
        "TOO_MANY_GRANTS",
    }
)


def _may_have_changed(reply: ScriptReply) -> bool:
    """Whether a script's answer (or, for a batch, any item's) is not a refusal."""
    if reply and isinstance(reply[0], list):
        return any(_may_have_changed(item) for item in reply)
    return not (reply and isinstance(reply[0], str) and reply[0] in REFUSALS)


def flat_fields(*flat_lists: Any) -> dict[str, str]:
    """Fields and values of HGETALL-like flat arrays, merged (later lists win)."""
    fields: dict[str, str] = {}
    for flat in flat_lists:
        fields.update({str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)})
    return fields


def period_bounds(month: Month, previous: Month) -> str:
    """A period's bounds as the scripts read them (_lib.lua, rollover_period)."""
    return f"{month.period_id}|{month.start_ms}|{month.end_ms}|{previous.start_ms}"
