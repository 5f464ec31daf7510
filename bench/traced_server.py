"""`pagemeter-server` with tracing on and every span dropped in the process.

For the tracing phase of `make bench` (docs/performance.md): the spans are made,
filled and handed to the batching processor exactly as with OTLP export, and an
exporter that drops them stands in for OTLP, so the figure is what tracing
costs the server and not what a collector on the same machine costs. Takes
pagemeter-server's arguments. Not part of the product; used by bench/run.py.

    python bench/traced_server.py --listen 127.0.0.1:50098 --redis-url redis://...
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from pagemeter_server.app import main
from pagemeter_server.ops.tracing import EXPORTERS

DROPPING = "bench-drop"


class Dropping(SpanExporter):
    """Accepts every batch of spans and keeps none."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


if __name__ == "__main__":
    EXPORTERS[DROPPING] = Dropping
    os.environ["OTEL_TRACES_EXPORTER"] = DROPPING
    main()
