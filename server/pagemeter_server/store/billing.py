"""The store side of billing: closing a billing month per organization, and the
figures an export of it reads.

A close reads the organization's period hashes and plan log, computes the
figures (domain/billing.py, GetUsageHistory's own arithmetic) and hands them to
billing_close.lua, which writes them only if the hashes are still what was read,
with the audit event, in one atomic step under the organization's hash tag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

from pagemeter_server.domain.billing import (
    KIND_ADJUSTMENT,
    KIND_CLOSED,
    KIND_OPEN,
    BillingMonth,
    PeriodBill,
    Snapshot,
    adjustment,
    hash_fingerprint,
    parse_snapshot,
    period_bill,
    period_named,
    periods_ending_in,
    snapshot_json,
)
from pagemeter_server.domain.decisions import PlanVersion
from pagemeter_server.domain.errors import StoreError
from pagemeter_server.domain.history import plan_in_effect
from pagemeter_server.domain.periods import Month, calendar
from pagemeter_server.domain.plans import plan_token
from pagemeter_server.store.keys import OrgKeys
from pagemeter_server.store.quota import Store
from pagemeter_server.store.reports import ReportStore

CloseOutcome = Literal["closed", "already_closed", "no_period"]
# Organizations worked on at once by a close or an export page: bounded so that
# one billing run never takes every Redis connection of the server.
CONCURRENCY = 16
# A close re-reads an organization whose counters moved between its read and
# its script call (a record landing in a closed period at that moment); it
# gives up after this many tries.
CLOSE_ATTEMPTS = 5

T = TypeVar("T")


@dataclass(frozen=True)
class BilledPeriod:
    """A row group of an export: one period's figures of one kind."""

    kind: str  # domain.billing KIND_*
    bill: PeriodBill
    closed_ms: int  # 0 for open rows


@dataclass(frozen=True)
class _OrgState:
    token: str
    periods: list[Month]
    raw: list[dict[str, str]]
    versions: list[PlanVersion]


def close_key(org_id: str, billing_month: BillingMonth) -> str:
    return f"{OrgKeys(org_id).prefix}close:{billing_month.label}"


class BillingStore:
    def __init__(self, store: Store, reports: ReportStore) -> None:
        self.store = store
        self.reports = reports
        self.client = store.client

    async def each_org(
        self, org_ids: Sequence[str], work: Callable[[str], Awaitable[T]]
    ) -> list[T]:
        """work(org) for each organization, CONCURRENCY at a time, in order."""
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(org_id: str) -> T:
            async with gate:
                return await work(org_id)

        return list(await asyncio.gather(*(one(org_id) for org_id in org_ids)))

    async def _state(self, org_id: str, month: BillingMonth) -> _OrgState | None:
        """The organization's calendar, periods of the month, their hashes as
        stored, and the plan log; None without a plan."""
        plan = await self.store.get_plan(org_id)
        if plan is None:
            return None
        token = plan_token(plan.doc)
        periods = periods_ending_in(calendar(token), month)
        versions = await self.reports.plan_versions(org_id)
        if not versions:
            # A plan stored before the plan log existed: its terms are all we know.
            versions = [PlanVersion(plan.version, 0, plan.doc)]
        keys = OrgKeys(org_id)
        raw = await self._raw_hashes([keys.month(p.period_id) for p in periods])
        return _OrgState(token, periods, raw, versions)

    async def _raw_hashes(self, names: Sequence[str]) -> list[dict[str, str]]:
        """The hashes as Redis returns them (the close compares them as text)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            replies = await pipe.execute()
        return cast(list[dict[str, str]], replies)

    async def close_org(
        self, org_id: str, month: BillingMonth, *, now_ms: int, actor: str
    ) -> CloseOutcome:
        keys = OrgKeys(org_id)
        for _ in range(CLOSE_ATTEMPTS):
            state = await self._state(org_id, month)
            if state is None or not state.periods:
                return "no_period"
            snapshot = Snapshot(month.label, now_ms, tuple(_bills(state)))
            reply = await self.store.run(
                "billing_close",
                [
                    keys.plan,
                    close_key(org_id, month),
                    keys.audit,
                    *(keys.month(p.period_id) for p in state.periods),
                ],
                [
                    now_ms,
                    state.token,
                    self.store.default_timezone,
                    month.label,
                    snapshot_json(snapshot),
                    actor,
                    self.store.audit_max_events,
                    *(hash_fingerprint(fields) for fields in state.raw),
                ],
            )
            if reply[0] == "OK":
                return "closed"
            if reply[0] == "CLOSED":
                return "already_closed"
            if reply[0] == "NO_PLAN":
                return "no_period"
            # STALE_TZ (the plan changed its calendar) or CHANGED: read again.
        raise StoreError(f"the counters of organization {org_id} kept changing during the close")

    async def org_rows(
        self, org_id: str, month: BillingMonth, *, now_ms: int
    ) -> list[BilledPeriod]:
        """An organization's rows of the month: the frozen figures and what changed
        since, once closed; the current figures before."""
        frozen_json = await self.client.hget(close_key(org_id, month), "json")
        state = await self._state(org_id, month)
        if frozen_json is None:
            if state is None:
                return []
            return [BilledPeriod(KIND_OPEN, bill, 0) for bill in _bills(state)]
        snapshot = parse_snapshot(cast(str, frozen_json))
        rows = [BilledPeriod(KIND_CLOSED, bill, snapshot.closed_ms) for bill in snapshot.periods]
        # The current figures of the frozen periods (the ones closed, even if the
        # plan's calendar has changed since), priced as GetUsageHistory prices them.
        versions = state.versions if state else []
        raw = await self._raw_hashes(
            [OrgKeys(org_id).month(bill.period_id) for bill in snapshot.periods]
        )
        for bill, fields in zip(snapshot.periods, raw, strict=True):
            if bill.end_ms + self.store.usage_retention_ms <= now_ms:
                continue  # its counters are gone: nothing can have changed since
            period = period_named(bill.period_id, bill.start_ms, bill.end_ms)
            current = period_bill(
                period,
                {name: int(value) for name, value in fields.items()},
                plan_in_effect(versions, period.end_ms),
            )
            change = adjustment(bill, current)
            if change.metrics:
                rows.append(BilledPeriod(KIND_ADJUSTMENT, change, snapshot.closed_ms))
        return rows


def _bills(state: _OrgState) -> list[PeriodBill]:
    return [
        period_bill(
            period,
            {name: int(value) for name, value in fields.items()},
            plan_in_effect(state.versions, period.end_ms),
        )
        for period, fields in zip(state.periods, state.raw, strict=True)
    ]
