"""A durable outbox for RecordUsage: finished jobs survive an outage of pagemeter.

An `Outbox` is a SQLite file (standard library `sqlite3`, WAL journal,
`synchronous=FULL`) that a client given `outbox=` writes every RecordUsage to
before sending it. The row is deleted once pagemeter has answered (a first
answer or a duplicate); it stays when the call failed:

- `pending`: the failure was transient (pagemeter unreachable, a deadline, an
  overloaded or aborted call). A delivery pass (`flush_outbox()`, the
  background flusher, `pagemeter outbox flush FILE`) re-sends it later, with
  backoff, byte for byte the same request: the same request_id, units,
  success, document_type, requested_at and completed_at. pagemeter's
  idempotency makes a redelivery of a job it already recorded a duplicate,
  counted once.
- `dead`: pagemeter refused the request (INVALID_ARGUMENT, ALREADY_EXISTS,
  PERMISSION_DENIED, UNAUTHENTICATED, ...). It is kept with its error for an
  operator and never re-sent automatically; `requeue()` makes it pending
  again, `discard()` deletes it.

A job whose caller gave no completed_at gets the time of its first attempt
(the outbox's clock), so the job counts in the month it was done in, however
late it is delivered.

One Outbox object may be shared by the threads of a process. Several processes
on one machine may open the same file (each its own Outbox): a delivery pass
claims the rows it sends for a lease, so two passes do not send the same
record at once (and if a lease runs out mid-call, the redelivery is a
duplicate). Not on a network file system: SQLite's locking needs a local disk.

A lease cannot tell a live sender from a dead one: a process killed while it
holds records leaves them held until the lease ends (the call's deadline plus
`lease_margin`), and only then does another pass send them. `pagemeter outbox
flush` waits for such leases (`--wait`) and fails, naming them, if they outlast
it; a FlushResult counts them in `leased`.

This module knows nothing of gRPC channels; the clients in `pagemeter_client.sdk`
send the requests and report the answers here.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import grpc

from pagemeter.v1 import quota_pb2

log = logging.getLogger("pagemeter_client.outbox")

SCHEMA_VERSION = 1

# Failures after which the same request may well succeed later: keep it pending.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        # The call was cut off (a server shutting down, a closing channel).
        grpc.StatusCode.CANCELLED,
        # pagemeter answers INTERNAL only for unexpected failures, and gRPC uses
        # INTERNAL and UNKNOWN for broken streams: worth another try, since a
        # redelivery is idempotent.
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# Transient failures that mean pagemeter cannot be reached at all: a delivery
# pass stops at the first one instead of waiting out a deadline per record.
UNREACHABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

State = Literal["pending", "dead"]
Outcome = Literal["delivered", "duplicate", "deferred", "rejected"]

_SCHEMA = (
    """
