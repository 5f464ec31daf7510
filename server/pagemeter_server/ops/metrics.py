"""Prometheus metrics of the service, on a registry the caller owns.

Labels stay low-cardinality: metric names come only from plans (a bounded set,
see ServiceMetrics.metric_label), never org ids, request ids or keys. (The
per-organization gauges are a separate collector, exporter.py, labelled by org
on purpose, capped per scrape and switchable per replica.)

The gRPC metrics use the names go-grpc-prometheus and py-grpc-prometheus made
familiar, so existing dashboards and alerts work unchanged.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from pagemeter_server import __version__

GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# Series per metric name are bounded: plan metric names up to this many (across
# all organizations), then "_other"; names outside a plan are "_unplanned".
MAX_METRIC_LABELS = 1000
UNPLANNED_LABEL = "_unplanned"
OTHER_LABEL = "_other"


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._metric_labels: set[str] = set()
        # Series already looked up, by (family, label values): labels() costs a
        # few µs per call, several times per decision. Bounded as the label
        # values are (metric_label, reasons, codes).
        self._series: dict[tuple[int, tuple[str, ...]], Any] = {}
        # -- the HTTP/JSON API (gateway/): its calls are not gRPC's -------------------------
        # The route label is the path template of the contract (a bounded set), or
        # "unmatched"; never the path itself, which carries org ids.
        self.http_requests = Counter(
            "pagemeter_http_requests",
            "HTTP/JSON API requests answered, by route template, HTTP method and status.",
            ["route", "http_method", "status"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "pagemeter_http_request_duration_seconds",
            "Time from an HTTP/JSON API request's arrival to its answer, by route template.",
            ["route", "http_method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # -- gRPC, as go-grpc-prometheus names them -------------------------------------
        self.grpc_started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            GRPC_LABELS,
            registry=registry,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*GRPC_LABELS, "grpc_code"],
            registry=registry,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            GRPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.grpc_received = Counter(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server.",
            GRPC_LABELS,
            registry=registry,
        )
        self.grpc_sent = Counter(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server.",
            GRPC_LABELS,
            registry=registry,
        )
        # -- the rules ----------------------------------------------------------------------
        self.decisions = Counter(
            "pagemeter_check_decisions",
            "CheckQuota decisions per metric, by decision (allowed/denied) and reason.",
            ["metric", "decision", "reason"],
            registry=registry,
        )
        self.units = Counter(
            "pagemeter_units",
            "Units by what happened to them: admitted (allowed by CheckQuota), held, "
            "committed, released, expired (holds that ran out).",
            ["metric", "kind"],
            registry=registry,
        )
        self.overage_units = Counter(
            "pagemeter_overage_units",
            "Units committed beyond contract quota and prepaid credits (billed as overage).",
            ["metric"],
            registry=registry,
        )
        self.shadow_denials = Counter(
            "pagemeter_shadow_denials",
            "CheckQuota decisions per metric that a shadow limit would have denied (it did "
            "not), by the reason it would have given and its window ('' for a shadow hard "
            "limit).",
            ["metric", "reason", "window"],
            registry=registry,
        )
        self.fail_open = Counter(
            "pagemeter_fail_open_decisions",
            "CheckQuota calls admitted without a check because Redis was unreachable and the "
            "store failure policy is open.",
            ["metric"],
            registry=registry,
        )
        self.unplanned_refusals = Counter(
            "pagemeter_unplanned_metric_refusals",
            "RecordUsage calls refused because they named a metric outside the plan and the "
            "organization already records --max-unplanned-metrics of them.",
            registry=registry,
        )
        self.folded_document_types = Counter(
            "pagemeter_document_types_folded",
            "Jobs whose document type counted as '_other' in the statistics (the organization "
            "uses --max-document-types types).",
            registry=registry,
        )
        self.records = Counter(
            "pagemeter_records",
            "RecordUsage results by status (completed/failed) and whether a duplicate.",
            ["status", "duplicate"],
            registry=registry,
        )
        # -- the store ----------------------------------------------------------------------
        self.script_seconds = Histogram(
            "pagemeter_redis_script_seconds",
            "Latency of Redis Lua script calls.",
            ["script"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.script_errors = Counter(
            "pagemeter_redis_script_errors",
            "Redis Lua script calls that failed.",
            ["script"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "pagemeter_redis_up",
            "1 when the last health probe of Redis succeeded (in a cluster: when at least "
            "one primary answered), else 0.",
            registry=registry,
        )
        self.redis_primaries_down = Gauge(
            "pagemeter_redis_primaries_down",
            "Cluster primaries the last health probe could not reach; the organizations of "
            "their slots are refused at once until a replica takes over (0 outside a cluster).",
            registry=registry,
        )
        self.store_persistent = Gauge(
            "pagemeter_store_persistent",
            "1 when every server of the store keeps an append-only file (appendonly yes), "
            "0 when one does not (acknowledged usage would be lost at its restart).",
            registry=registry,
        )
        self.serving = Gauge(
            "pagemeter_serving",
            "1 while grpc.health.v1 reports SERVING, 0 while NOT_SERVING (Redis down or draining).",
            registry=registry,
        )
        Info("pagemeter_build", "pagemeter build information.", registry=registry).info(
            {"version": __version__}
        )

    def metric_label(self, metric: str, planned: bool = True) -> str:
        """The `metric` label for a metric name, from a bounded set.

        Names come from callers as well as plans: a metric outside its
        organization's plan is labelled "_unplanned", and past the first
        MAX_METRIC_LABELS plan metric names seen, "_other". So no caller can
        grow a series per name they invent.
        """
        if not planned:
            return UNPLANNED_LABEL
        if metric in self._metric_labels:
            return metric
        if len(self._metric_labels) < MAX_METRIC_LABELS:
            self._metric_labels.add(metric)
            return metric
        return OTHER_LABEL

    def series(self, family: Any, *labels: str) -> Any:
        """family.labels(*labels), looked up once."""
        key = (id(family), labels)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = family.labels(*labels)
        return found

    def observe_script(self, script: str, seconds: float, ok: bool) -> None:
        self.series(self.script_seconds, script).observe(seconds)
        if not ok:
            self.script_errors.labels(script).inc()

    def count_units(self, kind: str, units: dict[str, int]) -> None:
        """Units of holds (held, released, expired): holds exist only for plan metrics."""
        for metric, amount in units.items():
            if amount > 0:
                self.units.labels(self.metric_label(metric), kind).inc(amount)
