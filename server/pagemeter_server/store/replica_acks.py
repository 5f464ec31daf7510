"""Acknowledgements that mean "on N replicas too" (--replica-acks N).

Redis replicates asynchronously: a change the primary made and pagemeter
acknowledged can be missing from the replica promoted after a failover. With
--replica-acks N, a changing script call is sent as three commands on ONE
connection, in one round trip:

    EVALSHA <script> ...       the change, atomic as always
    SET pm:{org}:ack 1 PX ...  a marker write of the organization
    WAIT N <timeout>           until N replicas have everything this connection wrote

WAIT counts the replicas that have received the connection's last write. The
marker makes that write exist even when the script changed nothing (a retry
answered as a duplicate), and since replication is in order, a replica that has
the marker has every earlier change of the organization too — including the
original of the duplicate. When fewer than N replicas confirm within the
timeout, the call is answered UNAVAILABLE: the change may exist on the primary
alone, and the caller's retry with the same request id is answered as a
duplicate once the replicas have caught up (or re-applies it on a promoted
replica that never got it). The marker lives in the organization's hash slot,
so in a cluster all three commands go to the node that owns the organization.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript

from pagemeter_server.store.faults import (
    StoreUnavailable,
    closed_under_call,
    pause,
    pause_seconds,
    wait_budget,
)

# The marker only has to outlive the WAIT that follows it.
MARKER_TTL_MS = 60_000

ScriptArg = str | int | float


class ReplicasBehind(StoreUnavailable):
    """Fewer replicas than required confirmed a change within the timeout."""

    def __init__(self, confirmed: int, required: int) -> None:
        super().__init__(
            f"the change was confirmed by {confirmed} of the {required} required replicas in time"
        )
        self.confirmed = confirmed
        self.required = required


def marker_key(keys: Sequence[str]) -> str:
    """The organization's marker key, from any of its keys ("pm:{org}:...")."""
    first = keys[0]
    return first[: first.index("}") + 1] + ":ack"


class ReplicaAcks:
    """Runs changing scripts so that their acknowledgement waits for N replicas."""

    def __init__(
        self, client: aioredis.Redis, replicas: int, timeout_seconds: float, wait_seconds: float
    ) -> None:
        self.client = client
        self.replicas = replicas
        self.timeout_ms = max(1, round(timeout_seconds * 1000))
        # How long a call outside any RPC deadline waits out a slot migration.
        self.wait_seconds = wait_seconds
        self._cluster: Any = client if isinstance(client, RedisCluster) else None  # type: ignore[unreachable]

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """The script's reply, once N replicas have the change (else ReplicasBehind)."""
        if self._cluster is not None:
            reply, confirmed = await self._on_owner_node(script, keys, args)
        else:
            reply, confirmed = await self._on_one_connection(script, keys, args)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(confirmed, BaseException):
            raise confirmed
        if int(confirmed) < self.replicas:
            raise ReplicasBehind(int(confirmed), self.replicas)
        return reply

    def _commands(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> list[tuple[Any, ...]]:
        return [
            ("EVALSHA", script.sha, len(keys), *keys, *args),
            ("SET", marker_key(keys), "1", "PX", MARKER_TTL_MS),
            ("WAIT", self.replicas, self.timeout_ms),
        ]

    async def _on_one_connection(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> tuple[Any, Any]:
        """Single Redis or Sentinel: one pipeline (no MULTI) is one connection."""
        for _ in range(2):
            async with self.client.pipeline(transaction=False) as pipe:
                for command in self._commands(script, keys, args):
                    pipe.execute_command(*command)
                reply, _marker, confirmed = await pipe.execute(raise_on_error=False)
            if not isinstance(reply, redis.exceptions.NoScriptError):
                break
            # A restarted or promoted Redis lacks the script: it did not run.
            await self.client.script_load(script.script)
        return reply, confirmed

    async def _on_owner_node(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> tuple[Any, Any]:
        """Cluster: the three commands on one connection to the slot's owner.

        Redirections are followed here (the client's own handling is per
        command): MOVED re-reads the owner, ASK sends the commands to the
        importing node after ASKING, TRYAGAIN waits; each means that nothing
        ran, until the call's deadline.
        """
        cluster = self._cluster
        started = time.monotonic()
        budget = wait_budget(self.wait_seconds)
        asking: ClusterNode | None = None
        attempt = 0
        while True:
            await cluster.initialize()  # re-reads the slot map after a failure (else a no-op)
            node = asking or cluster.get_node_from_key(keys[0])
            if node is None:
                raise StoreUnavailable("no Redis node serves the organization's slot")
            commands = [
                PipelineCommand(position, *command)
                for position, command in enumerate(
                    ([("ASKING",)] if asking else []) + self._commands(script, keys, args)
                )
            ]
            try:
                async with cluster.connection_slot():
                    await node.execute_pipeline(commands)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                cluster._initialize = True  # re-read the slot map before the next command
                raise
            except (RuntimeError, AttributeError) as error:
                if not closed_under_call(error):
                    raise
                cluster._initialize = True
                raise redis.exceptions.ConnectionError(
                    f"connection to {node.name} closed during a cluster change"
                ) from error
            reply, confirmed = commands[-3].result, commands[-1].result
            asking = None
            if isinstance(reply, redis.exceptions.NoScriptError):
                async with cluster.connection_slot():
                    await node.execute_command("SCRIPT", "LOAD", script.script)
                continue
            if isinstance(reply, redis.exceptions.MovedError):
                await cluster.nodes_manager.move_slot(reply)
            elif isinstance(reply, redis.exceptions.AskError):
                asking = cast(ClusterNode | None, cluster.get_node(reply.host, reply.port))
            elif isinstance(reply, redis.exceptions.ClusterDownError):
                # A failover's election (see cluster.py): waited out for
                # --redis-timeout at most, then answered UNAVAILABLE.
                if time.monotonic() - started >= min(budget, self.wait_seconds):
                    return reply, confirmed
                cluster._initialize = True
            elif not isinstance(reply, redis.exceptions.TryAgainError):
                return reply, confirmed
            # The next attempt (one round trip) must end before the deadline.
            if time.monotonic() - started + pause_seconds(attempt) + 0.02 > budget:
                raise StoreUnavailable(
                    "the organization's slot is moving between Redis nodes and did not settle "
                    "within the call's deadline"
                ) from reply
            if not asking:
                await pause(attempt)
                attempt += 1
