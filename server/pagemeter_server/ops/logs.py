"""Logging: one JSON object per line (or plain text), at a configurable level.

Structured fields travel in `extra={"fields": {...}}` and become top-level keys
of the JSON line. Nothing here ever formats request metadata, so credentials
cannot reach the log; the Redis URL is never logged either.

A line written inside a traced call (ops/tracing.py) carries the trace and span
ids of the span then active, so a log line leads to its trace and back.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace


class JsonLines(logging.Formatter):
    """{"ts", "level", "logger", "message", ...fields} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        entry.update(trace_fields())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def trace_fields() -> dict[str, str]:
    """`trace_id` and `span_id` (hex, as tracing back ends show them) of the span
    active where the line is formatted, or nothing outside one. The handlers here
    format in the logging call itself, so in the context of the call that logs."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(span_context.trace_id),
        "span_id": trace.format_span_id(span_context.span_id),
    }


class PlainText(logging.Formatter):
    """The message, then its structured fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        fields = {**fields, **trace_fields()} if isinstance(fields, dict) else trace_fields()
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return text


def setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else PlainText())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
