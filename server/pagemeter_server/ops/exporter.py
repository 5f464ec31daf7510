"""The per-organization usage exporter: Prometheus gauges read from Redis at scrape time.

For each organization with a plan (the `pm:orgs` registry that SetPlan keeps,
so no KEYS or SCAN over the keyspace), the current month's figures in the
plan's timezone: committed, held, contract quota, hard limit, overage units and
cost, prepaid balance, labelled by org and metric.

It stays cheap at scale: the reads are pipelined in chunks, at most
--org-exporter-max-orgs organizations are read per scrape (the rest are counted
in pagemeter_org_exporter_skipped_orgs), and --org-exporter-max-orgs 0 switches
it off, so that only one replica of many publishes it.

Scrapes run in prometheus-client's HTTP thread, so the exporter has its own
synchronous Redis client rather than the server's asyncio one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagemeter_server.domain import usage as rules
from pagemeter_server.domain.clock import Clock
from pagemeter_server.domain.credits import credit_balances
from pagemeter_server.domain.decisions import StoredPlan, UsageSnapshot
from pagemeter_server.domain.periods import Month, calendar
from pagemeter_server.domain.plans import plan_doc_from_json, plan_token
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import sync_client_like
from pagemeter_server.store.keys import ORGS_KEY, OrgKeys
from pagemeter_server.store.quota import period_bounds
from pagemeter_server.store.scripts import script_text

log = logging.getLogger("pagemeter.exporter")
CHUNK = 500

_GAUGES = {
    "committed": ("pagemeter_org_committed_units", "Units committed this period (quotaUsed)."),
    "held": ("pagemeter_org_held_units", "Units held by live holds."),
    "quota": ("pagemeter_org_contract_quota_units", "Contract quota of the period."),
    "hard": ("pagemeter_org_hard_limit_units", "Hard limit of the period."),
    "overage": ("pagemeter_org_overage_units", "Units beyond quota and prepaid credits."),
    "prepaid": ("pagemeter_org_prepaid_balance_units", "Prepaid credits left."),
}


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class OrgUsageCollector(Collector):
    def __init__(self, client: redis.Redis, default_timezone: str, max_orgs: int, clock: Clock):
        self.client = client
        self._list_grants = client.register_script(script_text("list_grants"))
        self.default_timezone = default_timezone
        self.max_orgs = max_orgs
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return []  # no Redis reads when the collector is registered

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        labels = ["org", "metric"]
        families = {
            name: GaugeMetricFamily(metric, doc, labels=labels)
            for name, (metric, doc) in _GAUGES.items()
        }
        cost = GaugeMetricFamily(
            "pagemeter_org_overage_cost",
            "Overage units times the overage price, in the plan's currency.",
            labels=[*labels, "currency"],
        )
        exported = skipped = 0
        up = 1
        try:
            total = int(self.client.zcard(ORGS_KEY))
            orgs = cast(list[str], self.client.zrange(ORGS_KEY, 0, self.max_orgs - 1))
            skipped = max(0, total - len(orgs))
            now_ms = self.clock.now_ms()
            for chunk in _chunks(orgs, CHUNK):
                for snapshot, org in self._read(chunk, now_ms):
                    exported += 1
                    self._add(families, cost, org, snapshot, now_ms)
        except (redis.RedisError, OSError) as exc:
            log.warning("per-organization exporter could not read Redis: %s", exc)
            up = 0
        yield from families.values()
        yield cost
        yield GaugeMetricFamily(
            "pagemeter_org_exporter_orgs", "Organizations exported by this scrape.", value=exported
        )
        yield GaugeMetricFamily(
            "pagemeter_org_exporter_skipped_orgs",
            "Organizations with a plan left out of this scrape (over the per-scrape cap).",
            value=skipped,
        )
        yield GaugeMetricFamily(
            "pagemeter_org_exporter_scrape_seconds",
            "Time this scrape spent reading organizations.",
            value=time.perf_counter() - started,
        )
        yield GaugeMetricFamily(
            "pagemeter_org_exporter_up", "1 when the exporter could read Redis.", value=up
        )

    def _read(self, orgs: Sequence[str], now_ms: int) -> list[tuple[UsageSnapshot, str]]:
        """Two pipelined round trips for a chunk: plans and holds, then the months."""
        with self.client.pipeline(transaction=False) as pipe:
            for org in orgs:
                keys = OrgKeys(org)
                pipe.hmget(keys.plan, "json", "version")
                pipe.hgetall(keys.held)
                pipe.hgetall(keys.credits)
                pipe.hgetall(keys.lifetime)
                pipe.zrangebyscore(keys.holds, "-inf", now_ms)
            first: list[Any] = pipe.execute()
        plans, months = [], []
        with self.client.pipeline(transaction=False) as pipe:
            for i, org in enumerate(orgs):
                (plan_json, version), held, credits, lifetime, expired = first[5 * i : 5 * i + 5]
                doc = plan_doc_from_json(plan_json) if plan_json else None
                tz = plan_token(doc) if doc else self.default_timezone
                month = calendar(tz).period_at(now_ms)
                keys = OrgKeys(org)
                pipe.hgetall(keys.month(month.period_id))
                # Always one reply (keyed, so that a cluster pipeline can route
                # it): the data of the holds found expired, or of none.
                pipe.hmget(keys.holddata, expired or ["-"])
                plans.append((doc, int(version or 0), tz, month, held, credits, lifetime))
            second: list[Any] = pipe.execute()
        for i, org in enumerate(orgs):
            doc, version, tz, month, held, credits, lifetime = plans[i]
            if doc is None:
                continue  # the plan was removed since the org was registered
            if any("rollover_percent" in terms for terms in doc["metrics"].values()):
                credits = {**credits, **self._rollover_fields(org, tz, month, now_ms)}
            month_fields, expired_holds = second[2 * i], second[2 * i + 1]
            held_fields = _without_expired(held, expired_holds)
            months.append(
                (
                    UsageSnapshot(
                        plan=StoredPlan(doc, version, 0),
                        timezone=tz,
                        month=month,
                        month_fields=_ints(month_fields),
                        lifetime_fields=_ints(lifetime),
                        held_fields=held_fields,
                        credits=credit_balances(credits, now_ms),
                        previous_month_fields={},
                    ),
                    org,
                )
            )
        return months

    def _rollover_fields(self, org: str, tz: str, month: Month, now_ms: int) -> dict[str, str]:
        """The period's rollover grants, which only the scripts work out
        (list_grants.lua), as credits hash fields; none if the plan's calendar
        changed since it was read (the next scrape has them)."""
        keys = OrgKeys(org)
        previous = month.previous(calendar(tz))
        reply = self._list_grants(
            keys=[
                keys.plan,
                keys.credits,
                keys.month(month.period_id),
                keys.month(previous.period_id),
                keys.planlog,
                keys.planver,
            ],
            args=[now_ms, tz, self.default_timezone, period_bounds(month, previous)],
        )
        if reply[0] != "OK":
            return {}
        flat = reply[2]
        return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}

    @staticmethod
    def _add(
        families: dict[str, GaugeMetricFamily],
        cost: GaugeMetricFamily,
        org: str,
        snapshot: UsageSnapshot,
        now_ms: int,
    ) -> None:
        currency = snapshot.plan.doc["currency"] if snapshot.plan else ""
        for f in rules.usage_figures(snapshot, now_ms=now_ms):
            labels = [org, f.metric]
            families["committed"].add_metric(labels, f.committed)
            families["held"].add_metric(labels, f.held)
            if f.contract_quota is not None:
                families["quota"].add_metric(labels, f.contract_quota)
            if f.hard_limit is not None:
                families["hard"].add_metric(labels, f.hard_limit)
            families["overage"].add_metric(labels, f.overage_units)
            families["prepaid"].add_metric(labels, f.prepaid_balance)
            cost.add_metric([*labels, currency], float(f.overage_cost))


def _ints(raw: dict[str, str]) -> dict[str, int]:
    return {name: int(value) for name, value in raw.items()}


def _without_expired(held: dict[str, str], expired_holds: Any) -> dict[str, int]:
    """Held totals minus holds that expired but no script has purged yet."""
    fields = _ints(held)
    for encoded in expired_holds if isinstance(expired_holds, list) else []:
        for part in filter(None, str(encoded or "").split(";")):
            metric, units, prepaid = part.split(":")
            fields[f"h:{metric}"] = max(0, fields.get(f"h:{metric}", 0) - int(units))
            fields[f"hp:{metric}"] = max(0, fields.get(f"hp:{metric}", 0) - int(prepaid))
    return fields


def register_org_exporter(
    registry: CollectorRegistry, settings: Settings, clock: Clock, client: aioredis.Redis
) -> OrgUsageCollector:
    collector = OrgUsageCollector(
        sync_client_like(client, settings),
        settings.default_timezone,
        settings.org_exporter_max_orgs,
        clock,
    )
    registry.register(collector)
    return collector
