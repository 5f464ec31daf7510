"""Zero lost, zero doubled: RecordUsage from concurrent clients while Redis and the
pagemeter server are killed with SIGKILL and restarted, again and again.

Clients retry each record with its original request id until it is
acknowledged. Afterwards every acknowledged record is counted exactly once:
the committed total equals the sum of the acknowledged records, the job count
equals their number, and the records list holds each id once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    plan_pb2,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
)
from pagemeter_server.ops.embedded import RedisProcess, free_port
from server_process import ServerProcess

CLIENTS = 8
RECORDS_PER_CLIENT = 60
# Clients pace themselves so that the faults land among the records, not after them.
PACE_SECONDS = 0.1
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,  # a connection cut mid-call
}


def chaos_server(redis_url: str, log: Path) -> ServerProcess:
    """pagemeter-server on the Redis, killable and restartable on its port."""
    return ServerProcess.pagemeter(
        [
            "--redis-url",
            redis_url,
            "--dev-open-access",
            "--redis-timeout",
            "0.5",
            "--health-interval",
            "0.1",
            "--log-level",
            "WARNING",
        ],
        log,
    )


@dataclass
class Ledger:
    """What the clients were told: acknowledged records and their units."""

    acked: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisProcess, ServerProcess, str]]:
    redis_process = RedisProcess(tmp_path / "redis")
    redis_process.start()
    server = chaos_server(redis_process.url, tmp_path / "server.log")
    server.start()
    try:
        yield redis_process, server, server.target
    finally:
        server.kill()
        redis_process.stop()


def client_loop(target: str, client: int, ledger: Ledger, deadline: float) -> None:
    rng = random.Random(client)
    with grpc.insecure_channel(target) as channel:
        stub = quota_pb2_grpc.QuotaServiceStub(channel)
        for n in range(RECORDS_PER_CLIENT):
            request = quota_pb2.RecordUsageRequest(
                org_id="acme",
                request_id=f"c{client}-r{n}",
                units={"pages": rng.randint(1, 20)},
                document_type="invoice",
            )
            while True:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{request.request_id} never acknowledged")
                try:
                    reply = stub.RecordUsage(request, timeout=2)
                except grpc.RpcError as error:
                    if error.code() not in RETRYABLE:
                        raise AssertionError(f"{request.request_id}: {error}") from error
                    with ledger.lock:
                        ledger.retries += 1
                    time.sleep(0.02)
                    continue
                with ledger.lock:
                    ledger.acked[request.request_id] = request.units["pages"]
                    ledger.duplicates += reply.duplicate
                break
            time.sleep(PACE_SECONDS)


def test_kills_and_restarts_lose_and_double_nothing(
    cluster: tuple[RedisProcess, ServerProcess, str],
) -> None:
    """8 clients record 480 jobs while Redis and pagemeter are each SIGKILLed and restarted several times; every acknowledged job is counted exactly once."""
    redis_process, server, target = cluster
    with grpc.insecure_channel(target) as channel:
        server.wait_until_serving()
        admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
            admin_pb2.SetPlanRequest(
                plan=plan_pb2.Plan(
                    org_id="acme",
                    name="Chaos",
                    timezone="UTC",
                    metrics=[plan_pb2.MetricLimits(metric="pages", overage_allowed=True)],
                )
            ),
            timeout=5,
        )
    ledger = Ledger()
    deadline = time.monotonic() + 60
    clients = [
        threading.Thread(target=client_loop, args=(target, i, ledger, deadline), daemon=True)
        for i in range(CLIENTS)
    ]
    errors: list[BaseException] = []

    def guarded(thread: threading.Thread) -> None:
        try:
            thread.run()
        except BaseException as exc:
            errors.append(exc)

    runners = [threading.Thread(target=guarded, args=(c,), daemon=True) for c in clients]
    for runner in runners:
        runner.start()
    faults = {"redis": 0, "server": 0}
    rng = random.Random(7)
    while any(r.is_alive() for r in runners):
        time.sleep(rng.uniform(0.1, 0.3))
        redis_process.kill()
        faults["redis"] += 1
        time.sleep(rng.uniform(0.05, 0.2))
        redis_process.start()
        time.sleep(rng.uniform(0.1, 0.3))
        server.kill()
        faults["server"] += 1
        time.sleep(rng.uniform(0.0, 0.1))
        server.start()
        if faults["server"] >= 6:
            break
    for runner in runners:
        runner.join(70)
    assert not errors, errors
    assert len(ledger.acked) == CLIENTS * RECORDS_PER_CLIENT

    with grpc.insecure_channel(target) as channel:
        server.wait_until_serving()
        usage = quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
            quota_pb2.GetUsageRequest(org_id="acme"), timeout=5
        )
        committed = {m.metric: m.committed for m in usage.metrics}["pages"]
        listed: list[str] = []
        token = ""
        reporting = reporting_pb2_grpc.ReportingServiceStub(channel)
        while True:
            page = reporting.ListUsageRecords(
                reporting_pb2.ListUsageRecordsRequest(
                    org_id="acme", page_size=1000, page_token=token
                ),
                timeout=5,
            )
            listed.extend(r.request_id for r in page.records)
            token = page.next_page_token
            if not token:
                break
    print(
        f"\nchaos: {len(ledger.acked)} records acknowledged, {ledger.retries} retried calls, "
        f"{ledger.duplicates} answered as duplicates, faults {faults}"
    )
    assert faults["redis"] >= 3 and faults["server"] >= 3
    assert committed == sum(ledger.acked.values()), "lost or doubled units"
    assert usage.jobs.succeeded == len(ledger.acked), "lost or doubled jobs"
    assert sorted(listed) == sorted(ledger.acked), "each record listed exactly once"


def test_server_starts_without_redis_and_recovers_by_itself(tmp_path: Path) -> None:
    """pagemeter-server started while its Redis is down keeps running NOT_SERVING (no crash loop), answers UNAVAILABLE, and serves by itself once Redis comes up."""
    redis_port = free_port()
    redis_process = RedisProcess(tmp_path / "redis", port=redis_port)
    server = chaos_server(redis_process.url, tmp_path / "server.log")
    server.start()
    target = server.target
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 20
            status = None
            while time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                    break
                except grpc.RpcError:
                    time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
                    quota_pb2.GetUsageRequest(org_id="acme"), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(1.0)
            assert server.process is not None and server.process.poll() is None, "it exited"
            redis_process.start()
            server.wait_until_serving()
            usage = quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
                quota_pb2.GetUsageRequest(org_id="acme"), timeout=5
            )
            assert usage.org_id == "acme"
    finally:
        server.kill()
        redis_process.stop()
