"""The SDK's replay after a failover, against real Redis processes and real gRPC servers.

The headline test loses acknowledged requests for real: a primary, its replica
and three sentinels; the replica is frozen (SIGSTOP) and its link filled, the
primary acknowledges holds, records and releases, then dies; the replica is
promoted without them. The client saw the outage (STORE_UNAVAILABLE), and its
first answered call after it starts the replay: each lost request is applied
again, each kept one is answered as a duplicate, and the totals equal what the
client was told. The other tests use one Redis paused with SIGSTOP (an outage
without a loss), or emptied by hand to stand for a loss, to check the trigger,
the window's bounds, conflicts and a replay that finds nothing lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    plan_pb2,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
)
from pagemeter_client import (
    AsyncPagemeterClient,
    PagemeterClient,
    ReplayResult,
    ReplayWindow,
    error_details,
)
from pagemeter_client.replay import (
    CHECK,
    RECORD,
    RELEASE,
    AcknowledgedLog,
    ReplayStats,
    plan,
)
from pagemeter_client.sdk import check_quota_request, record_usage_request
from pagemeter_server.app import create_server
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import close_redis, connect_redis
from tests.client.client_flavours import FLAVOURS, Flavour, connector
from tests.conftest import eagle_plan
from tests.system.test_reliability import SERVING, Rig, pause, resume, start_rig
from tests.system.test_sentinel import MASTER, Topology, running_topology

# Starts processes or a topology of its own: the system tier (not in make test-fast).
SYSTEM = pytest.mark.system

# A client of either flavour, called through the async methods.
Client = AsyncPagemeterClient


def stats(caller: Client) -> ReplayStats:
    """The replay bookkeeping of a client built with replay_after_failover."""
    seen = caller.replay_stats
    assert seen is not None, "the client was built without replay_after_failover"
    return seen


def make_client(kind: Flavour, target: str, window: ReplayWindow, **options: Any) -> Client:
    """A client of `kind` keeping a replay window (the blocking one behind async methods)."""
    return connector(kind)(target, replay_after_failover=window, **options)


async def eventually(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """Its own Redis (RedisClock: holds expire in real time), a health probe every 50 ms."""
    made, stop = await start_rig(tmp_path)
    await made.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()), timeout=5)
    yield made
    await stop()  # type: ignore[operator]


async def lose_everything(rig: Rig) -> None:
    """Stands for a failover that lost every write: the store is emptied, the plan set again."""
    with redis.Redis.from_url(rig.redis.url) as direct:
        direct.flushall()
    await rig.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()), timeout=5)


async def usage(rig: Rig) -> dict[str, tuple[int, int]]:
    answer = await rig.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"), timeout=5)
    return {m.metric: (m.committed, m.held) for m in answer.metrics}


async def record_ids(caller: Client) -> list[str]:
    page = await caller.list_usage_records("acme", page_size=100)
    return sorted(
        r.request_id for r in page.records if r.status != reporting_pb2.USAGE_RECORD_STATUS_PENDING
    )


KINDS = pytest.mark.parametrize("kind", FLAVOURS)


# -- the option is off by default -------------------------------------------------------


async def test_off_by_default(rig: Rig) -> None:
    """Without replay_after_failover nothing is kept, the channel is not intercepted, and replay_acknowledged says how to turn it on."""
    with PagemeterClient(rig.target) as client:
        assert client.replay_stats is None
        assert client._stubs.watched is client._stubs.channel
        with pytest.raises(RuntimeError, match="replay_after_failover"):
            client.replay_acknowledged()
    async with AsyncPagemeterClient(rig.target) as aclient:
        assert aclient.replay_stats is None
        with pytest.raises(RuntimeError, match="replay_after_failover"):
            await aclient.replay_acknowledged()


# -- a replay that finds nothing lost ---------------------------------------------------


@KINDS
async def test_a_replay_with_no_loss_changes_nothing(rig: Rig, kind: Flavour) -> None:
    """Holds, records (single, batched, failed, with completed_at), releases: every one is kept once, a replay answers all of them as duplicates (a hold whose job was recorded or released since is refused as REQUEST_ID_REUSED and counts as one), and usage and records are unchanged; denied holds and plain checks are not kept."""
    caller = make_client(kind, rig.target, ReplayWindow())
    try:
        await caller.check_quota("acme", {"pages": 10}, request_id="j1", hold=True)
        await caller.record_usage("acme", "j1", {"pages": 8})
        await caller.check_quota("acme", {"pages": 4}, request_id="j2", hold=True)
        await caller.release_quota("acme", "j2")
        await caller.check_quota("acme", {"pages": 5}, request_id="j3", hold=True, hold_ttl=600)
        await caller.record_usage("acme", "j4", {"pages": 3}, completed_at=datetime.now(UTC))
        await caller.record_usage("acme", "j5", {"pages": 2}, success=False)
        await caller.check_quota_batch(
            [
                check_quota_request("acme", {"pages": n}, request_id=f"b{n}", hold=True)
                for n in (1, 2)
            ],
        )
        await caller.record_usage_batch(
            [record_usage_request("acme", f"b{n}", {"pages": n}) for n in (1, 2)],
        )
        await caller.release_quota("acme", "j6")  # never held: NOT_FOUND, leaves a mark
        denied = await caller.check_quota("acme", {"pages": 5000}, request_id="j7", hold=True)
        assert not denied.allowed
        await caller.check_quota("acme", {"pages": 1})
        assert (
            stats(caller).entries == 12
        )  # holds j1 j2 j3 b1 b2, records j1 j4 j5 b1 b2, releases j2 j6

        before = await usage(rig)
        records_before = await record_ids(caller)
        result: ReplayResult = await caller.replay_acknowledged()
        assert (result.replayed, result.duplicates, result.lost) == (12, 12, 0)
        assert result.complete and result.outcomes == ()
        assert await usage(rig) == before == {"documents": (0, 0), "pages": (14, 5)}
        assert await record_ids(caller) == records_before
        assert stats(caller).passes == 1 and stats(caller).entries == 12
    finally:
        await caller.close()


# -- the trigger: an outage, then an answer ---------------------------------------------


@KINDS
async def test_the_first_answer_after_a_store_outage_replays_in_the_background(
    rig: Rig, kind: Flavour
) -> None:
    """Redis paused: a call fails with STORE_UNAVAILABLE and the client notes an outage; Redis resumed: the next answered call starts a pass in the background, which sends the window again (all duplicates here); answers before the outage start nothing."""
    passes: list[ReplayResult] = []
    caller = make_client(
        kind, rig.target, ReplayWindow(on_replay=passes.append), max_attempts=1, timeout=2
    )
    try:
        await caller.check_quota("acme", {"pages": 2}, request_id="h1", hold=True)
        await caller.record_usage("acme", "r1", {"pages": 1})
        await caller.record_usage("acme", "r2", {"pages": 1})
        assert not stats(caller).outage and stats(caller).passes == 0
        pause(rig.redis)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                await caller.get_usage("acme")
            infos = error_details(refused.value).error_infos
            assert [i.reason for i in infos] == ["STORE_UNAVAILABLE"]
            assert stats(caller).outage
        finally:
            resume(rig.redis)
        await rig.wait_for(SERVING)
        await caller.get_usage("acme")  # answered: the outage is over
        await eventually(lambda: stats(caller).passes == 1, "the background pass")
        assert not stats(caller).outage
        assert len(passes) == 1
        assert (passes[0].replayed, passes[0].duplicates, passes[0].complete) == (3, 3, True)
        await caller.get_usage("acme")
        await asyncio.sleep(0.2)
        assert stats(caller).passes == 1, "an answer without an outage before it starts nothing"
    finally:
        await caller.close()


# -- bounds -----------------------------------------------------------------------------


@KINDS
async def test_the_window_keeps_the_newest_max_entries(rig: Rig, kind: Flavour) -> None:
    """max_entries=5 and eight records: the three oldest are dropped (and counted), and after a total loss a replay re-applies exactly the five newest."""
    caller = make_client(kind, rig.target, ReplayWindow(max_entries=5))
    try:
        for n in range(1, 9):
            await caller.record_usage("acme", f"r{n}", {"pages": 1})
        assert (stats(caller).entries, stats(caller).dropped) == (5, 3)
        await lose_everything(rig)
        result = await caller.replay_acknowledged()
        assert (result.replayed, result.reapplied) == (5, 5)
        assert [o.request_id for o in result.outcomes] == [f"r{n}" for n in range(4, 9)]
        assert await record_ids(caller) == [f"r{n}" for n in range(4, 9)]
    finally:
        await caller.close()


@KINDS
async def test_the_window_forgets_entries_older_than_its_seconds(rig: Rig, kind: Flavour) -> None:
    """seconds=60: two records at t=0 and one at t=30; at t=61 only the last is kept, and after a total loss only it is re-applied."""
    now = [0.0]
    caller = make_client(kind, rig.target, ReplayWindow(seconds=60, clock=lambda: now[0]))
    try:
        await caller.record_usage("acme", "a1", {"pages": 1})
        await caller.record_usage("acme", "a2", {"pages": 1})
        now[0] = 30.0
        await caller.record_usage("acme", "a3", {"pages": 1})
        assert stats(caller).entries == 3
        now[0] = 61.0
        assert (stats(caller).entries, stats(caller).dropped) == (1, 0)
        await lose_everything(rig)
        result = await caller.replay_acknowledged()
        assert [(o.request_id, o.outcome) for o in result.outcomes] == [("a3", "reapplied")]
    finally:
        await caller.close()


@KINDS
async def test_an_expired_hold_is_not_sent_again(rig: Rig, kind: Flavour) -> None:
    """A hold whose TTL has passed is counted as expired and not sent: re-applied it would hold units for a job that gave up; its record, if any, is sent."""
    caller = make_client(kind, rig.target, ReplayWindow())
    try:
        await caller.check_quota("acme", {"pages": 2}, request_id="x1", hold=True, hold_ttl=1)
        await asyncio.sleep(1.1)
        await lose_everything(rig)
        result = await caller.replay_acknowledged()
        assert (result.replayed, result.expired) == (0, 1)
        assert await usage(rig) == {"documents": (0, 0), "pages": (0, 0)}
    finally:
        await caller.close()


def test_memory_per_entry_is_small() -> None:
    """A typical record (an org, a 32-character id, two metrics, a document type) costs about 260 bytes in the window: 10,000 of them stay under 4 MB."""
    acknowledged = AcknowledgedLog(ReplayWindow())
    requests = [
        record_usage_request(
            "acme-corp", uuid.uuid4().hex, {"pages": 12, "documents": 1}, document_type="invoice"
        )
        for _ in range(10_000)
    ]
    answer = quota_pb2.RecordUsageResponse()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for request in requests:
            acknowledged.answered(RECORD, request, answer)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    print(f"\nreplay window: {grown / 10_000:.0f} bytes per typical record")
    assert len(acknowledged) == 10_000
    assert grown < 4_000_000


# -- conflicts --------------------------------------------------------------------------


@KINDS
async def test_a_conflicting_answer_is_logged_and_counted_not_raised(
    rig: Rig, kind: Flavour, caplog: pytest.LogCaptureFixture
) -> None:
    """After a loss another caller used the same ids with other payloads: the replay answers are REQUEST_ID_REUSED, logged as errors and counted as conflicts; nothing is raised and nothing changes."""
    caller = make_client(kind, rig.target, ReplayWindow())
    try:
        await caller.record_usage("acme", "c1", {"pages": 3})
        await caller.check_quota("acme", {"pages": 2}, request_id="c2", hold=True, hold_ttl=600)
        await lose_everything(rig)
        await rig.quota.RecordUsage(
            quota_pb2.RecordUsageRequest(org_id="acme", request_id="c1", units={"pages": 4}),
            timeout=5,
        )
        await rig.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id="acme", units={"pages": 3}, request_id="c2", hold=True
            ),
            timeout=5,
        )
        with caplog.at_level(logging.ERROR, logger="pagemeter_client.replay"):
            result = await caller.replay_acknowledged()
        assert (result.replayed, result.conflicts, result.duplicates) == (2, 2, 0)
        assert {(o.request_id, o.outcome, o.code) for o in result.outcomes} == {
            ("c1", "conflict", "ALREADY_EXISTS"),
            ("c2", "conflict", "ALREADY_EXISTS"),
        }
        assert not result.complete
        logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert "'c1'" in logged and "'c2'" in logged
        assert await usage(rig) == {"documents": (0, 0), "pages": (4, 3)}
    finally:
        await caller.close()


# -- order and bounds, for any history (no server needed) -------------------------------


def _answer_for(kind: str) -> Any:
    if kind == "hold":
        answer = quota_pb2.CheckQuotaResponse(allowed=True, held=True)
        answer.hold_expires_at.FromSeconds(int(time.time()) + 600)
        return answer
    if kind == "record":
        return quota_pb2.RecordUsageResponse()
    return quota_pb2.ReleaseQuotaResponse(outcome=quota_pb2.RELEASE_OUTCOME_RELEASED)


def _acknowledge(acknowledged: AcknowledgedLog, kind: str, job: str) -> None:
    if kind == "hold":
        request: Any = check_quota_request("acme", {"pages": 1}, request_id=job, hold=True)
        acknowledged.answered(CHECK, request, _answer_for(kind))
    elif kind == "record":
        request = record_usage_request("acme", job, {"pages": 1})
        acknowledged.answered(RECORD, request, _answer_for(kind))
    else:
        request = quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id=job)
        acknowledged.answered(RELEASE, request, _answer_for(kind))


LIFECYCLES = st.sampled_from(
    [("hold", "record"), ("hold", "release"), ("hold",), ("record",), ("release",)]
)


@settings(max_examples=200, deadline=None)
@given(
    lifecycles=st.lists(LIFECYCLES, min_size=1, max_size=30),
    picks=st.lists(st.integers(min_value=0), min_size=60, max_size=60),
    batch=st.integers(min_value=1, max_value=7),
)
def test_a_pass_never_sends_a_hold_after_its_own_record_or_release(
    lifecycles: list[tuple[str, ...]], picks: list[int], batch: int
) -> None:
    """Any interleaving of jobs (each acknowledged hold before its record or release): the pass sends every entry once, each job's hold before its record or release, the records in acknowledgement order and in batches of at most `batch`."""
    pending = {f"job-{n}": list(steps) for n, steps in enumerate(lifecycles)}
    acknowledged = AcknowledgedLog(ReplayWindow())
    order: list[tuple[str, str]] = []
    turn = 0
    while pending:
        job = sorted(pending)[picks[turn % len(picks)] % len(pending)]
        turn += 1
        kind = pending[job].pop(0)
        if not pending[job]:
            del pending[job]
        _acknowledge(acknowledged, kind, job)
        order.append((kind, job))
    steps = plan(acknowledged.snapshot(), batch=batch)
    sent = [(entry.kind, entry.ids()[1]) for _, entries in steps for entry in entries]
    assert sorted(sent) == sorted(order)
    for kind, job in sent:
        if kind != "hold" and ("hold", job) in sent:
            assert sent.index(("hold", job)) < sent.index((kind, job))
    assert [s for s in sent if s[0] == "record"] == [s for s in order if s[0] == "record"]
    assert all(len(entries) <= batch for kind, entries in steps if kind == "record")


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.one_of(st.floats(min_value=0, max_value=40), st.none()), max_size=80),
    seconds=st.floats(min_value=1, max_value=100),
    max_entries=st.integers(min_value=1, max_value=12),
)
def test_the_window_is_the_newest_entries_within_its_age(
    events: list[float | None], seconds: float, max_entries: int
) -> None:
    """Acknowledgements at any times (None: one now; a number: the clock moves on): the window holds the newest max_entries of those no older than `seconds`, oldest first."""
    now = [0.0]
    acknowledged = AcknowledgedLog(
        ReplayWindow(seconds=seconds, max_entries=max_entries, clock=lambda: now[0])
    )
    acked: list[tuple[float, str]] = []
    for n, event in enumerate(events):
        if event is None:
            _acknowledge(acknowledged, "record", f"r{n}")
            acked.append((now[0], f"r{n}"))
        else:
            now[0] += event
    within = [job for at, job in acked if at >= now[0] - seconds]
    assert [e.ids()[1] for e in acknowledged.snapshot()] == within[-max_entries:]


