"""Property test: random sequences of calls agree with a plain-Python model of the rules.

Hypothesis draws a plan (quota, hard limit, overage and minute, hour and day
windows, hard or soft, for two metrics, and calendar months or a billing anchor
a few hours after the start, so that some runs cross an anniversary), prepaid
credit grants (each with a priority and maybe an expiry, so that grants run
out and expire under open holds), a rollover of the previous period's unused
quota (the plan is set two months before the calls start, so the previous
period was wholly under it, and again at the start, so the scripts read the
quota the previous period ended with from the plan log) and a sequence of
checks, holds, records, releases and clock moves. Each
step runs on the real Lua scripts and is compared with the model; afterwards the
counters must reconcile exactly with the model's ledger.
"""

from __future__ import annotations

import asyncio
import calendar as gregorian
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_server.domain.decisions import CheckCall, RecordCall
from pagemeter_server.domain.plans import WINDOW_ENUMS, plan_to_doc
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.store.keys import PLAN_SCHEMA_KEY
from pagemeter_server.store.quota import Store
from tests.conftest import START_MS, examples, metric_limits

T = TypeVar("T")

METRICS = ("documents", "pages")
TTL_MS = 10_000
DAY_MS = 86_400_000
PLAN_SET_MS = START_MS - 60 * DAY_MS
# Calendar months are the periods of an anchor on the 1st at midnight (UTC).
FIRST_OF_A_MONTH_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)


@dataclass
class Window:
    kind: str  # "minute" | "hour" | "day"
    limit: int
    soft: bool
    shadow: bool = False


WINDOW_LENGTH_MS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}


@dataclass
class Limits:
    quota: int | None
    hard: int | None
    overage: bool
    windows: list[Window] = field(default_factory=list)
    shadow_hard: int | None = None
    # An overage spend cap, at an overage price of 1 (so in units too).
    spend_cap: int | None = None
    # Rollover of the previous period's unused quota: percent and cap.
    rollover_percent: int | None = None
    rollover_cap: int | None = None


@dataclass
class Hold:
    units: dict[str, int]
    prepaid: dict[str, int]
    expires_ms: int


def anniversary_before(instant_ms: int, anchor_ms: int) -> datetime:
    """The last monthly anniversary of the anchor at or before the instant (UTC):
    the anchor's day of month (or the month's last day) at its time of day."""
    anchor = datetime.fromtimestamp(anchor_ms / 1000, UTC)
    moment = datetime.fromtimestamp(instant_ms / 1000, UTC)
    year, month = moment.year, moment.month
    while True:
        day = min(anchor.day, gregorian.monthrange(year, month)[1])
        candidate = anchor.replace(year=year, month=month, day=day)
        if candidate <= moment:
            return candidate
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)


@dataclass
class CreditGrant:
    grant_id: str
    remaining: int
    effective_ms: int
    expires_ms: int  # 0: never
    priority: int
    # The period whose rollover this is ('' for a granted one).
    rollover_of: str = ""

    def live(self, now_ms: int) -> bool:
        expired = self.expires_ms and now_ms >= self.expires_ms
        return self.remaining > 0 and self.effective_ms <= now_ms and not expired

    def draw_key(self) -> tuple[int, float, int, str]:
        """Lower priority first, then the earliest expiry, then effective, then id."""
        return (self.priority, self.expires_ms or float("inf"), self.effective_ms, self.grant_id)


