"""The event sink: `events export` and `events tail` print events as JSON lines.

Each line is one event in the CloudEvents 1.0 JSON format (docs/events.md), in
order per organization. `export` reads what is kept since a time and stops;
`tail` follows the streams as they grow. With `--cursor FILE` either one keeps,
per organization, the position after the last event it wrote, and starts from
there the next time: a warehouse loader that runs it again (or restarts it)
neither skips nor repeats events. The cursor is written after the lines it
covers were flushed, so a crash in between repeats a few lines at most (the
event id tells them apart), never skips one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from pagemeter.v1 import events_pb2
from pagemeter_client.cli.arguments import instant
from pagemeter_client.cli.common import EXIT_OK, InputProblem
from pagemeter_client.sdk import PagemeterClient

EVENT_TYPES = (
    "usage.recorded",
    "usage.corrected",
    "hold.placed",
    "hold.released",
    "hold.expired",
    "plan.changed",
    "credits.granted",
    "credits.voided",
    "threshold.crossed",
    "threshold.resolved",
)
PAGE = 1000
# How far back a follower of every organization asks who had events: servers
# note organizations every half second, and clocks differ a little.
DISCOVERY_MARGIN = timedelta(seconds=30)


def add_events_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    events = commands.add_parser("events", help="the event streams as JSON lines of CloudEvents")
    event_commands = events.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    export = event_commands.add_parser(
        "export", parents=[common], help="the events kept since a time, then stop"
    )
    tail = event_commands.add_parser(
        "tail", parents=[common], help="follow the events as they come (Ctrl-C stops)"
    )
    for command in (export, tail):
        command.add_argument(
            "--org", default="", help="one organization (default: every one that had events)"
        )
        command.add_argument(
            "--type",
            dest="types",
            action="append",
            default=[],
            choices=EVENT_TYPES,
            help="only events of this type; repeat for several",
        )
        command.add_argument(
            "--cursor",
            metavar="FILE",
            help="read from, and keep, each organization's position in FILE (JSON)",
        )
        command.add_argument("--output", metavar="FILE", help="append there instead of stdout")
    export.add_argument(
        "--since",
        type=instant,
        help="events from this time on (ISO 8601 with offset; default: all kept)",
    )
    export.set_defaults(run=cmd_events_export)
    tail.add_argument(
        "--since",
        type=instant,
        help="start with the events from this time on (default: only new ones)",
    )
    tail.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between polls when nothing is new (default 1)",
    )
    tail.add_argument(
        "--count", type=int, default=0, help="stop after this many events (default: never)"
    )
    tail.set_defaults(run=cmd_events_tail)


class Cursor:
    """Per organization, the page token after the last event written."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.tokens: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputProblem(f"cannot read the cursor file {self.path}: {exc}") from exc
            if not isinstance(loaded, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
            ):
                raise InputProblem(
                    f"{self.path} is not a cursor file (a JSON object of org id -> token)"
                )
            self.tokens = loaded

    def save(self) -> None:
        """Write the cursor atomically (a crash leaves the old one or the new one)."""
        if self.path is None:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.tokens, sort_keys=True), encoding="utf-8")
        os.replace(partial, self.path)


@contextmanager
def _lines(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    with open(path, "a", encoding="utf-8") as out:
        yield out


class Follower:
    """Reads organizations' streams from their cursor positions and writes lines."""

    def __init__(
        self,
        client: PagemeterClient,
        args: argparse.Namespace,
        out: IO[str],
        cursor: Cursor,
        since: datetime | None,
    ) -> None:
        self.client, self.args, self.out, self.cursor = client, args, out, cursor
        self.since = since
        self.written = 0

    def drain(self, org_id: str, limit: int = 0) -> int:
        """Write the organization's events from its position to the end (at most
        `limit` with a limit); the number written."""
        written = 0
        while True:
            token = self.cursor.tokens.get(org_id, "")
            page = self.client.list_events(
                org_id,
                since=None if token else self.since,
                types=self.args.types,
                page_size=PAGE if not limit else min(PAGE, limit - written),
                page_token=token,
            )
            self._write(page)
            written += len(page.events)
            if page.next_page_token:
                self.cursor.tokens[org_id] = page.next_page_token
                self.cursor.save()
            if not page.more or (limit and written >= limit):
                return written

    def _write(self, page: events_pb2.ListEventsResponse) -> None:
        for event in page.events:
            self.out.write(event.cloudevent + "\n")
        self.out.flush()
        self.written += len(page.events)

    def organizations(self, since: datetime | None) -> list[str]:
        if self.args.org:
            return [self.args.org]
        return list(self.client.iter_event_organizations(since=since))


def cmd_events_export(client: PagemeterClient, args: argparse.Namespace) -> int:
    cursor = Cursor(args.cursor)
    with _lines(args.output) as out:
        follower = Follower(client, args, out, cursor, args.since)
        for org_id in follower.organizations(None):
            follower.drain(org_id)
    return EXIT_OK


def cmd_events_tail(client: PagemeterClient, args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.interval > 3600:
        raise InputProblem("--interval must be between 0 and 3600 seconds")
    if args.count < 0:
        raise InputProblem("--count must be 0 (never stop) or more")
    cursor = Cursor(args.cursor)
    started = datetime.now(UTC)
    since = args.since or started
    with _lines(args.output) as out:
        follower = Follower(client, args, out, cursor, since)
        # Every organization once, then those that had events since the last look.
        looked = None
        while True:
            looked_now = datetime.now(UTC)
            for org_id in follower.organizations(looked):
                left = args.count - follower.written if args.count else 0
                follower.drain(org_id, left)
                if args.count and follower.written >= args.count:
                    return EXIT_OK
            looked = looked_now - DISCOVERY_MARGIN
            time.sleep(args.interval)
