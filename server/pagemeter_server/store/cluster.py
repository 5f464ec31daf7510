"""redis-py's cluster clients, with three behaviours changed for pagemeter.

1. A command that timed out is not retried. By default the client retries it
   three more times, so a stalled primary held each RPC for four Redis
   timeouts. A timeout now fails the call at once (UNAVAILABLE; callers retry
   with their idempotency keys), while the client still re-reads the slot map
   before its next command, so a failover is followed as before. Broken
   connections and CLUSTERDOWN are still retried: those answers come fast.
2. During a failover the client closes a node's connections from one task
   while another task may be writing on one of them; the writer then fails
   deep inside the connection (uvloop's RuntimeError "the handler is closed",
   or AttributeError "'NoneType' object has no attribute ..."). That is a
   broken connection, and is reported as one (ConnectionError), so it is
   retried on a fresh connection like any other instead of reaching the caller
   as INTERNAL.
3. A command that meets a slot in migration is retried until the RPC's
   deadline. While a slot moves, a script whose keys are partly on each node
   is answered ASK by the old owner and TRYAGAIN by the new one until the last
   of its keys has moved; redis-py gives up after 16 redirections (a fraction
   of a second, "TTL exhausted"), far less than moving a busy organization's
   keys can take. pagemeter keeps retrying, with a short backoff, for as long
   as the caller waits (or --redis-timeout when it set no deadline), and then
   answers UNAVAILABLE: the script never ran, so a retry is exact. A
   CLUSTERDOWN that outlasts redis-py's own retries is waited out the same
   way, but for --redis-timeout at most: with cluster-require-full-coverage
   yes (Redis's default) every node answers it between the moment a dead
   primary is marked failed and the election of its replica — a second or
   so in which organizations on live primaries would be refused too — and a
   cluster that stays down must not hold calls for their whole deadline.
4. The client re-reads the slot map after a failed call, and each time it
   also asked its default node — the first primary of the map, often a dead
   one during a failover — for the server's COMMAND table. That call failed,
   the client then closed every connection to every node and refused the
   command, so one dead primary refused calls of organizations on the other
   primaries too. The table does not change while pagemeter runs: it is read
   once, from the first node that answers.
5. A script a primary does not have yet (NOSCRIPT: its first use there, or a
   promoted replica) is loaded on every primary; when one of them is dead, the
   load failed and so did the call, again for an organization on a live
   primary. The script is now loaded on every primary that answers.
6. A call that finds all of a node's connections busy waits for one. redis-py's
   cluster nodes keep at most max_connections connections each and refuse the
   next call at once (MaxConnectionsError), which pagemeter would answer
   UNAVAILABLE: a burst of a few hundred calls in one process refused some of
   them. Every call now takes one of max_connections slots first (waiting up
   to --redis-timeout, or the call's deadline), and holds at most one
   connection per node while it runs, so no node is ever asked for more
   connections than it keeps, as BlockingConnectionPool does for one Redis.
   Each node keeps MAINTENANCE_CONNECTIONS more, outside the slots, for the
   health probe and slot-map reads, which must not wait behind calls (a busy
   node is not a dead one).
7. A command issued while the client has no slot map (before its first one
   is read, and after redis-py discards it: every CLUSTERDOWN, every fifth
   MOVED) is sent to a random node: redis-py picks its routing policy before
   it reads the map, and without a default node it takes the command for a
   keyless one. Each such script call was answered MOVED; every fifth MOVED
   made redis-py close all its connections, including those other calls were
   using, so a burst of calls right after a start refused dozens of them
   (UNAVAILABLE). A command now waits for the map to be read first.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.exceptions
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster

from pagemeter_server.store.faults import (
    StoreUnavailable,
    closed_under_call,
    pause,
    pause_seconds,
    wait_budget,
)

# The longest one attempt of a redirected command takes: a few round trips and
# at most two of redis-py's 50 ms TRYAGAIN sleeps.
ATTEMPT_SECONDS = 0.15

# Connections per node beyond --redis-max-connections, for the health probe
# (one per primary) and a re-read of the slot map (one), which use nodes directly.
MAINTENANCE_CONNECTIONS = 2

# Set while a task (and the tasks it gathers) holds a connection slot: a call
# made inside another (a pipeline's redirected command, a script load after
# NOSCRIPT) uses the slot already held instead of waiting for a second one,
# which could wait forever with every slot held by such callers.
_holding_a_slot: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pagemeter_cluster_slot", default=False
)


def in_migration(error: BaseException) -> bool:
    """An answer that means "this slot is moving between nodes": nothing ran."""
    if isinstance(error, redis.exceptions.TryAgainError | redis.exceptions.AskError):
        return True  # AskError includes MovedError
    # redis-py's own give-up after too many redirections; its subclasses
    # (CLUSTERDOWN, MASTERDOWN) are failovers, retried by the client's policy.
    return type(error) is redis.exceptions.ClusterError


class CommandTableOnce(AsyncCommandsParser):
    """Reads the COMMAND table once; a re-read of the slot map only moves its node."""

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if self.commands:
            if node is not None:
                self.node = node
            return
        await super().initialize(node)


class FailFastCluster(RedisCluster):
    """The async cluster client pagemeter uses (see the module docstring)."""

    def __init__(self, *args: Any, max_connections: int = 100, **kwargs: Any) -> None:
        kwargs["max_connections"] = max_connections + MAINTENANCE_CONNECTIONS
        super().__init__(*args, **kwargs)
        self.commands_parser = CommandTableOnce()
        self.max_connections = max_connections
        self._connection_slots = asyncio.Semaphore(max_connections)

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]  # a narrower tuple on purpose
        redis.exceptions.ConnectionError,
        redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
    )
    # How long a command outside any RPC deadline waits out a slot migration;
    # connect_redis sets it to --redis-timeout.
    migration_wait_seconds = 2.0
    # Redirections (MOVED, ASK, TRYAGAIN) redis-py follows within one attempt
    # (16 by default, with sleeps: up to half a second). Few, so that an attempt
    # is short and execute_command above keeps the deadline.
    RedisClusterRequestTTL = 5

    @contextlib.asynccontextmanager
    async def connection_slot(self) -> AsyncIterator[None]:
        """Hold one of the client's max_connections call slots (see point 6)."""
        if _holding_a_slot.get():
            yield
            return
        waited = wait_budget(self.migration_wait_seconds)
        try:
            async with asyncio.timeout(waited):
                await self._connection_slots.acquire()
        except TimeoutError:
            raise StoreUnavailable(
                f"all {self.max_connections} Redis connections stayed busy for "
                f"{waited:.2f} s (--redis-max-connections)"
            ) from None
        held = _holding_a_slot.set(True)
        try:
            yield
        finally:
            _holding_a_slot.reset(held)
            self._connection_slots.release()

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # redis-py's own refusal
        # redis-py declares an attribute abstract that its own pipelines set.
        return WaitingClusterPipeline(self, transaction)  # type: ignore[abstract]

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        budget = wait_budget(self.migration_wait_seconds)
        attempt = 0
        while True:
            try:
                await self._read_slot_map_if_missing()
                async with self.connection_slot():
                    return await super().execute_command(*args, **kwargs)
            except (redis.exceptions.RedisError, RuntimeError) as error:
                if in_migration(error):
                    limit = budget
                elif isinstance(error, redis.exceptions.ClusterDownError):
                    limit = min(budget, self.migration_wait_seconds)
                else:
                    raise
                # Another attempt must end in time for the answer to make the deadline.
                if time.monotonic() - started + pause_seconds(attempt) + ATTEMPT_SECONDS > limit:
                    if in_migration(error):
                        raise StoreUnavailable(
                            "the organization's slot is moving between Redis nodes and did "
                            "not settle within the call's deadline"
                        ) from error
                    raise
            await pause(attempt)
            attempt += 1

    async def _read_slot_map_if_missing(self) -> None:
        """Read the slot map before a command that would otherwise be routed
        without one (point 7). A failure is left to redis-py's own retries."""
        if not self._initialize or self.get_default_node() is not None:
            return
        with contextlib.suppress(
            redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError
        ):
            await self.initialize()

    async def script_load(self, script: Any) -> str:
        """Load a script on every primary that answers; fails only if none does."""
        await self.initialize()
        async with self.connection_slot():
            answers = await asyncio.gather(
                *(node.execute_command("SCRIPT", "LOAD", script) for node in self.get_primaries()),
                return_exceptions=True,
            )
        loaded = [str(sha) for sha in answers if not isinstance(sha, BaseException)]
        if loaded:
            return loaded[0]
        failure = next((a for a in answers if isinstance(a, BaseException)), None)
        raise redis.exceptions.ConnectionError(
            "no Redis cluster primary answered SCRIPT LOAD"
        ) from failure

    async def _execute_command(self, target_node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        except (AttributeError, RuntimeError) as error:
            if not closed_under_call(error):
                raise
            raise redis.exceptions.ConnectionError(
                f"connection to {target_node.name} closed during a cluster change"
            ) from error


class WaitingClusterPipeline(ClusterPipeline):
    """A pipeline that runs in one of its client's connection slots (point 6)."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        cluster: FailFastCluster = self.cluster_client  # type: ignore[assignment]  # made by it
        async with cluster.connection_slot():
            return await super().execute(raise_on_error, allow_redirections)


class FailFastSyncCluster(redis.RedisCluster):
    """The synchronous cluster client of the exporter: a timed-out command is not retried."""

    ERRORS_ALLOW_RETRY = FailFastCluster.ERRORS_ALLOW_RETRY  # type: ignore[assignment]