@dataclass
class Model:
    limits: dict[str, Limits]
    # None: calendar months; else a monthly billing anchor (UTC plan).
    anchor_ms: int | None = None
    now_ms: int = START_MS
    # Per period id: the units committed and the prepaid units used in it.
    committed_in: dict[str, dict[str, int]] = field(default_factory=dict)
    prepaid_used_in: dict[str, dict[str, int]] = field(default_factory=dict)
    grants: dict[str, list[CreditGrant]] = field(default_factory=lambda: {m: [] for m in METRICS})
    holds: dict[str, Hold] = field(default_factory=dict)
    recorded: dict[str, dict[str, int]] = field(default_factory=dict)
    # (completed_ms, units) of every successful record, per metric: what windows count.
    events: dict[str, list[tuple[int, int]]] = field(
        default_factory=lambda: {m: [] for m in METRICS}
    )

    # Per (period id, metric): units drawn from that period's rollover.
    rollover_drawn: dict[tuple[str, str], int] = field(default_factory=dict)

    def period_start(self, instant_ms: int) -> datetime:
        return anniversary_before(instant_ms, self.anchor_ms or FIRST_OF_A_MONTH_MS)

    def period_id(self, instant_ms: int | None = None) -> str:
        start = self.period_start(self.now_ms if instant_ms is None else instant_ms)
        if self.anchor_ms is None:
            return f"{start.year:04d}-{start.month:02d}"
        return start.date().isoformat()

    def rollover(self, metric: str) -> CreditGrant | None:
        """The current period's rollover grant: the previous period's unused quota
        times the percent, rounded down, at most the cap, less what was drawn."""
        lim = self.limits[metric]
        if lim.rollover_percent is None or lim.quota is None:
            return None
        start = int(self.period_start(self.now_ms).timestamp() * 1000)
        end = int(self.period_start(start + 32 * DAY_MS).timestamp() * 1000)
        before = self.committed_in.get(self.period_id(start - 1), {}).get(metric, 0)
        units = max(0, lim.quota - before) * lim.rollover_percent // 100
        if lim.rollover_cap is not None:
            units = min(units, lim.rollover_cap)
        period = self.period_id()
        if units <= 0:
            return None
        left = units - self.rollover_drawn.get((period, metric), 0)
        return CreditGrant(f"rollover-{period}-{metric}", max(0, left), start, end, 50, period)

    def live_grants(self, metric: str) -> list[CreditGrant]:
        rollover = self.rollover(metric)
        grants = self.grants[metric] + ([rollover] if rollover else [])
        return [g for g in grants if g.live(self.now_ms)]

    @property
    def committed(self) -> dict[str, int]:
        """The current billing period's committed units per metric."""
        return self.committed_in.setdefault(self.period_id(), dict.fromkeys(METRICS, 0))

    @property
    def prepaid_used(self) -> dict[str, int]:
        return self.prepaid_used_in.setdefault(self.period_id(), dict.fromkeys(METRICS, 0))

    def balance(self, metric: str) -> int:
        """What the metric's live grants have now."""
        return sum(g.remaining for g in self.live_grants(metric))

    def draw(self, metric: str, units: int) -> None:
        for grant in sorted(self.live_grants(metric), key=CreditGrant.draw_key):
            take = min(units, grant.remaining)
            grant.remaining -= take
            units -= take
            if grant.rollover_of:
                key = (grant.rollover_of, metric)
                self.rollover_drawn[key] = self.rollover_drawn.get(key, 0) + take

    def in_window(self, metric: str, kind: str) -> int:
        """Units committed in the window of `kind` that contains now (UTC plan)."""
        length = WINDOW_LENGTH_MS[kind]
        start = self.now_ms - self.now_ms % length
        return sum(n for at, n in self.events[metric] if start <= at < start + length)

    def window_states(self, metric: str, n: int) -> list[tuple[str, int, bool]]:
        """(kind, used, exceeded) of the metric's windows for a check of n units."""
        states = []
        for w in self.limits[metric].windows:
            used = self.in_window(metric, w.kind) + self.held(metric)
            states.append((w.kind, used, used + n > w.limit))
        return states

    def expire(self) -> None:
        for request_id in [r for r, h in self.holds.items() if h.expires_ms <= self.now_ms]:
            del self.holds[request_id]

    def held(self, metric: str) -> int:
        return sum(h.units.get(metric, 0) for h in self.holds.values())

    def held_prepaid(self, metric: str) -> int:
        return sum(h.prepaid.get(metric, 0) for h in self.holds.values())

    def decide(self, metric: str, n: int) -> tuple[bool, int, int, int, int | None]:
        """(allowed, included, prepaid, overage, max_admissible) for one metric."""
        lim = self.limits[metric]
        used = self.committed[metric] + self.held(metric)
        available = max(0, self.balance(metric) - self.held_prepaid(metric))
        cap = None if lim.hard is None else max(0, lim.hard - used)
        if lim.quota is not None and not lim.overage:
            within = max(0, lim.quota - used) + available
            cap = within if cap is None else min(cap, within)
        included = n if lim.quota is None else min(n, max(0, lim.quota - used))
        prepaid = min(n - included, available)
        overage = n - included - prepaid
        allowed = not (lim.hard is not None and used + n > lim.hard) and not (
            overage > 0 and not lim.overage
        )
        if lim.spend_cap is not None and lim.quota is not None and lim.overage:
            taken = max(0, used - lim.quota - self.prepaid_used[metric] - self.held_prepaid(metric))
            room = max(0, lim.spend_cap - taken)
            within = max(0, lim.quota - used) + available + room
            cap = within if cap is None else min(cap, within)
            allowed = allowed and overage <= room
        for w, (_, window_used, exceeded) in zip(
            lim.windows, self.window_states(metric, n), strict=True
        ):
            if not w.soft and not w.shadow:
                room = max(0, w.limit - window_used)
                cap = room if cap is None else min(cap, room)
                allowed = allowed and not exceeded
        return allowed, included, prepaid, overage, cap

    def would_deny(self, metric: str, n: int) -> int | None:
        """The reason the metric's shadow limits would deny n units with (None: none)."""
        lim = self.limits[metric]
        used = self.committed[metric] + self.held(metric)
        if lim.shadow_hard is not None and used + n > lim.shadow_hard:
            return quota_pb2.DECISION_REASON_HARD_LIMIT_EXCEEDED
        for w, (_, _, exceeded) in zip(lim.windows, self.window_states(metric, n), strict=True):
            if w.shadow and exceeded:
                return quota_pb2.DECISION_REASON_WINDOW_LIMIT_EXCEEDED
        return None

    def commit(self, metric: str, n: int) -> tuple[int, int, int]:
        lim = self.limits[metric]
        before = self.committed[metric]
        included = n if lim.quota is None else min(n, max(0, lim.quota - before))
        reserved = self.held_prepaid(metric)
        prepaid = min(n - included, max(0, self.balance(metric) - reserved))
        self.draw(metric, prepaid)
        self.prepaid_used[metric] += prepaid
        self.committed[metric] += n
        self.events[metric].append((self.now_ms, n))
        return included, prepaid, n - included - prepaid