CREATE TABLE records (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'dead')),
    org_id           TEXT    NOT NULL,
    request_id       TEXT    NOT NULL,
    units            TEXT    NOT NULL,  -- JSON object, metric -> units
    success          INTEGER NOT NULL,
    document_type    TEXT    NOT NULL,
    requested_at     TEXT,              -- ISO 8601, UTC; NULL when not given
    completed_at     TEXT    NOT NULL,  -- ISO 8601, UTC: the job's time
    request          BLOB    NOT NULL,  -- the RecordUsageRequest, exactly as sent
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_code        TEXT,              -- gRPC status name of the last failure
    last_error       TEXT,              -- its message
    created_at       REAL    NOT NULL,  -- seconds since the epoch (the outbox's clock)
    last_attempt_at  REAL,
    next_attempt_at  REAL    NOT NULL,
    claimed_until    REAL    NOT NULL DEFAULT 0
)""",
    "CREATE INDEX records_due ON records (state, next_attempt_at, id)",
    "CREATE INDEX records_job ON records (org_id, request_id)",
)

_COLUMNS = (
    "id, state, org_id, request_id, units, success, document_type, requested_at, "
    "completed_at, request, attempts, last_code, last_error, created_at, last_attempt_at, "
    "next_attempt_at, claimed_until"
)


class OutboxError(Exception):
    """The outbox file cannot be used: missing, not an outbox, or from a newer pagemeter."""


def is_transient(code: grpc.StatusCode) -> bool:
    """Whether a RecordUsage that failed with `code` is kept pending (else: a dead letter)."""
    return code in TRANSIENT_CODES


def _iso(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class OutboxEntry:
    """One stored RecordUsage and its delivery bookkeeping."""

    id: int
    state: State
    org_id: str
    request_id: str
    units: dict[str, int]
    success: bool
    document_type: str
    requested_at: datetime | None
    completed_at: datetime
    request: quota_pb2.RecordUsageRequest
    attempts: int
    last_code: str | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    # When a delivery pass may send it next (None for a dead letter).
    next_attempt_at: datetime | None
    # Until when a delivery pass (or a client's first attempt) holds it; None if not held.
    claimed_until: datetime | None

    def in_flight(self, now: datetime) -> bool:
        """Whether a delivery pass or a first attempt holds it at `now`."""
        return self.claimed_until is not None and self.claimed_until > now

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (times as ISO 8601 UTC strings)."""

        def text(value: datetime | None) -> str | None:
            return None if value is None else _utc_text(value)

        return {
            "id": self.id,
            "state": self.state,
            "org_id": self.org_id,
            "request_id": self.request_id,
            "units": dict(self.units),
            "success": self.success,
            "document_type": self.document_type,
            "requested_at": text(self.requested_at),
            "completed_at": text(self.completed_at),
            "attempts": self.attempts,
            "last_code": self.last_code,
            "last_error": self.last_error,
            "created_at": text(self.created_at),
            "last_attempt_at": text(self.last_attempt_at),
            "next_attempt_at": text(self.next_attempt_at),
            "claimed_until": text(self.claimed_until),
        }

    @classmethod
    def _from_row(cls, row: Sequence[Any]) -> OutboxEntry:
        (
            id_,
            state,
            org_id,
            request_id,
            units,
            success,
            document_type,
            requested_at,
            completed_at,
            blob,
            attempts,
            last_code,
            last_error,
            created_at,
            last_attempt_at,
            next_attempt_at,
            claimed_until,
        ) = row
        request = quota_pb2.RecordUsageRequest()
        request.ParseFromString(blob)
        return cls(
            id=id_,
            state=state,
            org_id=org_id,
            request_id=request_id,
            units=json.loads(units),
            success=bool(success),
            document_type=document_type,
            requested_at=None if requested_at is None else datetime.fromisoformat(requested_at),
            completed_at=datetime.fromisoformat(completed_at),
            request=request,
            attempts=attempts,
            last_code=last_code,
            last_error=last_error,
            created_at=datetime.fromtimestamp(created_at, UTC),
            last_attempt_at=_iso(last_attempt_at),
            next_attempt_at=None if state == "dead" else _iso(next_attempt_at),
            claimed_until=_iso(claimed_until) if claimed_until else None,
        )


@dataclass(frozen=True)
class OutboxSummary:
    """How many records wait, and since when."""

    pending: int
    dead: int
    in_flight: int
    oldest_pending: datetime | None
    next_attempt_at: datetime | None
    # The first and the last end of the leases held now (None: nothing held).
    first_lease_ends: datetime | None = None
    last_lease_ends: datetime | None = None


@dataclass(frozen=True)
class FlushOutcome:
    """What one delivery attempt of one record came to."""

    entry_id: int
    org_id: str
    request_id: str
    # delivered: recorded now; duplicate: pagemeter had it already (delivered too);
    # deferred: transient failure, kept pending; rejected: refused, now a dead letter.
    outcome: Outcome
    code: str | None = None
    message: str = ""


