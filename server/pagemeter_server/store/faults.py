"""Which store failures are transient, and how long a call may wait one out.

A transient failure — a connection that broke, a stalled node, a failover, a
slot being moved to another node — leaves the store unchanged or changed
exactly once under the caller's idempotency key, so the caller can retry with
the same request id. Every such failure is answered UNAVAILABLE, never INTERNAL:
a caller that follows the contract retries only UNAVAILABLE, and would drop the
job otherwise (docs/reliability.md).

The call's deadline is kept in a context variable by the RPC wrapper
(errors.grpc_errors), so that the store can wait out a slot migration for as
long as the caller is prepared to wait, and not longer.
"""

from __future__ import annotations

import asyncio
import contextvars
import time

import redis.exceptions

# Replies of a node that is failing over, loading, busy, or moving a slot; the
# same call succeeds later. (READONLY: a former primary now a replica;
# NOREPLICAS: min-replicas-to-write not met; MASTERDOWN: a replica whose primary
# link is down; TRYAGAIN/ASK/MOVED: a slot in migration.)
TRANSIENT_REPLIES = (
    "READONLY",
    "NOREPLICAS",
    "MASTERDOWN",
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,  # includes "TTL exhausted" after many redirections
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,  # includes MovedError
    redis.exceptions.ReadOnlyError,
    redis.exceptions.SlotNotCoveredError,
    OSError,  # includes the builtin TimeoutError of asyncio.timeout
)


class StoreUnavailable(redis.exceptions.ConnectionError):
    """A transient store failure, whatever form it arrived in (see is_transient)."""


def closed_under_call(error: BaseException, *, inside_client: bool = True) -> bool:
    """A connection closed by another task while this call was using it.

    During a failover or a slot-map refresh redis-py closes a node's
    connections from one task while another may be writing on one of them:
    uvloop then raises RuntimeError ("unable to perform operation on
    <TCPTransport closed=True>; the handler is closed") and asyncio's own
    transports or redis-py's reader AttributeError ("'NoneType' object has no
    attribute ..."). Both are a broken connection. An AttributeError means that
    only when it was raised inside the Redis client (`inside_client`): anywhere
    else it is a defect, answered INTERNAL.
    """
    text = str(error)
    if isinstance(error, RuntimeError):
        return "handler is closed" in text or "closed=True" in text
    if isinstance(error, AttributeError) and inside_client:
        return "'NoneType' object has no attribute" in text
    return False


def is_transient(error: BaseException, *, inside_client: bool = False) -> bool:
    """Whether `error` means "retry the same call later" (see closed_under_call
    for `inside_client`)."""
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    if isinstance(error, redis.exceptions.ResponseError):
        return reply_code(error).startswith(TRANSIENT_REPLIES)
    return closed_under_call(error, inside_client=inside_client)


def reply_code(error: redis.exceptions.ResponseError) -> str:
    """The error reply as Redis 7 gives it ("READONLY You can't write ...").

    Redis 6 wraps an error a script met in its own: "Error running script (call
    to f_...): @user_script:1: @user_script: 1: -READONLY You can't write...";
    the reply that says what happened follows the last " -"."""
    text = str(error)
    if text.startswith("Error running script") and " -" in text:
        return text.rsplit(" -", 1)[1]
    return text


def demoted_primary(error: BaseException) -> bool:
    """Whether Redis refused a write because it is a replica now (READONLY, as
    Redis 7 and Redis 6 inside a script say it)."""
    return isinstance(error, redis.exceptions.ReadOnlyError) or (
        isinstance(error, redis.exceptions.ResponseError)
        and reply_code(error).startswith("READONLY")
    )


# The monotonic time (time.monotonic()) by which the current RPC must be
# answered; None when the caller set no deadline.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "pagemeter_call_deadline", default=None
)

# Time kept back from the caller's deadline to send the answer.
ANSWER_MARGIN_SECONDS = 0.05


def set_call_deadline(time_remaining: float | None) -> None:
    """Remember the current RPC's deadline (gRPC's time_remaining(), in seconds)."""
    if time_remaining is None or time_remaining > 10**6:  # no deadline
        call_deadline.set(None)
    else:
        call_deadline.set(time.monotonic() + time_remaining)


def wait_budget(default_seconds: float) -> float:
    """Seconds the current call may still spend waiting out a transient failure:
    until its deadline (less a margin to answer), or `default_seconds` without one."""
    deadline = call_deadline.get()
    if deadline is None:
        return default_seconds
    return max(0.0, deadline - time.monotonic() - ANSWER_MARGIN_SECONDS)


def pause_seconds(attempt: int) -> float:
    """The backoff before retry number `attempt` + 1: 5 ms, 10 ms, 20 ms, then 40 ms."""
    return min(0.005 * 2.0**attempt, 0.04)


async def pause(attempt: int) -> None:
    """Back off between retries (pause_seconds)."""
    await asyncio.sleep(pause_seconds(attempt))
