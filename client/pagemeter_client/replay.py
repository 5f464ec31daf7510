"""Replay after a failover: re-send the requests pagemeter acknowledged shortly before.

Redis replicates asynchronously. A write the primary acknowledged just before it
died can be missing on the replica promoted in its place (docs/scaling.md, "What
a failover can lose"). Every request that changes state is idempotent by its
request_id, so sending an acknowledged request again, byte for byte, is exact:
the store answers a request it kept as a duplicate and applies a lost one anew.

A client given `replay_after_failover=ReplayWindow(...)` keeps, in memory, the
requests pagemeter acknowledged within the window (by age and by count, oldest
dropped first):

- holds: CheckQuota (and CheckQuotaBatch items) with hold=true answered `held`;
- records: RecordUsage (and RecordUsageBatch items, and the outbox's deliveries)
  answered with a result;
- releases: ReleaseQuota answered RELEASED or NOT_FOUND (a not-found release
  leaves a mark that bars a late hold).

It watches every answer for the sign of a store outage: a call that failed with
UNAVAILABLE and the ErrorInfo reason STORE_UNAVAILABLE (or a batch item that
did, or a check admitted FAIL_OPEN). The first call answered after such an
outage starts a replay pass in the background (a task of the call's event loop,
or a thread for the blocking client) over every entry acknowledged before that
answer. `replay_acknowledged()` runs a pass on demand, for an operator's
failover hook.

A pass sends the holds first (one CheckQuota each, in acknowledgement order),
then the records (RecordUsageBatch calls of up to REPLAY_BATCH, in
acknowledgement order), then the releases: a job's hold never goes after its
own record or release. Holds whose hold has expired are not sent (the job's
record, if any, is). This module knows the messages and the answers; the
clients own the channel and run a pass with `replay_async` (pagemeter_client._async.replay)
or its generated blocking twin `replay_sync`.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pagemeter.v1 import quota_pb2

# The failures after which a replayed request may well be answered later, and
# those that say pagemeter cannot be reached at all (a pass stops there): the
# same as for the outbox's deliveries.
from pagemeter_client.outbox import TRANSIENT_CODES, UNREACHABLE_CODES

log = logging.getLogger("pagemeter_client.replay")

QUOTA_METHOD = "/pagemeter.v1.QuotaService/"
CHECK = QUOTA_METHOD + "CheckQuota"
CHECK_BATCH = QUOTA_METHOD + "CheckQuotaBatch"
RECORD = QUOTA_METHOD + "RecordUsage"
RECORD_BATCH = QUOTA_METHOD + "RecordUsageBatch"
RELEASE = QUOTA_METHOD + "ReleaseQuota"

# Records per RecordUsageBatch call of a replay (the server takes up to 1,000).
REPLAY_BATCH = 200
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
# A hold replayed after its job moved on is refused as REQUEST_ID_REUSED with
# one of these statuses: the store has the hold's job, so the hold was not lost
# (or the job was settled since). 'held' (a live hold with other units) is not
# among them: that is another payload under the same id.
SETTLED_STATUSES = frozenset({"completed", "failed", "released", "expired"})
# Set while a replay pass sends: its answers are not kept again, and they do
# not start another pass (a failure still marks an outage).
REPLAYING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pagemeter_replaying", default=False
)

Kind = Literal["hold", "record", "release"]
Outcome = Literal["duplicate", "reapplied", "denied", "expired", "conflict", "failed", "deferred"]


@dataclass(frozen=True)
class ReplayWindow:
    """Which acknowledged requests a client keeps for a replay after a failover.

    `seconds`: how long an entry is kept after its acknowledgement; `max_entries`:
    how many at most (the oldest go first). `on_replay` is called with the
    ReplayResult of every pass (exceptions it raises are logged). `clock` (seconds,
    monotonic) is for tests.
    """

    seconds: float = 60.0
    max_entries: int = 10_000
    on_replay: Callable[[ReplayResult], object] | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError("seconds must be positive")
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One acknowledged request, serialized as it was sent."""

    seq: int
    acked_at: float  # the window's clock
    kind: Kind
    request: bytes
    hold_expires: float = 0.0  # holds: when the hold stops counting (seconds since the epoch)
    release_outcome: int = 0  # releases: what the acknowledged release found

    def check(self) -> quota_pb2.CheckQuotaRequest:
        return quota_pb2.CheckQuotaRequest.FromString(self.request)

    def record(self) -> quota_pb2.RecordUsageRequest:
        return quota_pb2.RecordUsageRequest.FromString(self.request)

    def release(self) -> quota_pb2.ReleaseQuotaRequest:
        return quota_pb2.ReleaseQuotaRequest.FromString(self.request)

    def ids(self) -> tuple[str, str]:
        """(org_id, request_id) of the request."""
        message = (
            self.check()
            if self.kind == "hold"
            else self.record()
            if self.kind == "record"
            else self.release()
        )
        return message.org_id, message.request_id