@dataclass(frozen=True)
class FlushResult:
    """The result of one delivery pass."""

    outcomes: tuple[FlushOutcome, ...]
    pending: int  # records still pending after the pass (tried or not)
    dead: int  # dead letters in the outbox after the pass
    # "CODE: message" when the pass stopped early because pagemeter was unreachable.
    stopped: str | None = None
    # Pending records that another pass or a first attempt held after this pass
    # (it may still be sending them, or have died: see Outbox), and when the
    # last of those leases ends.
    leased: int = 0
    leased_until: datetime | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    @property
    def delivered(self) -> int:
        """Records pagemeter now holds: recorded by this pass, or duplicates of earlier sends."""
        return self.count("delivered") + self.count("duplicate")

    @property
    def ok(self) -> bool:
        """Every record this pass tried is delivered and the pass was not cut short."""
        return self.stopped is None and self.delivered == len(self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.count("delivered"),
            "duplicates": self.count("duplicate"),
            "deferred": self.count("deferred"),
            "rejected": self.count("rejected"),
            "pending": self.pending,
            "dead": self.dead,
            "stopped": self.stopped,
            "leased": self.leased,
            "leased_until": None if self.leased_until is None else _utc_text(self.leased_until),
            "outcomes": [
                {
                    "id": o.entry_id,
                    "org_id": o.org_id,
                    "request_id": o.request_id,
                    "outcome": o.outcome,
                    "code": o.code,
                    "message": o.message,
                }
                for o in self.outcomes
            ],
        }


