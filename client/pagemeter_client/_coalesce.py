"""Concurrent CheckQuota and RecordUsage calls of one async client, sent as batch RPCs.

A worker process running many jobs at once makes many small calls. The async
client gathers the calls made within `linger` seconds of each other into one
CheckQuotaBatch or RecordUsageBatch (up to `max_items` items), and hands each
caller its own item of the answer, so that a caller sees what the single RPC
would have answered, only up to `linger` later (docs/client.md, "Coalescing";
decision 49):

- A batch holds calls of one kind with the same metadata (the client's, plus
  the caller's trace context) and deadlines at most `slack` apart; its RPC's
  deadline is that of its earliest member, so no call waits past its own.
- A batch item refused with UNAVAILABLE is sent again (in a later batch) with
  the channel's retry policy: attempts in all and the same random exponential
  backoff, never past the call's deadline.
- Any other refused item raises the error the single RPC would raise, built
  from the item's BatchItemError when that says everything the single error
  would; when it may not (an ErrorInfo whose metadata the item does not carry,
  a message or violations list the server cut), the call is asked again alone.
- A batch RPC that fails as a whole on the way (UNAVAILABLE after the
  channel's retries, DEADLINE_EXCEEDED, CANCELLED) fails each member with that
  error; any other whole failure (an older server's UNIMPLEMENTED, a refused
  credential, whose message names the batch RPC) sends each member alone, so
  each gets its own single answer. UNIMPLEMENTED also stops batching that call
  for UNSUPPORTED_PAUSE seconds.
- A caller cancelled before its batch leaves is taken out of it; once the batch
  is sent, its cancellation is its own and the others' RPC goes on.

The blocking client's twin, `Coalescer`, sends every call alone: see its
docstring for why.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from pagemeter.v1 import quota_pb2
from pagemeter_client._channel import AsyncStubs, RetryPolicy, Stubs, _ClientConfig
from pagemeter_client.outbox import status_code

# The linger by default, and the range a client accepts (seconds).
DEFAULT_LINGER = 0.001
MAX_LINGER = 1.0
# Items per batch RPC by default, and the most the server takes in one.
DEFAULT_MAX_ITEMS = 32
MAX_ITEMS = 1000
# The most metric amounts (units entries) the server takes over one batch's items.
MAX_ENTRIES = 8192
# Calls whose deadlines are at most this far apart may share a batch even with
# no linger (the calls of one turn of the event loop).
MIN_SLACK = 0.001
# After a server answered UNIMPLEMENTED for a batch RPC, calls go alone for this
# long before a batch is tried again (a rolling upgrade brings the newer server).
UNSUPPORTED_PAUSE = 60.0
# pagemeter's google.rpc.ErrorInfo domain (what the server puts in every ErrorInfo).
ERROR_DOMAIN = "pagemeter"
# What a BatchItemError keeps of the item's own error: at most this many field
# violations and a message of at most this many characters (longer ones are
# cut to it, ending in "..."). An item error at either bound may be incomplete.
ITEM_VIOLATIONS_KEPT = 5
ITEM_MESSAGE_KEPT = 400
# The whole-batch failures that a single call would have met the same way.
ON_THE_WAY = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
GRPC_DEADLINE_MESSAGE = "Deadline Exceeded"  # what grpc says of a call past its deadline


@dataclass(frozen=True)
class Batching:
    """How a client coalesces concurrent CheckQuota and RecordUsage calls.

    `enabled`: gather calls into batch RPCs (the outbox's deliveries too).
    `linger`: seconds the first call of a batch waits for company (0 to 1).
    `max_items`: items per batch RPC (1 to 1,000); a full batch leaves at once.
    """

    enabled: bool = True
    linger: float = DEFAULT_LINGER
    max_items: int = DEFAULT_MAX_ITEMS

    def __post_init__(self) -> None:
        # `not 0 <= x <= MAX` also refuses NaN.
        number = isinstance(self.linger, int | float) and not isinstance(self.linger, bool)
        if not number or not 0 <= self.linger <= MAX_LINGER:
            raise ValueError(f"batch_linger must be from 0 to {MAX_LINGER:g} seconds")
        if isinstance(self.max_items, bool) or not isinstance(self.max_items, int):
            raise ValueError(f"batch_max_items must be a whole number from 1 to {MAX_ITEMS}")
        if not 1 <= self.max_items <= MAX_ITEMS:
            raise ValueError(f"batch_max_items must be from 1 to {MAX_ITEMS}")

    @property
    def slack(self) -> float:
        """How far apart the deadlines of one batch's calls may be."""
        return max(self.linger, MIN_SLACK)


@dataclass(frozen=True)
class _Rpc:
    """One call that coalesces: its single and batch methods on the QuotaService stub."""

    single: str
    batch: str
    batch_request: Callable[[list[Any]], Any]


CHECK: Final = _Rpc(
    "CheckQuota", "CheckQuotaBatch", lambda items: quota_pb2.CheckQuotaBatchRequest(items=items)
)
RECORD: Final = _Rpc(
    "RecordUsage", "RecordUsageBatch", lambda items: quota_pb2.RecordUsageBatchRequest(items=items)
)


class _BatchSupport:
    """Which batch RPCs the server has, as far as this client has seen."""

    def __init__(self, batching: Batching) -> None:
        self.batching = batching
        self._unsupported_until: dict[str, float] = {}

    def batches_for(self, rpc: _Rpc) -> bool:
        """Whether `rpc`'s calls go in batches now."""
        if not self.batching.enabled:
            return False
        until = self._unsupported_until.get(rpc.single)
        return until is None or time.monotonic() >= until

    def batch_refused(self, rpc: _Rpc, code: grpc.StatusCode) -> bool:
        """Whether a whole-batch failure with `code` means: send the members alone.

        UNIMPLEMENTED (a server older than the batch RPCs) also pauses batching.
        """
        if code == grpc.StatusCode.UNIMPLEMENTED:
            self._unsupported_until[rpc.single] = time.monotonic() + UNSUPPORTED_PAUSE
        return code not in ON_THE_WAY

    @property
    def flush_chunk(self) -> int:
        """Records per RecordUsageBatch of an outbox delivery pass."""
        return self.batching.max_items


# -- errors a batch item becomes ------------------------------------------------------


def item_error_is_complete(error: quota_pb2.BatchItemError) -> bool:
    """Whether an item's error says all the single call's error would.

    An ErrorInfo may carry metadata the item has no field for; the server keeps
    at most ITEM_VIOLATIONS_KEPT violations and ITEM_MESSAGE_KEPT characters.
    """
    return (
        not error.reason
        and len(error.field_violations) < ITEM_VIOLATIONS_KEPT
        and len(error.message) < ITEM_MESSAGE_KEPT
    )


def rpc_error(
    code: grpc.StatusCode, message: str, details: list[Any] | None = None
) -> grpc.aio.AioRpcError:
    """An error as a failed call raises it: code, message, and the google.rpc.Status
    with `details` in the trailers, where `error_details` reads them."""
    trailing = grpc.aio.Metadata()
    if details:
        packed = []
        for detail in details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        status = status_pb2.Status(code=code.value[0], message=message, details=packed)
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        trailing,
        details=message,
        debug_error_string=f"pagemeter batch item: {code.name}: {message}",
    )