@dataclass(frozen=True)
class ReplayOutcome:
    """What one replayed request was answered, for every answer that was not a duplicate."""

    kind: Kind
    org_id: str
    request_id: str
    outcome: Outcome
    code: str = ""  # gRPC status name, for an error
    message: str = ""


@dataclass(frozen=True)
class _ReplayCounts:
    """The counts of replayed requests by what became of them (see ReplayResult)."""

    replayed: int = 0
    duplicates: int = 0
    reapplied: int = 0
    denied: int = 0
    conflicts: int = 0
    failed: int = 0
    deferred: int = 0
    expired: int = 0


@dataclass(frozen=True)
class ReplayResult(_ReplayCounts):
    """One replay pass.

    `replayed`: requests sent. Of those, `duplicates` the store had (for a hold:
    also one whose job was recorded or released since), `reapplied` it had lost
    and applied again, `denied` lost holds it no longer admits (quota, rate
    limit), `conflicts` refused as REQUEST_ID_REUSED (a changed payload or a
    bug), `failed` refused otherwise, `deferred` not answered (the store or
    pagemeter unreachable; the next pass sends them again). `expired`: holds not
    sent because their hold had expired. `stopped` says why a pass ended early.
    `outcomes` lists every answer but the duplicates.
    """

    stopped: str | None = None
    outcomes: tuple[ReplayOutcome, ...] = ()

    @property
    def lost(self) -> int:
        """Acknowledged requests the store had lost: re-applied, or holds now denied."""
        return self.reapplied + self.denied

    @property
    def complete(self) -> bool:
        """Every request was answered, and none was refused."""
        return self.stopped is None and not (self.deferred or self.conflicts or self.failed)


@dataclass(frozen=True)
class ReplayStats(_ReplayCounts):
    """A client's replay bookkeeping since it was built.

    `entries`: acknowledged requests in the window now; `dropped`: entries pushed
    out by `max_entries` before their age; `outage`: a store outage was seen and
    no call has been answered since; `passes` and the counts are the sums of
    every pass's ReplayResult; `last` is the latest pass.
    """

    entries: int = 0
    dropped: int = 0
    outage: bool = False
    passes: int = 0
    last: ReplayResult | None = None


COUNTS = ("replayed", "duplicates", "reapplied", "denied", "conflicts", "failed", "deferred")


# -- reading answers --------------------------------------------------------------------


def _error_infos(error: grpc.RpcError) -> list[error_details_pb2.ErrorInfo]:
    call: Any = error  # both kinds of RpcError a call raises are also grpc.Call
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # a status whose code or message disagree with the call's
        return []
    infos = []
    for item in status.details if status is not None else []:
        if item.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            item.Unpack(info)
            infos.append(info)
    return infos


def _code(error: grpc.RpcError) -> grpc.StatusCode:
    call: Any = error
    code: grpc.StatusCode = call.code()
    return code


def _message(error: grpc.RpcError) -> str:
    call: Any = error
    return str(call.details() or "")