class Outbox:
    """RecordUsage requests that pagemeter has not accepted yet, in a SQLite file.

    `path` (and its directory) is created if missing, unless `create=False`. `clock` gives seconds
    since the epoch: the time given to a job without completed_at, and of the
    bookkeeping (backoff, leases). Backoff after the n-th failed attempt is a
    random time between half and all of min(initial_backoff x 2^(n-1),
    max_backoff), at least the server's RetryInfo when it sent one. A first
    attempt or a delivery pass holds a record for the call's deadline plus
    `lease_margin` seconds; a process that dies meanwhile leaves it to be
    delivered when that lease has run out.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        initial_backoff: float = 1.0,
        max_backoff: float = 300.0,
        lease_margin: float = 30.0,
        busy_timeout: float = 30.0,
    ) -> None:
        if initial_backoff <= 0 or max_backoff < initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if lease_margin < 0:
            raise ValueError("lease_margin must not be negative")
        self.path = Path(path)
        self.clock = clock
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.lease_margin = lease_margin
        self._lock = threading.Lock()
        self._connection = self._connect(create, busy_timeout)

    def _connect(self, create: bool, busy_timeout: float) -> sqlite3.Connection:
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target, uri = str(self.path), False
        else:
            if not self.path.is_file():
                raise OutboxError(f"{self.path}: no such outbox file")
            target, uri = self.path.absolute().as_uri() + "?mode=rw", True
        try:
            # isolation_level=None: no implicit transactions; each change below is
            # one explicit BEGIN IMMEDIATE ... COMMIT (the write lock taken up front).
            connection = sqlite3.connect(
                target, timeout=busy_timeout, isolation_level=None, check_same_thread=False, uri=uri
            )
        except sqlite3.Error as problem:
            raise OutboxError(f"{self.path}: cannot open: {problem}") from None
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise OutboxError(f"{self.path}: cannot use the WAL journal (got {mode})")
            # FULL: a committed row is on disk before the call goes out.
            connection.execute("PRAGMA synchronous=FULL")
            self._ensure_schema(connection, create)
        except sqlite3.DatabaseError as problem:
            connection.close()
            raise OutboxError(f"{self.path}: not a pagemeter outbox ({problem})") from None
        except BaseException:
            connection.close()
            raise
        return connection

    def _ensure_schema(self, connection: sqlite3.Connection, create: bool) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            listing = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {name for (name,) in listing}
            if version == 0 and not tables - {"sqlite_sequence"} and create:
                # Statement by statement: executescript() would COMMIT first.
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION or "records" not in tables:
                if version > SCHEMA_VERSION:
                    raise OutboxError(
                        f"{self.path}: outbox schema {version} is newer than this client's "
                        f"({SCHEMA_VERSION})"
                    )
                raise OutboxError(f"{self.path}: not a pagemeter outbox")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r})"

    def now(self) -> datetime:
        """The outbox's clock as a timezone-aware datetime (UTC)."""
        return datetime.fromtimestamp(self.clock(), UTC)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def _read(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    # -- storing --------------------------------------------------------------------------

    def add(self, request: quota_pb2.RecordUsageRequest) -> OutboxEntry:
        """Store `request` as pending, due now, without sending it.

        A request without completed_at gets one: the completed_at of a record of
        the same job already in the outbox, else the outbox's clock.
        """
        return self._store(request, claim_for=0.0)

    def _store(self, request: quota_pb2.RecordUsageRequest, *, claim_for: float) -> OutboxEntry:
        """Store `request` as pending; held for `claim_for` seconds (a first attempt's call)."""
        request = _copy(request)
        now = self.clock()
        with self._transaction() as db:
            if not request.HasField("completed_at"):
                request.completed_at.CopyFrom(self._job_time(db, request, now))
            units = json.dumps(dict(sorted(request.units.items())))
            requested = (
                _utc_text(request.requested_at.ToDatetime(UTC))
                if request.HasField("requested_at")
                else None
            )
            cursor = db.execute(
                "INSERT INTO records (state, org_id, request_id, units, success, document_type, "
                "requested_at, completed_at, request, created_at, next_attempt_at, claimed_until) "
                "VALUES ('pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.org_id,
                    request.request_id,
                    units,
                    int(request.success if request.HasField("success") else True),
                    request.document_type,
                    requested,
                    _utc_text(request.completed_at.ToDatetime(UTC)),
                    request.SerializeToString(deterministic=True),
                    now,
                    now,
                    now + claim_for if claim_for > 0 else 0,
                ),
            )
            row = db.execute(
                f"SELECT {_COLUMNS} FROM records WHERE id = ?",  # noqa: S608 (constant columns)
                (cursor.lastrowid,),
            ).fetchone()
        return OutboxEntry._from_row(row)

    @staticmethod
    def _job_time(db: sqlite3.Connection, request: quota_pb2.RecordUsageRequest, now: float) -> Any:
        # The job's time is that of its first attempt: a later record of the same
        # job must carry the same completed_at, or pagemeter would see another payload.
        row = db.execute(
            "SELECT request FROM records WHERE org_id = ? AND request_id = ? ORDER BY id LIMIT 1",
            (request.org_id, request.request_id),
        ).fetchone()
        if row is not None:
            earlier = quota_pb2.RecordUsageRequest()
            earlier.ParseFromString(row[0])
            if earlier.HasField("completed_at"):
                return earlier.completed_at
        stamp = quota_pb2.RecordUsageRequest().completed_at
        stamp.FromDatetime(datetime.fromtimestamp(now, UTC))
        return stamp

    def job_time(self, org_id: str, request_id: str) -> datetime:
        """The completed_at a record of this job gets when its caller gives none.

        That of a record of the same job still in the outbox (its first attempt),
        else now (the outbox's clock).
        """
        probe = quota_pb2.RecordUsageRequest(org_id=org_id, request_id=request_id)
        with self._lock:
            stamp = self._job_time(self._connection, probe, self.clock())
        result: datetime = stamp.ToDatetime(UTC)
        return result

    # -- reading --------------------------------------------------------------------------

    def entries(self, state: State | None = None, *, limit: int | None = None) -> list[OutboxEntry]:
        """Stored records, oldest first (all, or those in `state`)."""
        where = "" if state is None else "WHERE state = ?"
        params: list[Any] = [] if state is None else [state]
        sql = f"SELECT {_COLUMNS} FROM records {where} ORDER BY id"  # noqa: S608
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [OutboxEntry._from_row(row) for row in self._read(sql, params)]

    def get(self, entry_id: int) -> OutboxEntry | None:
        rows = self._read(
            f"SELECT {_COLUMNS} FROM records WHERE id = ?",  # noqa: S608
            (entry_id,),
        )
        return OutboxEntry._from_row(rows[0]) if rows else None

    def summary(self) -> OutboxSummary:
        now = self.clock()
        ((pending, dead, in_flight, oldest, next_at, first_end, last_end),) = self._read(
            "SELECT "
            "COALESCE(SUM(state = 'pending'), 0), COALESCE(SUM(state = 'dead'), 0), "
            "COALESCE(SUM(state = 'pending' AND claimed_until > ?), 0), "
            "MIN(CASE WHEN state = 'pending' THEN created_at END), "
            "MIN(CASE WHEN state = 'pending' THEN next_attempt_at END), "
            "MIN(CASE WHEN state = 'pending' AND claimed_until > ? THEN claimed_until END), "
            "MAX(CASE WHEN state = 'pending' AND claimed_until > ? THEN claimed_until END) "
            "FROM records",
            (now, now, now),
        )
        return OutboxSummary(
            pending=pending,
            dead=dead,
            in_flight=in_flight,
            oldest_pending=_iso(oldest),
            next_attempt_at=_iso(next_at),
            first_lease_ends=_iso(first_end),
            last_lease_ends=_iso(last_end),
        )

    def __len__(self) -> int:
        """Records stored, pending and dead."""
        ((count,),) = self._read("SELECT COUNT(*) FROM records")
        result: int = count
        return result

    # -- for operators --------------------------------------------------------------------

    def requeue(self, ids: Iterable[int] | None = None) -> int:
        """Make dead letters (all, or those with these ids) pending and due now; returns how many.

        For after the cause is fixed (a token, a plan); a record pagemeter refuses
        again becomes a dead letter again. Attempts and the last error are kept.
        """
        now = self.clock()
        sql = "UPDATE records SET state = 'pending', next_attempt_at = ?, claimed_until = 0 "
        sql += "WHERE state = 'dead'"
        with self._transaction() as db:
            if ids is None:
                return db.execute(sql, (now,)).rowcount
            return sum(db.execute(sql + " AND id = ?", (now, i)).rowcount for i in ids)

    def discard(self, ids: Iterable[int]) -> int:
        """Delete these records (pending or dead) for good; returns how many were deleted."""
        with self._transaction() as db:
            return sum(db.execute("DELETE FROM records WHERE id = ?", (i,)).rowcount for i in ids)

    # -- delivery (used by the clients) ---------------------------------------------------

    def _claim(self, *, after_id: int, limit: int, lease: float, force: bool) -> list[OutboxEntry]:
        """Hold up to `limit` pending records after `after_id` for `lease` seconds, oldest first.

        Only records nobody holds, and (unless `force`) whose backoff has passed.
        """
        now = self.clock()
        due = "" if force else "AND next_attempt_at <= ? "
        params: list[Any] = [after_id, now] + ([] if force else [now]) + [limit]
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM records "  # noqa: S608
                "WHERE state = 'pending' AND id > ? AND claimed_until <= ? "
                f"{due}ORDER BY id LIMIT ?",
                params,
            ).fetchall()
            db.executemany(
                "UPDATE records SET claimed_until = ? WHERE id = ?",
                [(now + lease, row[0]) for row in rows],
            )
        return [OutboxEntry._from_row(row) for row in rows]

    def _delivered(self, entry_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM records WHERE id = ?", (entry_id,))

    def _release(self, entry_ids: Iterable[int]) -> None:
        """Give up the hold on records that were claimed but not sent."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE records SET claimed_until = 0 WHERE id = ?", [(i,) for i in entry_ids]
            )

    def _failed(
        self,
        entry_id: int,
        code: grpc.StatusCode,
        message: str,
        retry_after: float | None = None,
    ) -> OutboxEntry | None:
        """Count a failed attempt: pending with backoff if transient, else a dead letter.

        Returns the record as stored now; None if it was discarded meanwhile.
        """
        now = self.clock()
        with self._transaction() as db:
            row = db.execute("SELECT attempts FROM records WHERE id = ?", (entry_id,)).fetchone()
            attempts = (row[0] if row else 0) + 1
            if is_transient(code):
                delay = self.backoff(attempts)
                if retry_after is not None:
                    delay = max(delay, retry_after)
                state, next_at = "pending", now + delay
            else:
                state, next_at = "dead", now
            db.execute(
                "UPDATE records SET state = ?, attempts = ?, last_code = ?, last_error = ?, "
                "last_attempt_at = ?, next_attempt_at = ?, claimed_until = 0 WHERE id = ?",
                (state, attempts, code.name, message, now, next_at, entry_id),
            )
            stored = db.execute(
                f"SELECT {_COLUMNS} FROM records WHERE id = ?",  # noqa: S608
                (entry_id,),
            ).fetchone()
        return None if stored is None else OutboxEntry._from_row(stored)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (with jitter)."""
        ceiling = min(self.max_backoff, self.initial_backoff * 2.0 ** min(attempts - 1, 32))
        return ceiling * (0.5 + random.random() / 2)


def _copy(request: quota_pb2.RecordUsageRequest) -> quota_pb2.RecordUsageRequest:
    copy = quota_pb2.RecordUsageRequest()
    copy.CopyFrom(request)
    return copy


def status_code(name: str) -> grpc.StatusCode:
    """The grpc.StatusCode a batch item's error names ("INVALID_ARGUMENT"); UNKNOWN
    for a name this grpc lacks."""
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)


