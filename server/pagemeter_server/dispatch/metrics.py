"""The dispatchers' Prometheus metrics (deploy/prometheus/pagemeter-rules.yml alerts on them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DispatchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "pagemeter_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered (2xx), failed (retried "
            "later), dead_letter (failed past the retry window)",
            ["outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "pagemeter_webhook_failures",
            "Failed webhook delivery attempts by reason: status (a non-2xx answer), "
            "timeout, connection",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "pagemeter_webhook_retries",
            "Webhook delivery attempts that were retries of an event",
            registry=registry,
        )
        self.dead_letters = Counter(
            "pagemeter_webhook_dead_letters",
            "Events given up on after the retry window (--webhook-retry-hours)",
            registry=registry,
        )
        self.lag = Gauge(
            "pagemeter_webhook_lag_seconds",
            "Age of the oldest event this dispatcher has not delivered yet (0: caught up)",
            registry=registry,
        )
        self.duration = Histogram(
            "pagemeter_webhook_delivery_seconds",
            "Time a receiver took to answer a delivery",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.partitions = Gauge(
            "pagemeter_webhook_partitions_owned",
            "Partitions of the organizations this dispatcher delivers (of 64 in all)",
            registry=registry,
        )