def store_unavailable(error: grpc.RpcError) -> bool:
    """pagemeter answered UNAVAILABLE because its store (Redis) was unreachable."""
    return _code(error) == grpc.StatusCode.UNAVAILABLE and any(
        info.reason == STORE_UNAVAILABLE for info in _error_infos(error)
    )


def _status_code(name: str) -> grpc.StatusCode:
    return grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN


def _failure(code: grpc.StatusCode, reason: str, status: str | None, kind: Kind) -> Outcome:
    """The outcome of a replayed request refused with `code` and ErrorInfo `reason`."""
    if code in TRANSIENT_CODES:
        return "deferred"
    if code == grpc.StatusCode.ALREADY_EXISTS and reason == REQUEST_ID_REUSED:
        if kind == "hold" and status in SETTLED_STATUSES:
            return "duplicate"
        return "conflict"
    return "failed"


def hold_outcome(response: quota_pb2.CheckQuotaResponse) -> Outcome:
    if response.reason == quota_pb2.DECISION_REASON_FAIL_OPEN:
        return "deferred"  # admitted unchecked: the store is still unreachable
    if response.duplicate:
        return "duplicate"
    return "reapplied" if response.held else "denied"


def record_outcome(response: quota_pb2.RecordUsageResponse) -> Outcome:
    return "duplicate" if response.duplicate else "reapplied"


def release_outcome(original: int, response: quota_pb2.ReleaseQuotaResponse) -> Outcome:
    """A replayed release is a duplicate when the store already had its effect."""
    found = response.outcome
    if found in (
        quota_pb2.RELEASE_OUTCOME_ALREADY_RELEASED,
        quota_pb2.RELEASE_OUTCOME_ALREADY_RECORDED,
    ):
        return "duplicate"
    if found == quota_pb2.RELEASE_OUTCOME_NOT_FOUND == original:
        return "duplicate"  # the mark it leaves is the same whether it was kept or not
    return "reapplied"


# -- the window -------------------------------------------------------------------------


class AcknowledgedLog:
    """The acknowledged requests of one client, and whether a store outage was seen.

    Shared by the threads of a blocking client and by the tasks of an async one;
    every method takes the lock for a few dictionary-sized steps only.
    """

    def __init__(self, window: ReplayWindow) -> None:
        self.window = window
        self._entries: deque[_Entry] = deque()
        self._lock = threading.Lock()
        self._seq = 0
        self._outage = False
        self._dropped = 0
        self._passes = 0
        self._counts = dict.fromkeys((*COUNTS, "expired"), 0)
        self._last: ReplayResult | None = None

    # what the interceptors report

    def answered(self, method: str, request: Any, response: Any) -> bool:
        """Keep what `response` acknowledged; True when this answer ends an outage.

        The answer of a replayed request is not kept again (its entry is still in
        the window) and never starts a pass.
        """
        replaying = REPLAYING.get()
        kept, store_down = _acknowledged(method, request, response)
        with self._lock:
            if not replaying:
                for entry in kept:
                    self._add(*entry)
            if store_down:
                self._outage = True
                return False
            if replaying or not self._outage:
                return False
            self._outage = False
            return True

    def failed(self, error: grpc.RpcError) -> None:
        """Note a failed call: STORE_UNAVAILABLE marks an outage."""
        if store_unavailable(error):
            with self._lock:
                self._outage = True

    def rearm(self) -> None:
        """Make the next answered call start a pass again (this one could not finish)."""
        with self._lock:
            self._outage = True

    def _add(self, kind: Kind, request: bytes, hold_expires: float, release: int) -> None:
        now = self.window.clock()
        self._seq += 1
        self._entries.append(_Entry(self._seq, now, kind, request, hold_expires, release))
        self._trim(now)

    def _trim(self, now: float) -> None:
        oldest = now - self.window.seconds
        while self._entries and self._entries[0].acked_at < oldest:
            self._entries.popleft()
        while len(self._entries) > self.window.max_entries:
            self._entries.popleft()
            self._dropped += 1

    # what a pass reads and reports

    def snapshot(self) -> list[_Entry]:
        """The entries within the window now, oldest first."""
        with self._lock:
            self._trim(self.window.clock())
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            self._trim(self.window.clock())
            return len(self._entries)

    def finished(self, result: ReplayResult) -> None:
        with self._lock:
            self._passes += 1
            for name in self._counts:
                self._counts[name] += getattr(result, name)
            self._last = result
        _report(result)
        if self.window.on_replay is not None:
            try:
                self.window.on_replay(result)
            except Exception:
                log.exception("replay: the on_replay callback failed")

    def stats(self) -> ReplayStats:
        with self._lock:
            self._trim(self.window.clock())
            return ReplayStats(
                entries=len(self._entries),
                dropped=self._dropped,
                outage=self._outage,
                passes=self._passes,
                last=self._last,
                **self._counts,
            )