# -- a real loss: a lagging replica promoted by Sentinel --------------------------------


def replicated(topology: Topology) -> bool:
    with (
        redis.Redis(port=topology.primary.port) as primary,
        redis.Redis(port=topology.replica.port) as replica,
    ):
        sent = int(primary.info("replication")["master_repl_offset"])
        return int(replica.info("replication")["slave_repl_offset"]) == sent


def fill_the_replication_link(topology: Topology) -> None:
    """Ballast beyond loopback's socket buffers, so that what follows waits in the primary's
    own output buffer for the frozen replica and dies with it (tests/system/test_cluster_failover.py)."""
    with redis.Redis(port=topology.primary.port) as primary:
        for n in range(48):
            primary.set(f"ballast:{n}", b"x" * 1_000_000)


@SYSTEM
@KINDS
async def test_acknowledged_requests_a_failover_lost_are_replayed_exactly(
    tmp_path: Path, kind: Flavour
) -> None:
    """Sentinel promotes a replica that never received 11 acknowledged requests (holds, records, a release): after the client's first answered call the background replay re-applies exactly those 11 (a lost hold before its lost record, and so before the record frees it), answers the 10 kept ones as duplicates, and committed and held units equal what the client was told."""
    with running_topology(tmp_path) as topology:
        settings_ = Settings(
            redis_mode="sentinel",
            sentinels=topology.addresses,
            sentinel_master=MASTER,
            listen="127.0.0.1:0",
            metrics_listen="",
            dev_open_access=True,
            redis_timeout_seconds=0.5,
        )
        store = connect_redis("", settings_)
        server, port, _ = await create_server(settings_, store, registry=CollectorRegistry())
        await server.start()
        passes: list[ReplayResult] = []
        caller = make_client(
            kind,
            f"127.0.0.1:{port}",
            ReplayWindow(on_replay=passes.append),
            max_attempts=1,
            timeout=2,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
                    admin_pb2.SetPlanRequest(
                        plan=plan_pb2.Plan(
                            org_id="acme",
                            name="HA",
                            timezone="UTC",
                            metrics=[plan_pb2.MetricLimits(metric="pages", overage_allowed=True)],
                        )
                    ),
                    timeout=5,
                )

            async def hold(job: str, pages: int) -> None:
                answer = await caller.check_quota(
                    "acme", {"pages": pages}, request_id=job, hold=True, hold_ttl=600
                )
                assert answer.held

            # Kept: written before the replica froze, and replicated.
            for n in (1, 2, 3):
                await hold(f"k{n}", n)
                await caller.record_usage("acme", f"k{n}", {"pages": n})
            await hold("k4", 4)
            await caller.release_quota("acme", "k4")
            await hold("k5", 5)  # a job still running through the failover
            await hold("k6", 6)  # its record comes after the freeze, and is lost
            await eventually(lambda: replicated(topology), "the replica to catch up")

            assert topology.replica.pid is not None
            os.kill(topology.replica.pid, signal.SIGSTOP)
            try:
                await asyncio.to_thread(fill_the_replication_link, topology)
                # Lost: acknowledged by the primary, never sent to the frozen replica.
                for n in (1, 2, 3):
                    await hold(f"l{n}", 10 * n)
                    await caller.record_usage("acme", f"l{n}", {"pages": 10 * n})
                await caller.record_usage("acme", "l4", {"pages": 40})
                await hold("l5", 50)  # a job still running through the failover
                await hold("l6", 60)
                await caller.release_quota("acme", "l6")
                await caller.record_usage("acme", "k6", {"pages": 6})
                topology.primary.kill()
            finally:
                os.kill(topology.replica.pid, signal.SIGCONT)
            assert stats(caller).entries == 21

            # The worker carries on: its calls fail until the replica is promoted.
            failures = 0
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, "pagemeter never answered after the failover"
                try:
                    await caller.get_usage("acme")
                except grpc.RpcError:
                    failures += 1
                    await asyncio.sleep(0.1)
                    continue
                if failures:
                    break
            assert topology.current_primary_port() == topology.replica.port
            await eventually(lambda: bool(passes) and passes[-1].complete, "a complete replay")
        finally:
            await caller.close()
            answer = None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with_usage = quota_pb2_grpc.QuotaServiceStub(channel)
                answer = await with_usage.GetUsage(
                    quota_pb2.GetUsageRequest(org_id="acme"), timeout=5
                )
            await server.stop(None)
            await close_redis(store)

    reapplied = {(o.kind, o.request_id) for result in passes for o in result.outcomes}
    assert reapplied == {
        *(("hold", f"l{n}") for n in (1, 2, 3, 5, 6)),
        *(("record", f"l{n}") for n in (1, 2, 3, 4)),
        ("record", "k6"),
        ("release", "l6"),
    }, "each lost request, and only those, was applied again"
    assert {o.outcome for result in passes for o in result.outcomes} == {"reapplied"}
    assert sum(result.reapplied for result in passes) == 11
    if len(passes) == 1:
        assert (passes[0].replayed, passes[0].duplicates) == (21, 10)
    pages = {m.metric: m for m in answer.metrics}["pages"]
    assert pages.committed == 1 + 2 + 3 + 10 + 20 + 30 + 40 + 6, "every acknowledged record once"
    assert pages.held == 5 + 50, "the holds of the two running jobs, and nothing else"
    print(
        f"\n{kind} client: {failures} calls failed during the failover, {len(passes)} replay "
        f"pass(es), {passes[-1].replayed} sent, {sum(r.reapplied for r in passes)} re-applied"
    )
