"""Reliability under Redis trouble: stalls, outages, restarts, fail-open and fail-closed.

Each test runs its own real Redis process, so that it can pause (SIGSTOP),
stop, kill and restart it without touching the other tests' server.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_client import AsyncPagemeterClient
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import RedisClock
from pagemeter_server.ops.embedded import RedisProcess, free_port
from pagemeter_server.ops.health import HealthReporter, watching
from pagemeter_server.ops.lifecycle import bound_command
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.conftest import eagle_plan

TIMEOUT = 0.3


@dataclass
class Rig:
    redis: RedisProcess
    quota: quota_pb2_grpc.QuotaServiceAsyncStub
    admin: admin_pb2_grpc.AdminServiceAsyncStub
    health: health_pb2_grpc.HealthAsyncStub
    registry: CollectorRegistry
    clock: RedisClock
    target: str = ""

    async def status(self) -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)

    async def wait_for(self, status: int, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await self.status() == status:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"health never became {status}")


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def start_rig(tmp_path: Path, **overrides: object) -> tuple[Rig, object]:
    process = RedisProcess(tmp_path / "redis")
    process.start()
    fields: dict[str, object] = {
        "redis_url": process.url,
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "dev_open_access": True,
        "redis_timeout_seconds": TIMEOUT,
        # Each probe may take half of this: tighter, a busy host flips health
        # to NOT_SERVING between two calls and they are refused as UNAVAILABLE.
        "health_interval_seconds": 0.4,
    }
    fields.update(overrides)
    settings = Settings(**fields)  # type: ignore[arg-type]
    client = connect_redis(process.url, settings)
    registry = CollectorRegistry()
    clock = RedisClock()
    server, port, parts = await create_server(settings, client, registry=registry, clock=clock)
    await parts.reporter.check(client)  # as pagemeter-server does before it serves
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    watcher = watching(parts.reporter, client, settings.health_interval_seconds)
    await watcher.__aenter__()
    rig = Rig(
        process,
        quota_pb2_grpc.QuotaServiceStub(channel),
        admin_pb2_grpc.AdminServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
        registry,
        clock,
        f"127.0.0.1:{port}",
    )

    async def stop() -> None:
        await watcher.__aexit__(None, None, None)
        await channel.close(None)
        await server.stop(None)
        await client.aclose()
        if process.pid is not None:
            os.kill(process.pid, signal.SIGCONT)
        process.stop()

    return rig, stop


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made, stop = await start_rig(tmp_path)
    yield made
    await stop()  # type: ignore[operator]


async def check(rig: Rig, org_id: str = "acme") -> quota_pb2.CheckQuotaResponse:
    reply: quota_pb2.CheckQuotaResponse = await rig.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id=org_id, units={"pages": 3}), timeout=10
    )
    return reply


async def refused_code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


def pause(process: RedisProcess) -> None:
    assert process.pid is not None
    os.kill(process.pid, signal.SIGSTOP)


def resume(process: RedisProcess) -> None:
    assert process.pid is not None
    os.kill(process.pid, signal.SIGCONT)


async def test_stalled_redis_fails_fast_with_unavailable(rig: Rig) -> None:
    """With Redis paused (SIGSTOP), CheckQuota and RecordUsage answer UNAVAILABLE within a second, health turns NOT_SERVING, and all recover when Redis resumes."""
    await rig.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    assert (await check(rig)).allowed
    pause(rig.redis)
    try:
        began = time.monotonic()
        assert await refused_code(check(rig)) == grpc.StatusCode.UNAVAILABLE
        record = quota_pb2.RecordUsageRequest(org_id="acme", request_id="j1", units={"pages": 1})
        assert await refused_code(rig.quota.RecordUsage(record, timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert time.monotonic() - began < 2.0  # two calls, each bounded by the 0.3 s timeout
        await rig.wait_for(NOT_SERVING)
    finally:
        resume(rig.redis)
    await rig.wait_for(SERVING)
    assert (await check(rig)).allowed


async def test_scripts_load_again_after_a_redis_restart(rig: Rig) -> None:
    """After Redis is killed with SIGKILL right after a write and restarted (an empty script cache), the next calls work and the acknowledged write is still there."""
    await rig.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    await rig.quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id="acme", request_id="j1", units={"pages": 5})
    )
    # What Redis acknowledged is in its append-only file (written before the
    # reply), which a crash of the Redis process alone does not lose; except on a
    # disk so slow that the previous fsync still runs, when Redis postpones the
    # write (docs/reliability.md, "Choosing durability"). A loaded test machine is
    # such a disk at times: the kill waits until the buffer has been written.
    await until_aof_written(rig)
    rig.redis.kill()
    rig.redis.start()
    await rig.wait_for(SERVING)
    usage = await rig.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"), timeout=10)
    assert {m.metric: m.committed for m in usage.metrics}["pages"] == 5
    assert (await check(rig)).allowed


async def until_aof_written(rig: Rig, seconds: float = 10.0) -> None:
    """Until Redis has no append-only data waiting to be written (INFO persistence)."""
    client = redis.Redis(host="127.0.0.1", port=rig.redis.port, decode_responses=True)
    try:
        deadline = time.monotonic() + seconds
        while int(client.info("persistence")["aof_buffer_length"]) > 0:
            assert time.monotonic() < deadline, "Redis did not write its append-only file"
            await asyncio.sleep(0.01)
    finally:
        client.close()


async def set_policy(rig: Rig, org_id: str, policy: int) -> None:
    await rig.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=eagle_plan(org_id=org_id, store_failure_policy=policy))
    )


async def test_fail_closed_by_default(rig: Rig) -> None:
    """With the default policy, CheckQuota answers UNAVAILABLE while Redis is down, immediately once health has noticed."""
    await set_policy(rig, "acme", plan_pb2.STORE_FAILURE_POLICY_UNSPECIFIED)
    await check(rig)
    rig.redis.stop()
    await rig.wait_for(NOT_SERVING)
    began = time.monotonic()
    assert await refused_code(check(rig)) == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - began < TIMEOUT  # no Redis timeout waited for
    fail_open = rig.registry.get_sample_value(
        "pagemeter_fail_open_decisions_total", {"metric": "pages"}
    )
    assert fail_open is None


async def test_fail_open_per_plan_admits_and_is_counted(rig: Rig) -> None:
    """An org whose plan says OPEN is admitted with reason FAIL_OPEN while Redis is down (nothing held, counted in metrics); another org still fails closed; RecordUsage never pretends."""
    await set_policy(rig, "open-org", plan_pb2.STORE_FAILURE_POLICY_OPEN)
    await set_policy(rig, "closed-org", plan_pb2.STORE_FAILURE_POLICY_CLOSED)
    rig.redis.stop()
    await rig.wait_for(NOT_SERVING)
    answer = await check(rig, "open-org")
    assert answer.allowed and answer.reason == quota_pb2.DECISION_REASON_FAIL_OPEN
    assert not answer.held
    assert [(m.metric, m.requested, m.reason) for m in answer.metrics] == [
        ("pages", 3, quota_pb2.DECISION_REASON_FAIL_OPEN)
    ]
    assert await refused_code(check(rig, "closed-org")) == grpc.StatusCode.UNAVAILABLE
    record = quota_pb2.RecordUsageRequest(org_id="open-org", request_id="j1", units={"pages": 3})
    assert await refused_code(rig.quota.RecordUsage(record, timeout=10)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert (
        rig.registry.get_sample_value("pagemeter_fail_open_decisions_total", {"metric": "pages"})
        == 1
    )


async def test_service_default_open_is_overridden_by_a_closed_plan(tmp_path: Path) -> None:
    """With --store-failure-policy open, an org without its own policy is admitted and an org whose plan says CLOSED is not."""
    rig, stop = await start_rig(tmp_path, store_failure_policy="open")
    try:
        await set_policy(rig, "default-org", plan_pb2.STORE_FAILURE_POLICY_UNSPECIFIED)
        await set_policy(rig, "closed-org", plan_pb2.STORE_FAILURE_POLICY_CLOSED)
        rig.redis.stop()
        await rig.wait_for(NOT_SERVING)
        assert (await check(rig, "default-org")).reason == quota_pb2.DECISION_REASON_FAIL_OPEN
        assert (await check(rig, "never-seen")).reason == quota_pb2.DECISION_REASON_FAIL_OPEN
        assert await refused_code(check(rig, "closed-org")) == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop()  # type: ignore[operator]


async def test_clock_follows_redis_time(rig: Rig) -> None:
    """The server's clock is Redis's TIME, read on each health probe, within a few milliseconds."""
    await rig.wait_for(SERVING)
    assert rig.clock.synced
    client = redis.Redis(host="127.0.0.1", port=rig.redis.port)
    try:
        seconds, micros = client.time()
    finally:
        client.close()
    redis_ms = seconds * 1000 + micros // 1000
    assert abs(rig.clock.now_ms() - redis_ms) < 50


def test_redis_clock_takes_the_middle_of_the_round_trip() -> None:
    """A TIME answered during a 10 ms round trip sets the clock to Redis's time at the round trip's middle."""
    clock = RedisClock()
    sent = time.time_ns()
    # Redis claims to be one hour ahead of this machine, at the middle of the trip.
    middle_ms = (sent + 5_000_000) // 1_000_000
    ahead = middle_ms + 3_600_000
    clock.sync(ahead // 1000, (ahead % 1000) * 1000, sent, sent + 10_000_000)
    assert abs(clock.now_ms() - (time.time_ns() // 1_000_000 + 3_600_000)) < 20
    assert clock.synced


# -- a stall health has noticed; unknown outcomes; persistence ------------------------------


async def test_health_notices_a_stall_within_the_interval(tmp_path: Path) -> None:
    """With --health-interval 1 s and --redis-timeout 2 s, health is NOT_SERVING within about one interval of a stall (it took 2.9 s when each probe waited for the Redis timeout)."""
    rig, stop = await start_rig(tmp_path, redis_timeout_seconds=2.0, health_interval_seconds=1.0)
    try:
        await rig.wait_for(SERVING)
        pause(rig.redis)
        began = time.monotonic()
        await rig.wait_for(NOT_SERVING, seconds=5)
        noticed = time.monotonic() - began
        assert noticed < 1.0 + 0.4, f"NOT_SERVING after {noticed:.2f}s"
    finally:
        resume(rig.redis)
        await stop()  # type: ignore[operator]


async def test_every_call_fails_at_once_during_a_stall_health_knows(tmp_path: Path) -> None:
    """Once health has found Redis stalled, RecordUsage, its batch, ReleaseQuota and GetUsage answer UNAVAILABLE at once, as CheckQuota does, instead of each waiting the 2 s Redis timeout."""
    rig, stop = await start_rig(tmp_path, redis_timeout_seconds=2.0, health_interval_seconds=0.2)
    try:
        await rig.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
        pause(rig.redis)
        await rig.wait_for(NOT_SERVING)
        record = quota_pb2.RecordUsageRequest(org_id="acme", request_id="j1", units={"pages": 1})
        calls = {
            "CheckQuota": check(rig),
            "RecordUsage": rig.quota.RecordUsage(record, timeout=10),
            "ReleaseQuota": rig.quota.ReleaseQuota(
                quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="j1"), timeout=10
            ),
            "GetUsage": rig.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"), timeout=10),
        }
        for name, call in calls.items():
            began = time.monotonic()
            assert await refused_code(call) == grpc.StatusCode.UNAVAILABLE, name
            assert time.monotonic() - began < 0.5, name
        began = time.monotonic()
        batch = await rig.quota.RecordUsageBatch(
            quota_pb2.RecordUsageBatchRequest(items=[record]), timeout=10
        )
        assert batch.items[0].error.code == "UNAVAILABLE"
        assert time.monotonic() - began < 0.5
    finally:
        resume(rig.redis)
        await stop()  # type: ignore[operator]


async def test_an_unavailable_hold_is_made_exact_by_its_request_id(tmp_path: Path) -> None:
    """A hold answered UNAVAILABLE while Redis stalled is applied when Redis resumes; retrying it with the same request_id returns that hold (not a second one), and a release frees it."""
    # Health must not notice the stall (it would stop the call reaching Redis).
    rig, stop = await start_rig(tmp_path, redis_timeout_seconds=0.3, health_interval_seconds=60)
    try:
        await rig.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
        hold = quota_pb2.CheckQuotaRequest(
            org_id="acme", units={"pages": 100}, request_id="job-1", hold=True
        )
        await check(rig)  # check.lua is loaded: a stalled EVALSHA of it will run on resume
        pause(rig.redis)
        try:
            # Health has not noticed: the call is sent, and waits its timeout.
            assert await refused_code(rig.quota.CheckQuota(hold, timeout=10)) == (
                grpc.StatusCode.UNAVAILABLE
            )
        finally:
            resume(rig.redis)
        again = await rig.quota.CheckQuota(hold, timeout=10)
        assert again.held and again.duplicate  # the stalled call was applied, once
        usage = await rig.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"), timeout=10)
        assert {m.metric: m.held for m in usage.metrics}["pages"] == 100
        released = await rig.quota.ReleaseQuota(
            quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="job-1"), timeout=10
        )
        assert released.outcome == quota_pb2.RELEASE_OUTCOME_RELEASED
    finally:
        await stop()  # type: ignore[operator]


async def test_a_release_bars_a_hold_that_lands_after_it(rig: Rig) -> None:
    """ReleaseQuota of an id nobody holds yet bars a later hold with that id, so "release after an unknown outcome" leaves no hold whichever Redis runs first."""
    await rig.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    released = await rig.quota.ReleaseQuota(
        quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="late"), timeout=10
    )
    assert released.outcome == quota_pb2.RELEASE_OUTCOME_NOT_FOUND
    late = quota_pb2.CheckQuotaRequest(
        org_id="acme", units={"pages": 5}, request_id="late", hold=True
    )
    assert await refused_code(rig.quota.CheckQuota(late, timeout=10)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    again = await rig.quota.ReleaseQuota(
        quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="late"), timeout=10
    )
    assert again.outcome == quota_pb2.RELEASE_OUTCOME_NOT_FOUND
    usage = await rig.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"), timeout=10)
    assert {m.metric: m.held for m in usage.metrics}["pages"] == 0


async def test_a_store_that_stops_persisting_turns_health_not_serving(rig: Rig) -> None:
    """When the store's append-only file is turned off at run time, health goes NOT_SERVING and pagemeter_store_persistent 0; turned back on, SERVING and 1."""
    await rig.wait_for(SERVING)
    assert rig.registry.get_sample_value("pagemeter_store_persistent") == 1
    client = redis.Redis.from_url(rig.redis.url)
    try:
        client.config_set("appendonly", "no")
        await rig.wait_for(NOT_SERVING)
        assert rig.registry.get_sample_value("pagemeter_store_persistent") == 0
        client.config_set("appendonly", "yes")
        await rig.wait_for(SERVING)
        assert rig.registry.get_sample_value("pagemeter_store_persistent") == 1
    finally:
        client.close()