def _acknowledged(
    method: str, request: Any, response: Any
) -> tuple[list[tuple[Kind, bytes, float, int]], bool]:
    """The entries an answer acknowledges, and whether it shows the store was down."""
    kept: list[tuple[Kind, bytes, float, int]] = []
    down = False
    if method == CHECK:
        down = response.reason == quota_pb2.DECISION_REASON_FAIL_OPEN
        if request.hold and response.held:
            kept.append(_hold(request, response))
    elif method == CHECK_BATCH:
        for item, answer in zip(request.items, response.items, strict=False):
            if answer.WhichOneof("result") != "response":
                down = down or answer.error.reason == STORE_UNAVAILABLE
            elif answer.response.reason == quota_pb2.DECISION_REASON_FAIL_OPEN:
                down = True
            elif item.hold and answer.response.held:
                kept.append(_hold(item, answer.response))
    elif method == RECORD:
        kept.append(("record", request.SerializeToString(), 0.0, 0))
    elif method == RECORD_BATCH:
        for item, answer in zip(request.items, response.items, strict=False):
            if answer.WhichOneof("result") == "response":
                kept.append(("record", item.SerializeToString(), 0.0, 0))
            else:
                down = down or answer.error.reason == STORE_UNAVAILABLE
    elif method == RELEASE and response.outcome in (
        quota_pb2.RELEASE_OUTCOME_RELEASED,
        quota_pb2.RELEASE_OUTCOME_NOT_FOUND,
    ):
        kept.append(("release", request.SerializeToString(), 0.0, int(response.outcome)))
    return kept, down


def _hold(
    request: quota_pb2.CheckQuotaRequest, response: quota_pb2.CheckQuotaResponse
) -> tuple[Kind, bytes, float, int]:
    expires = response.hold_expires_at.ToNanoseconds() / 1e9
    return ("hold", request.SerializeToString(), expires, 0)


# -- planning and tallying a pass -------------------------------------------------------

Step = tuple[Kind, list[_Entry]]


def plan(entries: Iterable[_Entry], batch: int = REPLAY_BATCH) -> list[Step]:
    """The calls of a pass: every hold, then the records in batches, then the releases.

    Each group keeps acknowledgement order, and a job's hold is always acknowledged
    before its record or release, so it is also sent before them.
    """
    holds: list[Step] = []
    records: list[_Entry] = []
    releases: list[Step] = []
    for entry in entries:
        if entry.kind == "hold":
            holds.append(("hold", [entry]))
        elif entry.kind == "record":
            records.append(entry)
        else:
            releases.append(("release", [entry]))
    chunks: list[Step] = [
        ("record", records[start : start + batch]) for start in range(0, len(records), batch)
    ]
    return [*holds, *chunks, *releases]


