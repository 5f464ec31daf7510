"""The SDK's durable outbox for RecordUsage, against real pagemeter servers and a real Redis.

"The server is down" means the test's real server stopped (`server.stop`) and
later started again on the same port, with the same Redis and clock, or a port
nobody listens on. The outboxes are real SQLite files in the test's directory.
Their clock is the server's ManualClock (or that clock moving on with real
time, where a background flusher must see backoff pass), so a job without
completed_at gets the server's test time. The blocking client runs in threads,
since the servers live on the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from pagemeter.v1 import quota_pb2, reporting_pb2
from pagemeter_client import (
    AsyncPagemeterClient,
    Outbox,
    PagemeterClient,
    UsageQueued,
    error_details,
)
from pagemeter_client.outbox import OutboxError, is_transient
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.settings import Settings
from tests.client.client_flavours import Connect
from tests.client.test_cli import Cli
from tests.client.test_client_auth import SERVICE_TOKEN, WRONG_TOKEN, secured_server
from tests.conftest import RunningServer, eagle_plan, ms

# Starts processes or a topology of its own: the system tier (not in make test-fast).
SYSTEM = pytest.mark.system

UNREACHED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# Short deadlines, few retries and quick reconnects: an outage shows in a second,
# and a channel reconnects soon after the server is back. Each client has its own
# subchannels (gRPC shares them between a process's channels by default, so a new
# client would inherit the reconnect backoff of one that saw the outage).
FAST: dict[str, Any] = {
    "timeout": 2.0,
    "max_attempts": 2,
    "initial_backoff": 0.05,
    "max_backoff": 0.1,
    "options": (
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 200),
        ("grpc.use_local_subchannel_pool", 1),
    ),
}
RECORD_USAGE = {
    "grpc_type": "UNARY",
    "grpc_service": "pagemeter.v1.QuotaService",
    "grpc_method": "RecordUsage",
}


class Restartable:
    """The test's pagemeter server, stopped and started again on its port (same Redis, same clock)."""

    def __init__(
        self, running: RunningServer, settings: Settings, redis_client: aioredis.Redis
    ) -> None:
        self.port = running.port
        self.clock = running.clock
        self.settings = settings
        self.redis_client = redis_client
        self.server = running.server
        self.registry: CollectorRegistry | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(None)

    async def start(self) -> None:
        self.registry = CollectorRegistry()
        self.server, port, _ = await create_server(
            self.settings,
            self.redis_client,
            clock=self.clock,
            registry=self.registry,
            listen=self.target,
        )
        assert port == self.port
        await self.server.start()


@pytest.fixture
async def outage(
    pagemeter_server: RunningServer, settings: Settings, redis_client: aioredis.Redis
) -> AsyncIterator[Restartable]:
    """The running test server (Eagle Doc's plan for acme), to be stopped and restarted."""
    async with AsyncPagemeterClient(pagemeter_server.target) as sdk:
        await sdk.set_plan(eagle_plan())
    server = Restartable(pagemeter_server, settings, redis_client)
    yield server
    await server.server.stop(None)


@pytest.fixture
def outbox_path(tmp_path: Path) -> Path:
    return tmp_path / "worker" / "pagemeter-outbox.db"


def server_time(clock: ManualClock) -> Callable[[], float]:
    """The server's ManualClock in seconds: the outbox's clock."""
    return lambda: clock.now_ms() / 1000


def moving_time(clock: ManualClock) -> Callable[[], float]:
    """The server's time when called first, moving on with real time: backoff passes."""
    start, base = time.monotonic(), clock.now_ms() / 1000
    return lambda: base + (time.monotonic() - start)


def figures(usage: quota_pb2.GetUsageResponse, metric: str) -> quota_pb2.MetricUsage:
    return {m.metric: m for m in usage.metrics}[metric]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def usage_of(target: str, **month: int) -> quota_pb2.GetUsageResponse:
    async with AsyncPagemeterClient(target) as sdk:
        return await sdk.get_usage("acme", **month)


async def records_of(target: str) -> dict[str, reporting_pb2.UsageRecord]:
    async with AsyncPagemeterClient(target) as sdk:
        return {r.request_id: r async for r in sdk.iter_usage_records("acme")}


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until `condition()` holds (checked every 20 ms), failing after `seconds`."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not true after {seconds} s")


def stored_count(path: Path) -> int:
    """Records in an outbox file, or 0 while there is none (or while the process that
    creates it has made the file but not yet committed its tables)."""
    if not path.exists():
        return 0
    try:
        with Outbox(path, create=False) as peek:
            return len(peek)
    except OutboxError as exc:
        if "not a pagemeter outbox" in str(exc):
            return 0
        raise