async def test_a_volatile_store_can_be_accepted(tmp_path: Path) -> None:
    """With --allow-volatile-store a store without an append-only file serves (health SERVING) and is shown as pagemeter_store_persistent 0."""
    rig, stop = await start_rig(tmp_path, allow_volatile_store=True)
    client = redis.Redis.from_url(rig.redis.url)
    try:
        client.config_set("appendonly", "no")
        await asyncio.sleep(0.3)  # several probes
        await rig.wait_for(SERVING)
        assert rig.registry.get_sample_value("pagemeter_store_persistent") == 0
    finally:
        client.close()
        await stop()  # type: ignore[operator]


def test_the_server_refuses_a_store_without_an_append_only_file(tmp_path: Path) -> None:
    """pagemeter-server on a Redis with appendonly no exits at once with one line naming the problem and --allow-volatile-store; with that flag it serves."""
    volatile = RedisProcess(tmp_path / "volatile", appendonly=False)
    volatile.start()
    server = Path(sys.executable).parent / "pagemeter-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
    command = [
        str(server),
        "--redis-url",
        volatile.url,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--metrics-listen",
        "",
        "--http-listen",
        "",
        "--dev-open-access",
        "--log-format",
        "text",
    ]
    try:
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0
        output = refused.stdout + refused.stderr
        assert "append-only" in output and "--allow-volatile-store" in output, output
        assert "Traceback" not in output
        accepting = subprocess.Popen(
            bound_command([*command, "--allow-volatile-store"]),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            target = command[command.index("--listen") + 1]
            deadline = time.monotonic() + 20
            with grpc.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    try:
                        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    except grpc.RpcError:
                        status = None
                    if status == SERVING:
                        break
                    assert time.monotonic() < deadline, "never SERVING"
                    time.sleep(0.1)
        finally:
            accepting.terminate()
            accepting.wait(10)
    finally:
        volatile.stop()


async def test_the_sdk_leaves_no_hold_when_its_hold_timed_out(tmp_path: Path) -> None:
    """reserve() whose hold times out on a stalled Redis raises UNAVAILABLE and sends a release with the same id, so when Redis resumes and runs both, no hold is left, whichever runs first."""
    # Health must not notice the stall (it would stop the calls reaching Redis).
    rig, stop = await start_rig(tmp_path, redis_timeout_seconds=0.3, health_interval_seconds=60)
    try:
        await rig.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
        async with AsyncPagemeterClient(rig.target, max_attempts=1, timeout=10) as client:
            # Both scripts loaded, so that the stalled calls run when Redis resumes.
            await check(rig)
            await client.release_quota("acme", "warm-up")
            pause(rig.redis)
            # The stall ends while reserve() is still trying to release (for 2 s).
            resumed = asyncio.get_running_loop().call_later(0.8, resume, rig.redis)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async with client.reserve("acme", {"pages": 100}, request_id="ghost"):
                        pytest.fail("the body must not run without a hold")
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                resumed.cancel()
                resume(rig.redis)
            usage = await client.get_usage("acme")
        assert {m.metric: m.held for m in usage.metrics}["pages"] == 0
    finally:
        await stop()  # type: ignore[operator]


async def test_stopping_the_health_probe_never_hangs(redis_server: RedisProcess) -> None:
    """Ending the health probe 200 times at random moments of its Redis calls always returns within a second (redis-py can swallow a cancel that lands as a reply arrives; a shutdown then hung for good)."""
    settings = Settings(redis_url=redis_server.url)
    client = connect_redis(redis_server.url, settings)
    reporter = HealthReporter(
        AsyncHealthServicer(), ServiceMetrics(CollectorRegistry()), ["pagemeter.v1.QuotaService"]
    )
    generator = random.Random(12)
    try:
        for _ in range(200):
            block = watching(reporter, client, 0.01)
            await block.__aenter__()
            await asyncio.sleep(generator.random() * 0.01)
            began = time.monotonic()
            await asyncio.wait_for(block.__aexit__(None, None, None), 2)
            assert time.monotonic() - began < 1.0
    finally:
        await client.aclose()