def item_error(error: quota_pb2.BatchItemError) -> grpc.aio.AioRpcError:
    """The error a refused batch item stands for, with its BadRequest and ErrorInfo
    in the order the server packs them."""
    details: list[Any] = []
    if error.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.field_violations
                ]
            )
        )
    if error.reason:
        details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    return rpc_error(status_code(error.code), error.message, details)


def deadline_exceeded() -> grpc.aio.AioRpcError:
    return rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, GRPC_DEADLINE_MESSAGE)


def copy_error(error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """A copy for one member of a failed batch: each caller raises (and may add
    notes to) an exception of its own."""
    return grpc.aio.AioRpcError(
        error.code(),
        _as_metadata(error.initial_metadata()),
        _as_metadata(error.trailing_metadata()),
        details=error.details(),
        debug_error_string=error.debug_error_string(),
    )


def _as_metadata(pairs: Any) -> grpc.aio.Metadata:
    # grpc.aio hands a Metadata here; its type stubs say a tuple of pairs.
    return pairs if isinstance(pairs, grpc.aio.Metadata) else grpc.aio.Metadata(*pairs)


def backoff(policy: RetryPolicy, attempt: int) -> float:
    """gRPC's pause before attempt `attempt` + 1: random, up to the exponential bound."""
    bound = min(
        policy.initial_backoff * policy.backoff_multiplier ** (attempt - 1), policy.max_backoff
    )
    return random.uniform(0, bound)  # jitter, not a secret


# -- the async client's batches -------------------------------------------------------


class _SendAlone:
    """A batch member's answer that says: this call must go as a single RPC."""


SEND_ALONE: Final = _SendAlone()
Answer = Any  # a CheckQuotaBatchItem or RecordUsageBatchItem, or SEND_ALONE
Key = tuple[str, tuple[tuple[str, str], ...]]


class _Pending:
    """A batch being gathered: its calls' requests and the futures of their callers."""

    __slots__ = ("deadline", "entries", "key", "requests", "rpc", "sent", "timer", "waiters")

    def __init__(self, rpc: _Rpc, key: Key, deadline: float) -> None:
        self.rpc = rpc
        self.key = key
        self.deadline = deadline  # the earliest member's (loop time)
        self.requests: list[Any] = []
        self.waiters: list[asyncio.Future[Answer]] = []
        self.entries = 0
        self.sent = False
        self.timer: asyncio.TimerHandle | None = None

    def takes(self, deadline: float, entries: int, slack: float, max_items: int) -> bool:
        return (
            self.deadline <= deadline <= self.deadline + slack
            and len(self.requests) < max_items
            and self.entries + entries <= MAX_ENTRIES
        )

    def add(self, request: Any, waiter: asyncio.Future[Answer]) -> None:
        self.requests.append(request)
        self.waiters.append(waiter)
        self.entries += len(request.units)

    def withdraw(self, waiter: asyncio.Future[Answer]) -> None:
        index = self.waiters.index(waiter)
        del self.waiters[index]
        self.entries -= len(self.requests.pop(index).units)


class AsyncCoalescer(_BatchSupport):
    """Sends the async client's CheckQuota and RecordUsage calls, in batches when on."""

    def __init__(self, stubs: AsyncStubs, config: _ClientConfig, batching: Batching) -> None:
        super().__init__(batching)
        self._stubs = stubs
        self._config = config
        self._open: dict[Key, list[_Pending]] = {}
        self._in_flight: set[asyncio.Task[None]] = set()

    async def check_quota(
        self, request: quota_pb2.CheckQuotaRequest, seconds: float | None
    ) -> quota_pb2.CheckQuotaResponse:
        """CheckQuota within `seconds` (None: the client's timeout)."""
        response: quota_pb2.CheckQuotaResponse = await self._call(CHECK, request, seconds)
        return response

    async def record_usage(
        self, request: quota_pb2.RecordUsageRequest, seconds: float | None
    ) -> quota_pb2.RecordUsageResponse:
        """RecordUsage within `seconds` (None: the client's timeout)."""
        response: quota_pb2.RecordUsageResponse = await self._call(RECORD, request, seconds)
        return response

    async def close(self) -> None:
        """Fail the calls still gathering as CANCELLED, as closing the channel fails
        the calls in flight (the client's close() closes it next)."""
        for batches in list(self._open.values()):
            for pending in list(batches):
                self._take_out(pending)
                for waiter in pending.waiters:
                    if not waiter.done():
                        waiter.set_exception(
                            rpc_error(grpc.StatusCode.CANCELLED, "the client was closed")
                        )

    async def _call(self, rpc: _Rpc, request: Any, timeout_seconds: float | None) -> Any:
        seconds = self._config.deadline(timeout_seconds)
        metadata = self._config.call_metadata()
        if not self.batches_for(rpc) or seconds <= self.batching.linger:
            return await self._alone(rpc, request, seconds, metadata)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        attempt = 1
        while True:
            answer = await self._in_batch(rpc, request, deadline, metadata)
            if answer is SEND_ALONE:
                return await self._alone_until(rpc, request, deadline, metadata)
            if answer.WhichOneof("result") == "response":
                return answer.response
            error: quota_pb2.BatchItemError = answer.error
            if error.code == grpc.StatusCode.UNAVAILABLE.name:
                if attempt < self._config.retry.max_attempts:
                    await self._pause_before_retry(attempt, deadline)
                    attempt += 1
                    continue
                raise item_error(error)
            if item_error_is_complete(error):
                raise item_error(error)
            return await self._alone_until(rpc, request, deadline, metadata)

    async def _pause_before_retry(self, attempt: int, deadline: float) -> None:
        """Wait gRPC's backoff; a deadline that comes first ends the call as gRPC would."""
        loop = asyncio.get_running_loop()
        pause = backoff(self._config.retry, attempt)
        if loop.time() + pause >= deadline:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            raise deadline_exceeded()
        await asyncio.sleep(pause)

    async def _alone(
        self, rpc: _Rpc, request: Any, seconds: float, metadata: tuple[tuple[str, str], ...]
    ) -> Any:
        method = getattr(self._stubs.quota, rpc.single)
        return await method(request, timeout=seconds, metadata=metadata)

    async def _alone_until(
        self, rpc: _Rpc, request: Any, deadline: float, metadata: tuple[tuple[str, str], ...]
    ) -> Any:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise deadline_exceeded()
        return await self._alone(rpc, request, remaining, metadata)

    async def _in_batch(
        self, rpc: _Rpc, request: Any, deadline: float, metadata: tuple[tuple[str, str], ...]
    ) -> Answer:
        pending = self._pending_for(rpc, (rpc.single, metadata), deadline, len(request.units))
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        pending.add(request, waiter)
        if len(pending.requests) >= self.batching.max_items:
            self._send(pending)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Not sent yet: the call leaves the batch. Sent: the others' RPC goes on.
            if not pending.sent:
                pending.withdraw(waiter)
                if not pending.waiters:
                    self._take_out(pending)
            raise

    def _pending_for(self, rpc: _Rpc, key: Key, deadline: float, entries: int) -> _Pending:
        batches = self._open.setdefault(key, [])
        for pending in batches:
            if pending.takes(deadline, entries, self.batching.slack, self.batching.max_items):
                return pending
        pending = _Pending(rpc, key, deadline)
        pending.timer = asyncio.get_running_loop().call_later(
            self.batching.linger, self._send, pending
        )
        batches.append(pending)
        return pending

    def _take_out(self, pending: _Pending) -> None:
        """No more calls join `pending`: out of the open batches, its timer stopped."""
        pending.sent = True
        if pending.timer is not None:
            pending.timer.cancel()
        batches = self._open.get(pending.key)
        if batches is not None:
            batches.remove(pending)
            if not batches:
                del self._open[pending.key]

    def _send(self, pending: _Pending) -> None:
        if pending.sent:
            return
        self._take_out(pending)
        task = asyncio.get_running_loop().create_task(self._deliver(pending))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _deliver(self, pending: _Pending) -> None:
        rpc = pending.rpc
        remaining = pending.deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise deadline_exceeded()
            method = getattr(self._stubs.quota, rpc.batch)
            answer = await method(
                rpc.batch_request(pending.requests), timeout=remaining, metadata=pending.key[1]
            )
        except grpc.aio.AioRpcError as error:
            if self.batch_refused(rpc, error.code()):
                _answer_each(pending, lambda _index: SEND_ALONE)
            else:
                _fail_each(pending, error)
            return
        except BaseException as problem:
            # Cancelled (the loop is ending) or broken: no caller waits forever.
            _fail_each(pending, rpc_error(grpc.StatusCode.CANCELLED, f"batch not sent: {problem}"))
            raise
        if len(answer.items) != len(pending.requests):
            _answer_each(pending, lambda _index: SEND_ALONE)  # not the batch protocol
            return
        _answer_each(pending, lambda index: answer.items[index])


def _answer_each(pending: _Pending, answer: Callable[[int], Answer]) -> None:
    for index, waiter in enumerate(pending.waiters):
        if not waiter.done():  # a cancelled caller's future is done
            waiter.set_result(answer(index))


def _fail_each(pending: _Pending, error: grpc.aio.AioRpcError) -> None:
    for waiter in pending.waiters:
        if not waiter.done():
            waiter.set_exception(copy_error(error))


# -- the blocking client's twin -------------------------------------------------------


class Coalescer(_BatchSupport):
    """Sends the blocking client's CheckQuota and RecordUsage calls, each alone.

    A blocking call holds its thread until the answer: to share an RPC, threads
    would hand their calls to a sending thread and wait on a condition, two
    thread switches and GIL hand-offs per call, which cost in CPython about
    what the batch saves, and the linger would be added to every call of a
    thread pool too small to fill batches. So the blocking client accepts the
    settings (code moves between the clients unchanged) and coalesces nothing;
    its outbox deliveries still go in batches. For throughput from threads, use
    check_quota_batch / record_usage_batch, or the async client.
    """

    def __init__(self, stubs: Stubs, config: _ClientConfig, batching: Batching) -> None:
        super().__init__(batching)
        self._stubs = stubs
        self._config = config

    def check_quota(
        self, request: quota_pb2.CheckQuotaRequest, seconds: float | None
    ) -> quota_pb2.CheckQuotaResponse:
        return self._stubs.quota.CheckQuota(request, **self._config.call_options(seconds))

    def record_usage(
        self, request: quota_pb2.RecordUsageRequest, seconds: float | None
    ) -> quota_pb2.RecordUsageResponse:
        return self._stubs.quota.RecordUsage(request, **self._config.call_options(seconds))

    def close(self) -> None:
        return None
