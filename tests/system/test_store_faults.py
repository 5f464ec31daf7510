"""Every transient store failure is answered UNAVAILABLE (retry with the same id),
never INTERNAL, and changes nothing: a caller that follows the contract retries
only UNAVAILABLE, and would drop the job on anything else.

Each case is a real failure of a real Redis (or of uvloop's transport), not a
stand-in: a replica that refuses writes (READONLY, as a client still connected
to a former primary sees it after a failover), a primary that refuses writes
without enough replicas (NOREPLICAS), and the error uvloop raises when a
connection is closed under a call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import uvloop
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pagemeter.v1 import quota_pb2
from pagemeter_server.api.status import failure_for
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.store.faults import is_transient
from tests.system.test_replica_acks import pagemeter, settings_for


def store_unavailable(error: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE with the ErrorInfo reason STORE_UNAVAILABLE."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if error.code() != grpc.StatusCode.UNAVAILABLE or status is None:
        return False
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return bool(info.reason == "STORE_UNAVAILABLE")
    return False


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    primary = RedisProcess(tmp_path / "primary")
    primary.start()
    replica = RedisProcess(
        tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)]
    )
    replica.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            with redis.Redis(port=replica.port, decode_responses=True) as probe:
                if probe.info("replication").get("master_link_status") == "up":
                    break
            assert time.monotonic() < deadline, "the replica never synchronised"
            time.sleep(0.1)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


async def test_a_replica_that_refuses_writes_is_unavailable_not_internal(
    primary_and_replica: tuple[RedisProcess, RedisProcess],
) -> None:
    """pagemeter pointed at a replica (as a connection to a former primary is after a failover): a record and a hold are UNAVAILABLE / STORE_UNAVAILABLE, not INTERNAL, and nothing is written; with the fail-open policy a check is admitted FAIL_OPEN."""
    primary, replica = primary_and_replica
    async with pagemeter(settings_for("single", 0), primary.url):
        pass  # the plan, set on the primary, replicated
    await asyncio.sleep(0.2)
    async with pagemeter(settings_for("single", 0), replica.url, plan=False) as quota:
        with pytest.raises(grpc.aio.AioRpcError) as record:
            await quota.RecordUsage(
                quota_pb2.RecordUsageRequest(org_id="acme", request_id="job", units={"pages": 1}),
                timeout=5,
            )
        with pytest.raises(grpc.aio.AioRpcError) as hold:
            await quota.CheckQuota(
                quota_pb2.CheckQuotaRequest(
                    org_id="acme", request_id="job", units={"pages": 1}, hold=True
                ),
                timeout=5,
            )
    assert store_unavailable(record.value), record.value
    assert store_unavailable(hold.value), hold.value
    async with pagemeter(
        settings_for("single", 0, store_failure_policy="open"), replica.url, plan=False
    ) as quota:
        admitted = await quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id="acme", request_id="job", units={"pages": 1}, hold=True
            ),
            timeout=5,
        )
    assert admitted.allowed
    assert admitted.reason == quota_pb2.DECISION_REASON_FAIL_OPEN
    with redis.Redis(port=primary.port) as store:
        assert not store.exists("pm:{acme}:r:job")


async def test_a_primary_without_enough_replicas_is_unavailable_and_unchanged(
    tmp_path: Path,
) -> None:
    """A primary configured with min-replicas-to-write 1 and no replica answers NOREPLICAS: RecordUsage is UNAVAILABLE / STORE_UNAVAILABLE, and the record does not exist."""
    primary = RedisProcess(tmp_path / "primary")
    primary.start()
    try:
        async with pagemeter(settings_for("single", 0), primary.url):
            pass  # the plan
        with redis.Redis(port=primary.port) as store:
            store.config_set("min-replicas-to-write", 1)
        async with pagemeter(settings_for("single", 0), primary.url, plan=False) as quota:
            with pytest.raises(grpc.aio.AioRpcError) as record:
                await quota.RecordUsage(
                    quota_pb2.RecordUsageRequest(
                        org_id="acme", request_id="job", units={"pages": 1}
                    ),
                    timeout=5,
                )
        assert store_unavailable(record.value), record.value
        with redis.Redis(port=primary.port) as store:
            assert not store.exists("pm:{acme}:r:job")
    finally:
        primary.stop()


def test_a_connection_closed_under_a_call_is_unavailable() -> None:
    """uvloop's error for a write on a transport another task closed ('the handler is closed'), produced for real, is transient and answered UNAVAILABLE; an unrelated RuntimeError stays INTERNAL."""

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        await writer.wait_closed()

    async def closed_transport_error() -> BaseException:
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.close()
        await asyncio.sleep(0.01)
        try:
            writer.write(b"PING\r\n")
        except RuntimeError as error:
            return error
        finally:
            server.close()
            await server.wait_closed()
        raise AssertionError("uvloop accepted a write on a closed transport")

    error = uvloop.run(closed_transport_error())
    assert "handler is closed" in str(error)
    assert is_transient(error)
    assert failure_for(error).message.startswith("the quota store is unavailable")
    assert not is_transient(RuntimeError("dictionary changed size during iteration"))
    assert "internal" in failure_for(RuntimeError("something else")).message