small_limit = st.none() | st.integers(0, 6) | st.integers(0, 30)
windows_strategy = st.lists(
    st.builds(
        lambda kind, limit, mode: Window(kind, limit, mode == "soft", mode == "shadow"),
        kind=st.sampled_from(list(WINDOW_LENGTH_MS)),
        limit=st.integers(0, 30),
        mode=st.sampled_from(["hard", "soft", "shadow"]),
    ),
    max_size=3,
    unique_by=lambda w: w.kind,
).map(lambda ws: sorted(ws, key=lambda w: WINDOW_LENGTH_MS[w.kind]))
limits_strategy = st.builds(
    Limits,
    quota=small_limit,
    hard=st.none() | st.integers(0, 40),
    overage=st.booleans(),
    windows=windows_strategy,
    shadow_hard=st.none() | st.integers(0, 40),
    spend_cap=st.none() | st.integers(0, 15),
    rollover_percent=st.none() | st.integers(1, 100),
    rollover_cap=st.none() | st.integers(0, 20),
)
units_strategy = st.dictionaries(st.sampled_from(METRICS), st.integers(0, 12), min_size=1)
step_strategy = st.one_of(
    st.tuples(st.just("check"), units_strategy, st.booleans()),
    st.tuples(st.just("record"), units_strategy, st.booleans(), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 30)),
    st.tuples(
        st.just("grant"),
        st.sampled_from(METRICS),
        st.integers(1, 10),
        st.integers(0, 100),  # priority
        st.none() | st.integers(1, 7_200_000),  # expires this long after now
    ),
    st.tuples(st.just("advance"), st.integers(1, 6_000) | st.integers(30_000, 7_200_000)),
)


