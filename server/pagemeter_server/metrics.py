"""Prometheus metrics of the service, on a registry the caller owns.

Labels stay low-cardinality: metric names come only from plans, never org ids,
request ids or keys.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info

from pagemeter_server import __version__


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "pagemeter_check_decisions",
            "CheckQuota decisions per metric.",
            ["metric", "decision", "reason"],
            registry=registry,
        )
        self.units = Counter(
            "pagemeter_units",
            "Units by what happened to them: held, committed, released.",
            ["metric", "kind"],
            registry=registry,
        )
        self.records = Counter(
            "pagemeter_records",
            "RecordUsage results.",
            ["status", "duplicate"],
            registry=registry,
        )
        self.script_seconds = Histogram(
            "pagemeter_redis_script_seconds",
            "Latency of Redis Lua script calls.",
            ["script"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.script_errors = Counter(
            "pagemeter_redis_script_errors",
            "Redis Lua script calls that failed.",
            ["script"],
            registry=registry,
        )
        Info("pagemeter_build", "pagemeter build information.", registry=registry).info(
            {"version": __version__}
        )

    def observe_script(self, script: str, seconds: float, ok: bool) -> None:
        self.script_seconds.labels(script).observe(seconds)
        if not ok:
            self.script_errors.labels(script).inc()
