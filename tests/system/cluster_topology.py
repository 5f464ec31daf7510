"""Real Redis Cluster topologies on loopback, for the cluster test modules.

The nodes are server processes from the binary the project installs (Valkey,
or PAGEMETER_REDIS_SERVER), joined with plain CLUSTER commands, as
`redis-cli --cluster create` joins them (no CLI is bundled with the server):
distinct config epochs, the slots split evenly over the primaries, a MEET of
every node, then one REPLICATE per replica. `Cluster.start` then waits until
every replica has synchronised with its primary and every node agrees on the
roles, so a test never sees a half-made cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from pagemeter_server.ops.embedded import RedisProcess, free_port

SETTLE_SECONDS = 30.0
SLOTS = 16384


def cluster_port() -> int:
    """A free port p whose cluster bus port p + 10000 is free too, both below the
    kernel's ephemeral range (see free_port)."""
    return free_port(also_free_at=10000)


@dataclass
class Cluster:
    """A cluster of `primaries` primaries, each with `replicas` replicas."""

    base: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = 15000
    # More configuration for every node, e.g. ["--cluster-require-full-coverage", "no"].
    extra_args: list[str] = field(default_factory=list)
    nodes: list[RedisProcess] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.primaries * (1 + self.replicas)):
            node = RedisProcess(
                self.base / f"node{i}",
                port=cluster_port(),
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    *self.extra_args,
                ],
            )
            self.nodes.append(node)
            node.start()
        self._create()
        self._wait_until_settled()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _create(self) -> None:
        primaries = self.nodes[: self.primaries]
        for epoch, node in enumerate(self.nodes, start=1):
            with _probe(node) as client:
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
        share = SLOTS // self.primaries
        for index, node in enumerate(primaries):
            last = SLOTS - 1 if index == self.primaries - 1 else (index + 1) * share - 1
            with _probe(node) as client:  # ADDSLOTS, not ADDSLOTSRANGE: Redis 6.2 too
                client.execute_command("CLUSTER ADDSLOTS", *range(index * share, last + 1))
        for node in self.nodes[1:]:
            with _probe(node) as client:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        deadline = time.monotonic() + SETTLE_SECONDS
        while not all(self._knows_every_node(node) for node in self.nodes):
            assert time.monotonic() < deadline, "the nodes did not meet"
            time.sleep(0.05)
        for index, node in enumerate(self.nodes[self.primaries :]):
            with _probe(primaries[index % self.primaries]) as client:
                primary_id = client.execute_command("CLUSTER MYID")
            with _probe(node) as client:
                client.execute_command("CLUSTER REPLICATE", primary_id)

    def _knows_every_node(self, node: RedisProcess) -> bool:
        with _probe(node) as client:
            info = client.cluster("info")
        return int(info.get("cluster_known_nodes", 0)) == len(self.nodes)

    def _wait_until_settled(self) -> None:
        """Wait until every node says the cluster is ok and every replica's link is up."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while not self._settled():
            assert time.monotonic() < deadline, f"cluster not settled: {self.describe()}"
            time.sleep(0.1)

    def _settled(self) -> bool:
        roles = []
        for node in self.alive():
            with _probe(node) as client:
                try:
                    info = client.cluster("info")
                    replication = client.info("replication")
                    persistence = client.info("persistence")
                except redis.RedisError:
                    return False
            if info.get("cluster_state") != "ok":
                return False
            if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
            # A replica refuses SIGTERM until its first append-only file is written.
            if persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]:
                return False
            roles.append(replication["role"])
        expected_replicas = self.primaries * self.replicas - self.dead_count()
        return roles.count("master") == self.primaries and roles.count("slave") == max(
            expected_replicas, 0
        )

    def alive(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.pid is not None]

    def dead_count(self) -> int:
        return len(self.nodes) - len(self.alive())

    def role(self, node: RedisProcess) -> dict[str, object]:
        with _probe(node) as client:
            replication: dict[str, object] = client.info("replication")
        return replication

    def primary_nodes(self) -> list[RedisProcess]:
        return [node for node in self.alive() if self.role(node)["role"] == "master"]

    def replica_of(self, primary: RedisProcess) -> RedisProcess:
        """The (first) live replica that follows `primary`."""
        for node in self.alive():
            role = self.role(node)
            if role["role"] == "slave" and int(str(role["master_port"])) == primary.port:
                return node
        raise AssertionError(f"no replica follows port {primary.port}")

    def owner_of(self, key: str) -> RedisProcess:
        """The live primary that serves `key`'s slot, as the cluster says now."""
        with _probe(self.alive()[0]) as client:
            slot = int(client.cluster("keyslot", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        raise AssertionError(f"no node serves {key}")

    def move_slot(
        self, slot: int, source: RedisProcess, target: RedisProcess, batch: int = 10
    ) -> int:
        """Move one slot with its keys, as `redis-cli --cluster reshard` does: mark it
        importing and migrating, MIGRATE its keys `batch` at a time (redis-cli's
        default pipeline), then give it to the target on every primary. Returns the
        number of keys moved."""
        with _probe(source) as src, _probe(target) as dst:
            source_id = src.execute_command("CLUSTER MYID")
            target_id = dst.execute_command("CLUSTER MYID")
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            moved = 0
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        for node in self.primary_nodes():
            if node not in (source, target):
                with _probe(node) as other:
                    other.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        return moved

    def keyslot(self, key: str) -> int:
        with _probe(self.alive()[0]) as client:
            return int(client.cluster("keyslot", key))

    def describe(self) -> str:
        parts = []
        for node in self.alive():
            try:
                role = self.role(node)
                parts.append(f"{node.port}:{role['role']}")
            except redis.RedisError as error:
                parts.append(f"{node.port}:{error}")
        return ", ".join(parts)


@contextlib.contextmanager
def running_cluster(base: Path, **options: Any) -> Iterator[Cluster]:
    """A started cluster (`options` as Cluster's), stopped at the end; a node a
    test froze with SIGSTOP is woken first, so that it can be stopped."""
    topology = Cluster(base, **options)
    try:
        topology.start()
        yield topology
    finally:
        for node in topology.alive():
            assert node.pid is not None
            os.kill(node.pid, signal.SIGCONT)
        topology.stop()


# Three primaries with a replica each, and a node timeout short enough for a
# failover within seconds: the failover tests' topology.
FAILOVER = {"primaries": 3, "replicas": 1, "node_timeout_ms": 1000}


def _probe(node: RedisProcess) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=node.port,
        decode_responses=True,
        socket_timeout=2,
        socket_connect_timeout=2,
    )
