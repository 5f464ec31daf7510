"""A client outbox file: its records, and what a flush did with them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from pagemeter_client.cli.render import text as fmt
from pagemeter_client.outbox import FlushResult, OutboxEntry, OutboxSummary

# Characters of an outbox record's last error shown in the status table (--json: all).
ERROR_WIDTH = 60


def _instant_text(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _clip(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _entry_state(entry: OutboxEntry, now: datetime) -> str:
    return "sending" if entry.state == "pending" and entry.in_flight(now) else entry.state


def render_outbox_status(
    path: str, summary: OutboxSummary, entries: Sequence[OutboxEntry], now: datetime
) -> str:
    sending = f" ({summary.in_flight} being sent)" if summary.in_flight else ""
    header = fmt.fields(
        [
            ("outbox", path),
            ("pending", f"{summary.pending}{sending}"),
            ("dead letters", str(summary.dead)),
            ("oldest pending", _instant_text(summary.oldest_pending)),
            ("next attempt", _instant_text(summary.next_attempt_at)),
        ]
    )
    if not entries:
        return f"{header}\n\nno records"
    rows = [
        [
            str(entry.id),
            _entry_state(entry, now),
            entry.org_id,
            entry.request_id,
            fmt.pairs(sorted(entry.units.items())),
            fmt.yes_no(entry.success),
            entry.document_type or "-",
            _instant_text(entry.completed_at),
            str(entry.attempts),
            _instant_text(entry.next_attempt_at),
            _clip(f"{entry.last_code}: {entry.last_error}") if entry.last_code else "-",
        ]
        for entry in entries
    ]
    headers = [
        "id",
        "state",
        "organization",
        "request id",
        "units",
        "success",
        "document type",
        "completed at",
        "attempts",
        "next attempt",
        "last error",
    ]
    table = fmt.table(headers, rows, left=len(headers))
    shown = len(entries)
    total = summary.pending + summary.dead
    if shown < total:
        table += f"\n\n{total - shown} more (--limit 0 shows all)"
    return f"{header}\n\n{table}"


def render_flush(result: FlushResult) -> str:
    fields = [
        ("delivered", f"{result.delivered} ({result.count('duplicate')} already recorded)"),
        ("deferred", str(result.count("deferred"))),
        ("rejected", str(result.count("rejected"))),
        ("pending now", str(result.pending)),
        ("dead letters", str(result.dead)),
    ]
    if result.leased:
        fields.append(("leased", f"{result.leased} by another flusher {lease_end(result)}"))
    header = fmt.fields(fields)
    if not result.outcomes:
        return f"{header}\n\nnothing to send"
    rows = [
        [
            str(o.entry_id),
            o.org_id,
            o.request_id,
            "already recorded" if o.outcome == "duplicate" else o.outcome,
            _clip(f"{o.code}: {o.message}") if o.code else "-",
        ]
        for o in result.outcomes
    ]
    headers = ["id", "organization", "request id", "result", "error"]
    return f"{header}\n\n{fmt.table(headers, rows, left=len(headers))}"


def lease_end(result: FlushResult) -> str:
    """`until <time>` when other flushers' leases end, or "" when that is not known."""
    if result.leased_until is None:
        return ""
    return "until " + result.leased_until.astimezone(UTC).isoformat(timespec="seconds")
