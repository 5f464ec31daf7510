"""A client outbox file: `outbox status|flush|requeue|discard FILE`; `flush` calls the server."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pagemeter_client.cli.common import EXIT_OK, EXIT_RPC_ERROR, InputProblem
from pagemeter_client.cli.connect import make_client
from pagemeter_client.cli.output import emit_document
from pagemeter_client.cli.render.outbox import lease_end, render_flush, render_outbox_status
from pagemeter_client.outbox import FlushResult, Outbox, OutboxError
from pagemeter_client.sdk import PagemeterClient

# How long `outbox flush` waits for records another flusher holds: a lease lasts
# the holder's deadline plus its lease margin (5 + 30 s with the defaults).
FLUSH_WAIT_SECONDS = 60.0


def _open_outbox(args: argparse.Namespace) -> Outbox:
    try:
        return Outbox(args.file, create=False)
    except OutboxError as problem:
        raise InputProblem(str(problem)) from None


def cmd_outbox_status(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
        summary = outbox.summary()
        entries = outbox.entries(limit=args.limit or None)
        now = outbox.now()
    document = {
        "outbox": args.file,
        "pending": summary.pending,
        "dead": summary.dead,
        "in_flight": summary.in_flight,
        "oldest_pending": _json_time(summary.oldest_pending),
        "next_attempt_at": _json_time(summary.next_attempt_at),
        "records": [entry.as_dict() for entry in entries],
    }
    emit_document(args, document, lambda: render_outbox_status(args.file, summary, entries, now))
    return EXIT_OK


def _json_time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _flush_and_wait(
    client: PagemeterClient, outbox: Outbox, args: argparse.Namespace
) -> FlushResult:
    """Delivery passes until no record is held by another flusher, or --wait runs out.

    A record another pass or a first attempt holds is left alone until its
    lease ends (the holder may still be sending it, or may have died: nothing
    tells them apart); then a pass here takes it over. The result joins every
    pass's outcomes; its counts are those after the last pass.
    """
    limit: int | None = args.limit or None
    give_up = time.monotonic() + args.wait
    passes = [client.flush_outbox(force=True, limit=limit)]
    told = False
    while True:
        last = passes[-1]
        tried = sum(len(p.outcomes) for p in passes)
        if last.stopped is not None or not last.leased or (limit and tried >= limit):
            break
        first_end = outbox.summary().first_lease_ends
        if first_end is not None:  # else the leases ended meanwhile: take them over now
            wait_for = (first_end - outbox.now()).total_seconds()
            if time.monotonic() + wait_for > give_up:
                break
            if not told:
                print(
                    f"waiting for {last.leased} record(s) leased by another flusher "
                    f"{lease_end(last)} (at most {args.wait:g} s; --wait 0 does not wait)",
                    file=sys.stderr,
                )
                told = True
            time.sleep(max(0.0, min(wait_for, 1.0)) + 0.05)
        elif time.monotonic() > give_up:
            break
        passes.append(client.flush_outbox(force=True, limit=limit and limit - tried))
    return FlushResult(
        outcomes=tuple(o for p in passes for o in p.outcomes),
        pending=passes[-1].pending,
        dead=passes[-1].dead,
        stopped=passes[-1].stopped,
        leased=passes[-1].leased,
        leased_until=passes[-1].leased_until,
    )


def cmd_outbox_flush(args: argparse.Namespace) -> int:
    with (
        _open_outbox(args) as outbox,
        make_client(args, outbox=outbox, flush_outbox_on_close=False) as client,
    ):
        result = _flush_and_wait(client, outbox, args)
    emit_document(args, result.as_dict(), lambda: render_flush(result))
    if result.stopped is not None:
        print(f"error: {result.stopped}", file=sys.stderr)
        print(
            f"  hint: is the server at {args.target} reachable, and do --tls and --tls-* match "
            "how it serves? The records stay in the outbox.",
            file=sys.stderr,
        )
    rejected = result.count("rejected")
    if rejected:
        print(
            f"error: pagemeter refused {rejected} record(s); kept as dead letters, never re-sent "
            f"unless requeued (pagemeter outbox status {args.file})",
            file=sys.stderr,
        )
    if result.leased and result.stopped is None:
        print(
            f"error: {result.leased} record(s) still leased by another flusher "
            f"{lease_end(result)}: it may still be sending them, or have died; run flush "
            "again after that time (or with a longer --wait) to send them",
            file=sys.stderr,
        )
    return EXIT_OK if result.ok and not result.leased else EXIT_RPC_ERROR


def cmd_outbox_requeue(args: argparse.Namespace) -> int:
    return _change(args, "requeued", lambda outbox: outbox.requeue(args.ids or None))


def cmd_outbox_discard(args: argparse.Namespace) -> int:
    return _change(args, "discarded", lambda outbox: outbox.discard(args.ids))


def _change(args: argparse.Namespace, done: str, change: Callable[[Outbox], int]) -> int:
    """Change the outbox's records, then print how many changed (`done: N`)."""
    with _open_outbox(args) as outbox:
        changed = change(outbox)
    print(json.dumps({done: changed}) if args.json else f"{done}: {changed}")
    return EXIT_OK