@dataclass
class _Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*COUNTS, "expired"), 0))
    outcomes: list[ReplayOutcome] = field(default_factory=list)
    stopped: str | None = None

    def add(self, entry: _Entry, outcome: Outcome, code: str = "", message: str = "") -> None:
        if outcome == "expired":
            self.counts["expired"] += 1
        else:
            self.counts["replayed"] += 1
            self.counts[_COUNT_OF[outcome]] += 1
        if outcome != "duplicate":
            org_id, request_id = entry.ids()
            self.outcomes.append(
                ReplayOutcome(entry.kind, org_id, request_id, outcome, code, message)
            )
        if outcome == "conflict":
            log.error(
                "replay: pagemeter refused the acknowledged %s of %r (%s) as %s: %s; the same "
                "request_id was sent with another payload, which is a bug of the caller or the "
                "store lost the request and another one took its id",
                entry.kind,
                *reversed(entry.ids()),
                code,
                message,
            )

    def error(self, entry: _Entry, error: grpc.RpcError) -> bool:
        """Tally a failed call of one entry; True when the pass must stop."""
        code = _code(error)
        infos = _error_infos(error)
        reason = infos[0].reason if infos else ""
        status = infos[0].metadata.get("status") if infos else None
        self.add(entry, _failure(code, reason, status, entry.kind), code.name, _message(error))
        if code in UNREACHABLE_CODES:
            self.stopped = f"{code.name}: {_message(error)}"
            return True
        return False

    def result(self) -> ReplayResult:
        return ReplayResult(stopped=self.stopped, outcomes=tuple(self.outcomes), **self.counts)


_COUNT_OF: dict[str, str] = {
    "duplicate": "duplicates",
    "reapplied": "reapplied",
    "denied": "denied",
    "conflict": "conflicts",
    "failed": "failed",
    "deferred": "deferred",
}


def _batch_item(tally: _Tally, entry: _Entry, item: quota_pb2.RecordUsageBatchItem) -> None:
    if item.WhichOneof("result") == "response":
        tally.add(entry, record_outcome(item.response))
        return
    code = _status_code(item.error.code)
    tally.add(
        entry, _failure(code, item.error.reason, None, "record"), code.name, item.error.message
    )


def _hold_expired(entry: _Entry) -> bool:
    return entry.hold_expires <= time.time()


def _report(result: ReplayResult) -> None:
    text = ", ".join(
        f"{getattr(result, name)} {name}" for name in (*COUNTS, "expired") if getattr(result, name)
    )
    if result.reapplied or result.denied:
        log.warning(
            "replay after a store outage: the store had lost %d acknowledged request(s) "
            "(%d re-applied, %d holds now denied); %s",
            result.lost,
            result.reapplied,
            result.denied,
            text or "nothing sent",
        )
    else:
        log.info("replay: %s", text or "nothing to send")
    if result.stopped:
        log.warning(
            "replay stopped early (%s); the next answer after it starts a pass again",
            result.stopped,
        )


# -- running a pass ---------------------------------------------------------------------


def _batch_failed(tally: _Tally, entries: list[_Entry], error: grpc.RpcError) -> None:
    """A RecordUsageBatch call failed as a whole: each of its records gets its error."""
    for entry in entries:
        tally.error(entry, error)


# -- watching every call ----------------------------------------------------------------


def _method_name(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


if TYPE_CHECKING:
    _AsyncInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _SyncInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
else:  # the classes are not generic at run time
    _AsyncInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _SyncInterceptor = grpc.UnaryUnaryClientInterceptor


class AsyncObserver(_AsyncInterceptor):
    """Reports every unary call of an async client to its AcknowledgedLog."""

    def __init__(self, acknowledged: AcknowledgedLog, recovered: Callable[[], None]) -> None:
        self._log = acknowledged
        self._recovered = recovered

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            self._log.failed(error)
        else:
            if self._log.answered(_method_name(client_call_details), request, response):
                self._recovered()
        return call


class Observer(_SyncInterceptor):
    """Reports every unary call of a blocking client to its AcknowledgedLog."""

    def __init__(self, acknowledged: AcknowledgedLog, recovered: Callable[[], None]) -> None:
        self._log = acknowledged
        self._recovered = recovered

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)
        error = outcome.exception()
        if error is not None:
            if isinstance(error, grpc.RpcError):
                self._log.failed(error)
        elif self._log.answered(_method_name(client_call_details), request, outcome.result()):
            self._recovered()
        return outcome