class Runner:
    """Runs store calls on a private event loop, so Hypothesis can drive them synchronously."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        import redis.asyncio as aioredis

        self.client = aioredis.from_url(url, decode_responses=True)
        self.store = Store(
            self.client, default_timezone="UTC", record_retention_days=40, usage_retention_days=400
        )

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()


@settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# A known-hard case to reach at random: a job recorded without a hold while
# another job holds prepaid credits.
@example(
    limits={"documents": Limits(None, None, True), "pages": Limits(0, None, True)},
    steps=[
        ("grant", "pages", 5, 50, None),
        ("check", {"pages": 3}, True),
        ("record", {"pages": 3}, True, False),
    ],
    anchor=None,
)
# A rollover drawn on, held at an anniversary and expired under the hold.
@example(
    limits={
        "documents": Limits(None, None, True),
        "pages": Limits(5, None, True, rollover_percent=100),
    },
    steps=[
        ("record", {"pages": 7}, True, False),
        ("check", {"pages": 3}, True),
        ("advance", 2000),
        ("record", {"pages": 3}, True, True),
        ("check", {"pages": 3}, False),
    ],
    anchor=START_MS + 1000,
)
@given(
    limits=st.fixed_dictionaries({m: limits_strategy for m in METRICS}),
    steps=st.lists(step_strategy, min_size=4, max_size=40),
    anchor=st.none() | st.integers(1, 6 * 3_600_000).map(lambda after: START_MS + after),
)
def test_scripts_agree_with_the_model(
    redis_server: RedisProcess,
    limits: dict[str, Limits],
    steps: list[tuple[object, ...]],
    anchor: int | None,
) -> None:
    """Every decision and split matches the model, and counters reconcile with its ledger."""
    plain = redis.Redis.from_url(redis_server.url)
    plain.flushall()
    plain.set(PLAN_SCHEMA_KEY, "2")  # windows need the current plan document
    runner = Runner(redis_server.url)
    try:
        _play(runner, Model(limits, anchor), steps)
    finally:
        runner.close()


def _play(runner: Runner, model: Model, steps: list[tuple[object, ...]]) -> None:
    store = runner.store
    plan = plan_pb2.Plan(
        org_id="acme",
        name="Model",
        metrics=[
            metric_limits(
                m,
                overage_allowed=lim.overage,
                windows=[
                    plan_pb2.WindowLimit(
                        window=WINDOW_ENUMS[w.kind],  # type: ignore[index]
                        limit=w.limit,
                        soft=w.soft,
                        shadow=w.shadow,
                    )
                    for w in lim.windows
                ],
                **_optional(lim),
            )
            for m, lim in model.limits.items()
        ],
    )
    if model.anchor_ms is not None:
        plan.billing_anchor.FromMilliseconds(model.anchor_ms)
    # Set two months before, so the previous period was wholly under the plan,
    # and set again now, so the quota it ended with comes from the plan log.
    for set_at in (PLAN_SET_MS, model.now_ms):
        runner.run(store.set_plan("acme", plan_to_doc(plan, "UTC"), now_ms=set_at))
    next_id = 0
    for step in steps:
        kind = step[0]
        model.expire()
        if kind == "advance":
            model.now_ms += int(step[1])  # type: ignore[call-overload]
        elif kind == "grant":
            metric, units = str(step[1]), int(step[2])  # type: ignore[call-overload]
            priority, lasts = int(step[3]), step[4]  # type: ignore[call-overload]
            next_id += 1
            expires = 0 if lasts is None else model.now_ms + int(lasts)  # type: ignore[call-overload]
            runner.run(
                store.grant_credits(
                    "acme",
                    metric,
                    units,
                    f"g{next_id}",
                    "",
                    now_ms=model.now_ms,
                    expires_ms=expires or None,
                    priority=priority,
                )
            )
            model.grants[metric].append(
                CreditGrant(f"g{next_id}", units, model.now_ms, expires, priority)
            )
        elif kind == "check":
            units, hold = dict(step[1]), bool(step[2])  # type: ignore[call-overload]
            next_id += 1
            request_id = f"r{next_id}"
            result = runner.run(
                store.check(
                    "acme",
                    CheckCall(units, request_id=request_id, hold=hold, hold_ttl_ms=TTL_MS),
                    now_ms=model.now_ms,
                )
            )
            expected = {m: model.decide(m, n) for m, n in units.items()}
            expected_windows = {m: model.window_states(m, n) for m, n in units.items()}
            assert result.allowed == all(e[0] for e in expected.values())
            for decision in result.metrics:
                allowed, included, prepaid, overage, cap = expected[decision.metric]
                assert (
                    decision.allowed,
                    decision.included,
                    decision.prepaid,
                    decision.overage,
                ) == (
                    allowed,
                    included,
                    prepaid,
                    overage,
                )
                assert decision.max_admissible == cap
                assert [
                    (w.window, w.used, w.exceeded) for w in decision.windows
                ] == expected_windows[decision.metric]
                assert decision.would_deny == model.would_deny(
                    decision.metric, units[decision.metric]
                )
                assert decision.committed == model.committed[decision.metric]
                assert decision.held == model.held(decision.metric)
            assert result.held == (hold and result.allowed)
            if result.held:
                model.holds[request_id] = Hold(
                    units=dict(units),
                    prepaid={m: expected[m][2] for m in units},
                    expires_ms=model.now_ms + TTL_MS,
                )
        elif kind == "record":
            units, success, of_a_hold = dict(step[1]), bool(step[2]), bool(step[3])  # type: ignore[call-overload]
            # Record the oldest live hold, or a job that never held anything.
            held = next(iter(model.holds), None) if of_a_hold else None
            if held is None:
                next_id += 1
                held = f"r{next_id}"
            request_id = held
            recorded = runner.run(
                store.record(
                    "acme",
                    RecordCall(
                        request_id=request_id,
                        units=units,
                        completed_ms=model.now_ms,
                        completed_given=False,
                        success=success,
                    ),
                    now_ms=model.now_ms,
                )
            )
            had_hold = model.holds.pop(request_id, None) is not None
            assert recorded.hold_released == had_hold
            assert not recorded.duplicate
            for row in recorded.metrics:
                expected_split = (
                    model.commit(row.metric, units[row.metric]) if success else (0, 0, 0)
                )
                assert (row.included, row.prepaid, row.overage) == expected_split
                assert row.committed == model.committed[row.metric]
            if success:
                model.recorded[request_id] = units
        else:  # release
            live = list(model.holds)
            if live:
                request_id = live[int(step[1]) % len(live)]  # type: ignore[call-overload]
                outcome = runner.run(store.release("acme", request_id, now_ms=model.now_ms))
                assert outcome.outcome == "released"
                assert outcome.released == {
                    m: n for m, n in model.holds.pop(request_id).units.items()
                }

    model.expire()
    snapshot = runner.run(store.usage("acme", now_ms=model.now_ms))
    assert snapshot.month.period_id == model.period_id()
    if len(model.committed_in) > 1:
        event("crossed an anniversary")
    if any(
        g.expires_ms and g.expires_ms <= model.now_ms for gs in model.grants.values() for g in gs
    ):
        event("a grant expired")
    if any(model.rollover_drawn.values()):
        event("drew on a rollover")
    for metric in METRICS:
        ledger = sum(units.get(metric, 0) for units in model.recorded.values())
        every_period = sum(period[metric] for period in model.committed_in.values())
        assert every_period == ledger
        assert snapshot.month_fields.get(f"c:{metric}", 0) == model.committed[metric]
        assert snapshot.month_fields.get(f"pp:{metric}", 0) == model.prepaid_used[metric]
        assert snapshot.credits.get(metric, 0) == model.balance(metric) >= 0
        assert snapshot.held_fields.get(f"h:{metric}", 0) == model.held(metric)
        assert snapshot.held_fields.get(f"hp:{metric}", 0) == model.held_prepaid(metric)


def _optional(lim: Limits) -> dict[str, int | str]:
    fields: dict[str, int | str] = {}
    if lim.spend_cap is not None and lim.overage:
        fields["overage_price_per_unit"] = "1"
        fields["overage_spend_cap"] = str(lim.spend_cap)
    if lim.shadow_hard is not None:
        fields["shadow_hard_limit"] = lim.shadow_hard
    if lim.quota is not None:
        fields["contract_quota"] = lim.quota
        if lim.rollover_percent is not None:
            fields["rollover_percent"] = lim.rollover_percent
            if lim.rollover_cap is not None:
                fields["rollover_cap"] = lim.rollover_cap
    if lim.hard is not None:
        fields["hard_limit"] = lim.hard
    return fields