class DeliveryPass:
    """One pass over an outbox's due records, oldest first; the clients drive it.

    claim() hands out the next batch (held for `lease` seconds); each record's
    answer goes to delivered() or failed(). A pass tries each record at most
    once, and stops at the first failure that says pagemeter is unreachable
    (the records it still held are released, untouched).
    """

    BATCH = 20

    def __init__(
        self,
        outbox: Outbox,
        *,
        lease: float,
        force: bool = False,
        limit: int | None = None,
        claim_size: int = BATCH,
    ) -> None:
        self.outbox = outbox
        self.claim_size = claim_size
        self.lease = lease
        self.force = force
        self.left = limit
        self.after_id = 0
        self.outcomes: list[FlushOutcome] = []
        self.stopped: str | None = None

    def claim(self) -> list[OutboxEntry]:
        if self.stopped is not None or self.left == 0:
            return []
        size = self.claim_size if self.left is None else min(self.claim_size, self.left)
        batch = self.outbox._claim(
            after_id=self.after_id, limit=size, lease=self.lease, force=self.force
        )
        if batch:
            self.after_id = batch[-1].id
            if self.left is not None:
                self.left -= len(batch)
        return batch

    def delivered(self, entry: OutboxEntry, response: quota_pb2.RecordUsageResponse) -> None:
        try:
            self.outbox._delivered(entry.id)
        except sqlite3.Error as problem:
            # pagemeter has the record; a row left behind is redelivered later as
            # a duplicate, counted once.
            log.warning(
                "outbox %s: cannot delete delivered record %s: %s",
                self.outbox.path,
                entry.id,
                problem,
            )
        outcome: Outcome = "duplicate" if response.duplicate else "delivered"
        self.outcomes.append(FlushOutcome(entry.id, entry.org_id, entry.request_id, outcome))

    def failed(
        self,
        entry: OutboxEntry,
        code: grpc.StatusCode,
        message: str,
        retry_after: float | None = None,
    ) -> None:
        self.outbox._failed(entry.id, code, message, retry_after)
        outcome: Outcome = "deferred" if is_transient(code) else "rejected"
        self.outcomes.append(
            FlushOutcome(entry.id, entry.org_id, entry.request_id, outcome, code.name, message)
        )
        if code in UNREACHABLE_CODES:
            self.stopped = f"{code.name}: {message}"

    def answered(
        self,
        entries: Sequence[OutboxEntry],
        items: Sequence[quota_pb2.RecordUsageBatchItem],
    ) -> None:
        """Settle the records sent in one RecordUsageBatch, each by its own item, as
        its single RecordUsage answer would (an item error has no RetryInfo)."""
        for entry, item in zip(entries, items, strict=True):
            if item.WhichOneof("result") == "response":
                self.delivered(entry, item.response)
            else:
                self.failed(entry, status_code(item.error.code), item.error.message)

    def batch_failed(
        self,
        entries: Sequence[OutboxEntry],
        code: grpc.StatusCode,
        message: str,
        retry_after: float | None = None,
    ) -> None:
        """A RecordUsageBatch failed as a whole. As a pass of single calls stops at
        the first record that finds pagemeter unreachable, the first record takes
        such a failure and the others are released untouched; any other failure
        is each record's."""
        for index, entry in enumerate(entries):
            if self.finished:
                self.abandon(entries[index:])
                return
            self.failed(entry, code, message, retry_after)

    def abandon(self, entries: Sequence[OutboxEntry]) -> None:
        """Release records claimed but not sent (the pass stopped, or was interrupted)."""
        if entries:
            self.outbox._release(entry.id for entry in entries)

    @property
    def finished(self) -> bool:
        return self.stopped is not None

    def result(self) -> FlushResult:
        summary = self.outbox.summary()
        return FlushResult(
            outcomes=tuple(self.outcomes),
            pending=summary.pending,
            dead=summary.dead,
            stopped=self.stopped,
            leased=summary.in_flight,
            leased_until=summary.last_lease_ends,
        )