def snapshot(path: Path, into: Path) -> None:
    """Copy a closed outbox file (and any WAL left beside it)."""
    into.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            shutil.copy2(source, into / source.name)


def restore(copy: Path, path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        target = path.with_name(path.name + suffix)
        target.unlink(missing_ok=True)
        source = copy / target.name
        if source.exists():
            shutil.copy2(source, target)


# -- what is stored, and delivery --------------------------------------------------------


async def test_records_made_while_down_survive_reopening_and_are_delivered_with_their_ids(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """RecordUsage calls made while pagemeter is down raise UsageQueued, survive closing the outbox, and are delivered once it is back, with their ids and every field."""
    clock = outage.clock
    requested, done = at("2026-03-15T11:00:00+00:00"), at("2026-03-15T11:30:00+00:00")
    await outage.stop()
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        async with connect(
            outage.target, outbox=outbox, flush_outbox_on_close=False, **FAST
        ) as sdk:
            jobs: list[tuple[str, dict[str, int], dict[str, Any]]] = [
                (
                    "job-1",
                    {"pages": 10, "documents": 1},
                    {"document_type": "invoice", "requested_at": requested, "completed_at": done},
                ),
                ("job-2", {"pages": 7}, {"document_type": "receipt"}),
                ("job-3", {"pages": 4}, {"success": False}),
            ]
            for request_id, units, fields in jobs:
                with pytest.raises(UsageQueued) as queued:
                    await sdk.record_usage("acme", request_id, units, **fields)
                assert queued.value.request_id == request_id
                assert queued.value.code in UNREACHED
                assert isinstance(queued.value.__cause__, grpc.RpcError)

    now = at("2026-03-15T12:00:00+00:00")  # the server's clock: the default completed_at
    with Outbox(outbox_path, clock=server_time(clock)) as reopened:
        stored = reopened.entries()
        assert [
            (
                e.state,
                e.request_id,
                e.units,
                e.success,
                e.document_type,
                e.requested_at,
                e.completed_at,
                e.attempts,
            )
            for e in stored
        ] == [
            (
                "pending",
                "job-1",
                {"documents": 1, "pages": 10},
                True,
                "invoice",
                requested,
                done,
                1,
            ),
            ("pending", "job-2", {"pages": 7}, True, "receipt", None, now, 1),
            ("pending", "job-3", {"pages": 4}, False, "", None, now, 1),
        ]
        assert all(e.last_code in {c.name for c in UNREACHED} and e.last_error for e in stored)
        assert stored[0].request.completed_at.ToDatetime(UTC) == done

        await outage.start()
        async with connect(outage.target, outbox=reopened, **FAST) as sdk:
            early = await sdk.flush_outbox()
            assert early.outcomes == () and early.pending == 3, "backoff has not passed yet"
            clock.advance(2)
            delivered = await sdk.flush_outbox()
        assert [(o.request_id, o.outcome) for o in delivered.outcomes] == [
            ("job-1", "delivered"),
            ("job-2", "delivered"),
            ("job-3", "delivered"),
        ]
        assert delivered.ok and (delivered.pending, delivered.dead) == (0, 0)
        assert len(reopened) == 0

    records = await records_of(outage.target)
    assert set(records) == {"job-1", "job-2", "job-3"}
    assert records["job-1"].document_type == "invoice"
    assert records["job-1"].requested_at.ToDatetime(UTC) == requested
    assert records["job-1"].completed_at.ToDatetime(UTC) == done
    assert records["job-2"].completed_at.ToDatetime(UTC) == now
    assert records["job-3"].status == reporting_pb2.USAGE_RECORD_STATUS_FAILED
    usage = await usage_of(outage.target)
    assert figures(usage, "pages").committed == 17
    assert figures(usage, "documents").committed == 1
    assert (usage.jobs.succeeded, usage.jobs.failed) == (2, 1)


async def test_a_delivered_record_is_removed_and_nothing_is_left_when_the_server_is_up(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """With pagemeter up, a record goes through the outbox on disk and leaves it once answered."""
    with Outbox(outbox_path, clock=server_time(outage.clock)) as outbox:
        async with connect(outage.target, outbox=outbox) as sdk:
            response = await sdk.record_usage("acme", "job-1", {"pages": 3})
            assert response.request_id == "job-1" and not response.duplicate
            again = await sdk.record_usage("acme", "job-1", {"pages": 3})
            assert again.duplicate, "the second record carries the first one's completed_at"
        assert len(outbox) == 0
    assert figures(await usage_of(outage.target), "pages").committed == 3


async def test_redelivery_after_a_crash_between_send_and_delete_counts_once(
    connect: Connect, outage: Restartable, outbox_path: Path, tmp_path: Path
) -> None:
    """Records delivered but still in the outbox (the deletion never reached the disk) are sent again and answered as duplicates: every job counts exactly once."""
    clock = outage.clock
    await outage.stop()
    units = {f"job-{n}": n for n in range(1, 7)}
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        async with connect(
            outage.target, outbox=outbox, flush_outbox_on_close=False, **FAST
        ) as sdk:
            for request_id, pages in units.items():
                with pytest.raises(UsageQueued):
                    await sdk.record_usage("acme", request_id, {"pages": pages})
    snapshot(outbox_path, tmp_path / "before-delivery")

    await outage.start()
    clock.advance(2)
    results = []
    for _ in range(2):  # deliver, then deliver again from the file as it was before
        with Outbox(outbox_path, clock=server_time(clock)) as outbox:
            async with connect(outage.target, outbox=outbox, **FAST) as sdk:
                results.append(await sdk.flush_outbox())
            assert len(outbox) == 0
        restore(tmp_path / "before-delivery", outbox_path)

    first, second = results
    assert [o.outcome for o in first.outcomes] == ["delivered"] * 6
    assert [o.outcome for o in second.outcomes] == ["duplicate"] * 6
    assert first.ok and second.ok and second.delivered == 6
    usage = await usage_of(outage.target)
    assert figures(usage, "pages").committed == sum(units.values()) == 21
    assert usage.jobs.total == 6
    assert set(await records_of(outage.target)) == set(units)


async def test_a_job_queued_at_the_end_of_march_counts_in_march_when_delivered_in_april(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """A record without completed_at gets the time of its first attempt, so delivered in April it still counts in March."""
    clock = outage.clock
    clock.set(ms("2026-03-31T23:59:30+00:00"))
    await outage.stop()
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        async with connect(
            outage.target, outbox=outbox, flush_outbox_on_close=False, **FAST
        ) as sdk:
            with pytest.raises(UsageQueued) as queued:
                await sdk.record_usage("acme", "job-late", {"pages": 30})
        assert queued.value.entry.completed_at == at("2026-03-31T23:59:30+00:00")

        clock.set(ms("2026-04-01T09:00:00+00:00"))
        await outage.start()
        async with connect(outage.target, outbox=outbox, **FAST) as sdk:
            result = await sdk.flush_outbox()
        assert [o.outcome for o in result.outcomes] == ["delivered"]

    march = await usage_of(outage.target, year=2026, month=3)
    april = await usage_of(outage.target)
    assert april.period_id == "2026-04"
    assert figures(march, "pages").committed == 30
    assert figures(april, "pages").committed == 0
    record = (await records_of(outage.target))["job-late"]
    assert record.completed_at.ToDatetime(UTC) == at("2026-03-31T23:59:30+00:00")


# -- reserve() and the blocking client -----------------------------------------------------


async def test_reserve_commit_of_the_blocking_client_is_queued_when_the_server_goes_down(
    outage: Restartable, outbox_path: Path
) -> None:
    """reserve()'s commit on the blocking client stores the job in the outbox when pagemeter went down during the work, and a later flush commits it and frees the hold."""
    loop = asyncio.get_running_loop()
    outbox = Outbox(outbox_path, clock=server_time(outage.clock))

    def work_while_the_server_goes_down() -> UsageQueued:
        with PagemeterClient(
            outage.target, outbox=outbox, flush_outbox_on_close=False, **FAST
        ) as sdk:
            with (  # noqa: PT012 (the block is the job)
                pytest.raises(UsageQueued) as queued,
                sdk.reserve("acme", {"pages": 12}, request_id="job-r") as job,
            ):
                asyncio.run_coroutine_threadsafe(outage.stop(), loop).result()
                job.commit({"pages": 11}, document_type="invoice")
            return queued.value

    queued = await asyncio.to_thread(work_while_the_server_goes_down)
    assert queued.entry.request_id == "job-r" and queued.entry.units == {"pages": 11}
    await outage.start()
    during = await usage_of(outage.target)
    assert figures(during, "pages").held == 12, "the hold is still there while the record waits"

    def deliver() -> Any:
        with PagemeterClient(outage.target, outbox=outbox, **FAST) as sdk:
            return sdk.flush_outbox(force=True)

    result = await asyncio.to_thread(deliver)
    outbox.close()
    assert [(o.request_id, o.outcome) for o in result.outcomes] == [("job-r", "delivered")]
    usage = await usage_of(outage.target)
    assert (figures(usage, "pages").committed, figures(usage, "pages").held) == (11, 0)


async def test_reserve_keeps_the_body_error_and_queues_the_failed_job(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """When the body raises while pagemeter is down, the failed job is queued and the body's own exception propagates with a note saying so."""
    with Outbox(outbox_path, clock=server_time(outage.clock)) as outbox:
        async with connect(
            outage.target, outbox=outbox, flush_outbox_on_close=False, **FAST
        ) as sdk:
            with pytest.raises(RuntimeError, match="OCR crashed") as raised:  # noqa: PT012
                async with sdk.reserve("acme", {"pages": 12}, request_id="job-f"):
                    await outage.stop()
                    raise RuntimeError("OCR crashed")
        (note,) = raised.value.__notes__
        assert "queued in the outbox" in note
        (entry,) = outbox.entries()
        assert (entry.request_id, entry.success, entry.state) == ("job-f", False, "pending")

        await outage.start()
        async with connect(outage.target, outbox=outbox, **FAST) as sdk:
            assert (await sdk.flush_outbox(force=True)).ok
    usage = await usage_of(outage.target)
    assert (usage.jobs.failed, figures(usage, "pages").committed) == (1, 0)
    assert figures(usage, "pages").held == 0


# -- refusals ------------------------------------------------------------------------------


def test_transient_failures_stay_pending_and_refusals_become_dead_letters() -> None:
    """UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED (and CANCELLED, INTERNAL, UNKNOWN) are retried; every other status is a dead letter."""
    retried = {code for code in grpc.StatusCode if is_transient(code)}
    assert retried == {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
    for refused in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    ):
        assert not is_transient(refused)


async def test_refused_records_become_dead_letters_that_are_never_sent_again(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """A record pagemeter refuses (a reused id, invalid input) is kept as a dead letter with its error and no later pass sends it again."""
    clock = outage.clock
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        async with connect(outage.target, **FAST) as plain:
            await plain.record_usage("acme", "job-a", {"pages": 5})
        async with connect(
            outage.target, outbox=outbox, flush_outbox_on_close=False, **FAST
        ) as sdk:
            with pytest.raises(grpc.RpcError) as reused:
                await sdk.record_usage("acme", "job-a", {"pages": 6})
            assert error_details(reused.value).code == grpc.StatusCode.ALREADY_EXISTS
            assert "kept in the outbox" in reused.value.__notes__[0]

            await outage.stop()
            with pytest.raises(UsageQueued):  # nobody checks document_type while it is down
                await sdk.record_usage("acme", "job-b", {"pages": 2}, document_type="not valid!")

        await outage.start()
        async with connect(outage.target, outbox=outbox, **FAST) as sdk:
            first = await sdk.flush_outbox(force=True)
            clock.advance(3600)
            later = [await sdk.flush_outbox(force=True), await sdk.flush_outbox()]
        assert [(o.request_id, o.outcome, o.code) for o in first.outcomes] == [
            ("job-b", "rejected", "INVALID_ARGUMENT")
        ]
        assert not first.ok and (first.pending, first.dead) == (0, 2)
        assert [r.outcomes for r in later] == [(), ()]
        assert outage.registry is not None
        started = sum(
            outage.registry.get_sample_value(
                "grpc_server_started_total", {**RECORD_USAGE, "grpc_method": method}
            )
            or 0
            for method in ("RecordUsage", "RecordUsageBatch")
        )
        assert started == 1, (
            "the restarted server saw job-b once (alone or in a batch), and job-a never again"
        )

        dead = outbox.entries("dead")
        assert [(e.request_id, e.last_code, e.attempts) for e in dead] == [
            ("job-a", "ALREADY_EXISTS", 1),
            ("job-b", "INVALID_ARGUMENT", 2),
        ]
        assert "already used by another request" in (dead[0].last_error or "")
        assert "document_type" in (dead[1].last_error or "")
        assert outbox.summary().pending == 0
    usage = await usage_of(outage.target)
    assert figures(usage, "pages").committed == 5 and usage.jobs.total == 1


async def test_a_dead_letter_requeued_after_its_cause_is_fixed_is_delivered(
    connect: Connect,
    redis_server: Any,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    outbox_path: Path,
) -> None:
    """A record refused as UNAUTHENTICATED stays dead until an operator requeues it, and is then delivered with a valid token."""
    async with secured_server(redis_server.url, redis_client, clock) as target:
        with Outbox(outbox_path, clock=server_time(clock)) as outbox:
            async with connect(target, token=WRONG_TOKEN, outbox=outbox) as worker:
                with pytest.raises(grpc.RpcError) as refused:
                    await worker.record_usage("acme", "job-1", {"pages": 8})
            assert error_details(refused.value).code == grpc.StatusCode.UNAUTHENTICATED
            (dead,) = outbox.entries()
            assert (dead.state, dead.last_code) == ("dead", "UNAUTHENTICATED")

            async with connect(target, token=SERVICE_TOKEN, outbox=outbox) as fixed:
                untouched = await fixed.flush_outbox(force=True)
                assert untouched.outcomes == () and untouched.dead == 1
                assert outbox.requeue() == 1
                delivered = await fixed.flush_outbox()
                usage = await fixed.get_usage("acme")
        assert [(o.request_id, o.outcome) for o in delivered.outcomes] == [("job-1", "delivered")]
        assert delivered.ok and usage.jobs.total == 1


# -- threads, passes and processes ---------------------------------------------------------


async def test_threads_recording_into_one_outbox_lose_nothing(
    outage: Restartable, outbox_path: Path
) -> None:
    """Eight threads sharing one client and one outbox while nothing listens store all 200 records, and one flush delivers them all exactly once."""
    nobody = f"127.0.0.1:{free_port()}"
    outbox = Outbox(outbox_path, clock=server_time(outage.clock))
    expected = {f"t{t}-job-{n}": 1 + (t + n) % 3 for t in range(8) for n in range(25)}

    def record_while_down() -> None:
        with PagemeterClient(
            nobody, outbox=outbox, flush_outbox_on_close=False, timeout=1.0, max_attempts=1
        ) as sdk:

            def one_thread(thread: int) -> int:
                queued = 0
                for n in range(25):
                    request_id = f"t{thread}-job-{n}"
                    try:
                        sdk.record_usage("acme", request_id, {"pages": expected[request_id]})
                    except UsageQueued:
                        queued += 1
                return queued

            results: list[int] = []
            threads = [
                threading.Thread(target=lambda t=t: results.append(one_thread(t))) for t in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert results == [25] * 8

    await asyncio.to_thread(record_while_down)
    assert sorted(e.request_id for e in outbox.entries()) == sorted(expected)

    def deliver() -> Any:
        with PagemeterClient(outage.target, outbox=outbox, **FAST) as sdk:
            return sdk.flush_outbox(force=True)

    result = await asyncio.to_thread(deliver)
    outbox.close()
    assert result.count("delivered") == 200 and result.ok
    usage = await usage_of(outage.target)
    assert figures(usage, "pages").committed == sum(expected.values())
    assert usage.jobs.total == 200


async def test_background_flusher_thread_delivers_while_threads_keep_recording(
    outage: Restartable, outbox_path: Path
) -> None:
    """Threads keep recording through an outage while the blocking client's flusher thread delivers: every job counts once."""
    outbox = Outbox(outbox_path, clock=moving_time(outage.clock), initial_backoff=0.05)
    expected = {f"t{t}-job-{n}": 1 + n % 4 for t in range(4) for n in range(30)}
    halfway = threading.Event()
    waiting: list[int] = []  # threads that recorded their first half
    sdk = PagemeterClient(outage.target, outbox=outbox, **FAST)
    await outage.stop()

    def one_thread(thread: int) -> tuple[int, int]:
        sent = queued = 0
        for n in range(30):
            if n == 15:
                waiting.append(thread)
                halfway.wait(10)
            request_id = f"t{thread}-job-{n}"
            try:
                sdk.record_usage("acme", request_id, {"pages": expected[request_id]})
                sent += 1
            except UsageQueued:
                queued += 1
        return sent, queued

    sdk.start_outbox_flusher(interval=0.05)
    workers = [asyncio.to_thread(one_thread, t) for t in range(4)]
    running = asyncio.gather(*workers)
    await eventually(lambda: len(waiting) == 4)  # the first halves, recorded while it is down
    await outage.start()
    halfway.set()
    counts = await running
    assert sum(sent + queued for sent, queued in counts) == 120
    assert sum(queued for _, queued in counts) >= 60
    await eventually(lambda: len(outbox) == 0)
    await asyncio.to_thread(sdk.close)
    assert len(outbox) == 0, [e.as_dict() for e in outbox.entries()]
    outbox.close()
    usage = await usage_of(outage.target)
    assert figures(usage, "pages").committed == sum(expected.values())
    assert usage.jobs.total == 120


async def test_the_flusher_delivers_once_the_server_is_back(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """The flusher (a task of the async client, a thread of the blocking one) delivers records queued during an outage once pagemeter is back, and stops on request."""
    with Outbox(outbox_path, clock=moving_time(outage.clock), initial_backoff=0.05) as outbox:
        async with connect(outage.target, outbox=outbox, **FAST) as sdk:
            await outage.stop()
            for n in range(3):
                with pytest.raises(UsageQueued):
                    await sdk.record_usage("acme", f"job-{n}", {"pages": 5})
            sdk.start_outbox_flusher(interval=0.05)
            with pytest.raises(RuntimeError, match="already running"):
                sdk.start_outbox_flusher()
            await asyncio.sleep(0.3)
            assert len(outbox) == 3, "nothing is lost while the server stays down"
            await outage.start()
            await eventually(lambda: len(outbox) == 0)
            await sdk.stop_outbox_flusher()
            assert len(outbox) == 0
    assert figures(await usage_of(outage.target), "pages").committed == 15


async def test_closing_a_client_delivers_the_due_records(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """close() runs a delivery pass of the outbox's due records (and is quick while they are not due)."""
    clock = outage.clock
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        await outage.stop()
        sdk = connect(outage.target, outbox=outbox, **FAST)
        for n in range(2):
            with pytest.raises(UsageQueued):
                await sdk.record_usage("acme", f"job-{n}", {"pages": 4})
        started = time.monotonic()
        await sdk.close()
        assert time.monotonic() - started < 1, "records in backoff are not tried on close"
        assert len(outbox) == 2

        await outage.start()
        clock.advance(2)
        async with connect(outage.target, outbox=outbox, **FAST):
            pass
        assert len(outbox) == 0
    assert figures(await usage_of(outage.target), "pages").committed == 8


async def test_a_pass_stops_at_the_first_unreachable_answer(
    connect: Connect, outbox_path: Path
) -> None:
    """A delivery pass against a port nobody listens on tries one record and leaves the others untouched."""
    clock = ManualClock(ms("2026-03-15T12:00:00+00:00"))
    nobody = f"127.0.0.1:{free_port()}"
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        async with connect(
            nobody, outbox=outbox, flush_outbox_on_close=False, timeout=1, max_attempts=1
        ) as sdk:
            for n in range(5):
                with pytest.raises(UsageQueued):
                    await sdk.record_usage("acme", f"job-{n}", {"pages": 1})
            result = await sdk.flush_outbox(force=True)
        assert [o.outcome for o in result.outcomes] == ["deferred"]
        assert result.stopped is not None and result.stopped.startswith("UNAVAILABLE: ")
        assert [e.attempts for e in outbox.entries()] == [2, 1, 1, 1, 1]
        assert result.pending == 5 and outbox.summary().in_flight == 0


@SYSTEM
async def test_a_first_attempt_cut_off_by_a_killed_process_is_delivered_after_its_lease(
    connect: Connect, outage: Restartable, outbox_path: Path
) -> None:
    """A worker killed while its RecordUsage is in flight leaves the record in the outbox; other passes leave it alone until its lease runs out, then deliver it."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    silent_target = f"127.0.0.1:{silent.getsockname()[1]}"
    outbox_path.parent.mkdir(parents=True, exist_ok=True)
    script = textwrap.dedent(
        f"""
        from datetime import datetime
        from pagemeter_client import Outbox, PagemeterClient
        outbox = Outbox({str(outbox_path)!r})
        client = PagemeterClient({silent_target!r}, outbox=outbox, timeout=60)
        client.record_usage("acme", "job-killed", {{"pages": 9}},
                            completed_at=datetime.fromisoformat("2026-03-15T11:59:00+00:00"))
        """
    )
    worker = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    try:
        await eventually(lambda: stored_count(outbox_path) == 1)
        os.kill(worker.pid, signal.SIGKILL)
        await worker.wait()
    finally:
        silent.close()
        if worker.returncode is None:  # the wait above failed: never leave it running
            worker.kill()
            await worker.wait()

    with Outbox(outbox_path) as now_outbox:
        (entry,) = now_outbox.entries()
        assert entry.in_flight(now_outbox.now()) and entry.attempts == 0
        async with connect(outage.target, outbox=now_outbox, **FAST) as sdk:
            assert (await sdk.flush_outbox(force=True)).outcomes == ()
    with Outbox(outbox_path, clock=lambda: time.time() + 3600) as later:
        async with connect(outage.target, outbox=later, **FAST) as sdk:
            result = await sdk.flush_outbox()
        assert [(o.request_id, o.outcome) for o in result.outcomes] == [("job-killed", "delivered")]
    assert figures(await usage_of(outage.target), "pages").committed == 9


@SYSTEM
async def test_two_processes_flushing_one_file_send_each_record_once(
    outage: Restartable, outbox_path: Path
) -> None:
    """A `pagemeter outbox flush` process and this process deliver one outbox file at the same time: every record is sent by one of them, once."""
    clock = outage.clock
    await outage.stop()
    expected = {f"job-{n}": 1 + n % 5 for n in range(150)}
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        for request_id, pages in expected.items():
            request = quota_pb2.RecordUsageRequest(
                org_id="acme", request_id=request_id, units={"pages": pages}
            )
            outbox.add(request)
    await outage.start()

    script = str(Path(sys.executable).with_name("pagemeter"))
    other = await asyncio.create_subprocess_exec(
        script,
        "--target",
        outage.target,
        "outbox",
        "flush",
        str(outbox_path),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    def here() -> Any:
        with (
            Outbox(outbox_path) as mine,
            PagemeterClient(outage.target, outbox=mine, **FAST) as sdk,
        ):
            results = []
            while len(mine):
                results.append(sdk.flush_outbox(force=True))
                time.sleep(0.01)
            return results

    mine = await asyncio.to_thread(here)
    out, err = await other.communicate()
    assert other.returncode == 0, err.decode()
    theirs = json.loads(out)
    assert theirs["duplicates"] == 0 and theirs["rejected"] == 0
    assert sum(r.count("duplicate") for r in mine) == 0
    assert theirs["delivered"] + sum(r.count("delivered") for r in mine) == 150
    usage = await usage_of(outage.target)
    assert figures(usage, "pages").committed == sum(expected.values())
    assert usage.jobs.total == 150


# -- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def outbox_cli(outage: Restartable, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(outage.target, capsys)


async def test_cli_outbox_status_flush_requeue_and_discard(
    outage: Restartable, outbox_path: Path, outbox_cli: Cli
) -> None:
    """`pagemeter outbox status|flush|requeue|discard FILE` show, deliver and clean up an outbox with tables, --json and the documented exit codes."""
    pagemeter = outbox_cli
    clock = outage.clock
    await outage.stop()
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:
        async with AsyncPagemeterClient(
            outage.target, outbox=outbox, flush_outbox_on_close=False, **FAST
        ) as sdk:
            with pytest.raises(UsageQueued):
                await sdk.record_usage("acme", "job-ok", {"pages": 6}, document_type="invoice")
            with pytest.raises(UsageQueued):
                await sdk.record_usage("acme", "job-bad", {"pages": 1}, document_type="bad type")
    file = str(outbox_path)

    status = await pagemeter("outbox", "status", file)
    assert status.code == 0, status.err
    assert "pending:        2" in status.out and "dead letters:   0" in status.out
    job_ok = next(line for line in status.out.splitlines() if "job-ok" in line).split()
    assert job_ok[:8] == [
        "1",
        "pending",
        "acme",
        "job-ok",
        "pages=6",
        "yes",
        "invoice",
        "2026-03-15T12:00:00Z",
    ]
    as_json = (await pagemeter("outbox", "status", file, "--json")).json()
    assert (as_json["pending"], as_json["dead"]) == (2, 0)
    records = as_json["records"]
    assert isinstance(records, list) and records[1]["request_id"] == "job-bad"

    down = await pagemeter("outbox", "flush", file, "--timeout", "1")
    assert down.code == 1
    assert down.err.startswith("error: UNAVAILABLE") or down.err.startswith(
        "error: DEADLINE_EXCEEDED"
    )
    assert "The records stay in the outbox" in down.err

    await outage.start()
    flushed = await pagemeter("outbox", "flush", file, "--json")
    assert flushed.code == 1, "one record was refused"
    summary = flushed.json()
    assert (summary["delivered"], summary["rejected"], summary["pending"], summary["dead"]) == (
        1,
        1,
        0,
        1,
    )
    table = await pagemeter("outbox", "status", file)
    dead_line = next(line for line in table.out.splitlines() if "job-bad" in line)
    assert dead_line.split()[1] == "dead" and "INVALID_ARGUMENT: document_type" in dead_line

    requeued = await pagemeter("outbox", "requeue", file)
    assert (requeued.code, requeued.out.strip()) == (0, "requeued: 1")
    again = await pagemeter("outbox", "flush", file)
    assert again.code == 1 and "rejected:     1" in again.out
    discarded = await pagemeter("outbox", "discard", file, "2", "--json")
    assert discarded.code == 0 and discarded.json() == {"discarded": 1}
    empty = await pagemeter("outbox", "flush", file)
    assert empty.code == 0 and "nothing to send" in empty.out
    assert "no records" in (await pagemeter("outbox", "status", file)).out

    missing = await pagemeter("outbox", "status", str(outbox_path.with_name("nope.db")))
    assert missing.code == 2 and "no such outbox file" in missing.err
    assert not outbox_path.with_name("nope.db").exists()
    assert figures(await usage_of(outage.target), "pages").committed == 6


async def kill_a_flusher_holding(
    outbox_path: Path, clock: ManualClock, jobs: dict[str, int]
) -> None:
    """Store `jobs` while pagemeter is down, then SIGKILL a flusher process mid-pass.

    The flusher sends to a port that accepts and never answers (deadline 3 s,
    lease margin 0.5 s), so it dies holding every record for about 3.5 s.
    """
    with Outbox(outbox_path, clock=server_time(clock)) as outbox:  # the jobs' time
        for request_id, pages in jobs.items():
            outbox.add(
                quota_pb2.RecordUsageRequest(
                    org_id="acme", request_id=request_id, units={"pages": pages}
                )
            )
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    script = textwrap.dedent(
        f"""
        from pagemeter_client import Outbox, PagemeterClient
        outbox = Outbox({str(outbox_path)!r}, lease_margin=0.5)
        client = PagemeterClient("127.0.0.1:{silent.getsockname()[1]}", outbox=outbox,
                                 timeout=3, max_attempts=1, flush_outbox_on_close=False)
        client.flush_outbox(force=True)
        """
    )
    flusher = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    try:

        def all_held() -> bool:
            with Outbox(outbox_path, create=False) as peek:
                return peek.summary().in_flight == len(jobs)

        await eventually(all_held)
        os.kill(flusher.pid, signal.SIGKILL)
        await flusher.wait()
    finally:
        silent.close()


@SYSTEM
async def test_cli_flush_sends_the_records_a_killed_flusher_held_once_its_leases_end(
    outage: Restartable, outbox_path: Path, outbox_cli: Cli
) -> None:
    """After a flusher process is killed with SIGKILL while holding leases, `pagemeter outbox flush` waits for the leases to end, delivers those records and exits 0 (it exited 0 having sent nothing)."""
    jobs = {f"job-{n}": n + 1 for n in range(5)}
    await kill_a_flusher_holding(outbox_path, outage.clock, jobs)
    with Outbox(outbox_path, create=False) as outbox:
        assert outbox.summary().in_flight == 5

    started = time.monotonic()
    flushed = await outbox_cli("outbox", "flush", str(outbox_path), "--json")
    assert flushed.code == 0, flushed.err
    assert "waiting for 5 record(s) leased by another flusher until" in flushed.err
    assert time.monotonic() - started < 15
    summary = flushed.json()
    assert (summary["delivered"], summary["pending"], summary["leased"]) == (5, 0, 0)
    assert stored_count(outbox_path) == 0
    assert figures(await usage_of(outage.target), "pages").committed == sum(jobs.values())


@SYSTEM
async def test_cli_flush_without_waiting_fails_naming_the_leased_records(
    outage: Restartable, outbox_path: Path, outbox_cli: Cli
) -> None:
    """With --wait 0, `pagemeter outbox flush` after a killed flusher exits 1 with "N record(s) still leased by another flusher until <time>" and leaves them in the outbox."""
    await kill_a_flusher_holding(outbox_path, outage.clock, {"job-a": 2, "job-b": 3})
    with Outbox(outbox_path, create=False) as outbox:
        lease_end = outbox.summary().last_lease_ends
    assert lease_end is not None

    flushed = await outbox_cli("outbox", "flush", str(outbox_path), "--wait", "0")
    assert flushed.code == 1
    until = lease_end.astimezone(UTC).isoformat(timespec="seconds")
    assert f"error: 2 record(s) still leased by another flusher until {until}" in flushed.err
    assert f"leased:       2 by another flusher until {until}" in flushed.out
    assert stored_count(outbox_path) == 2
    as_json = await outbox_cli("outbox", "flush", str(outbox_path), "--wait", "0", "--json")
    assert as_json.code == 1 and as_json.json()["leased"] == 2


def test_an_outbox_file_from_something_else_is_refused(tmp_path: Path) -> None:
    """Opening a file that is not a pagemeter outbox raises OutboxError and leaves the file alone."""

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(OutboxError, match="not a pagemeter outbox"):
        Outbox(junk)
    assert junk.read_bytes() == b"not a database at all" * 100
