"""The async SDK coalescing concurrent CheckQuota and RecordUsage calls into batch RPCs.

Against a real pagemeter server and Redis (and, for the fallback, a real grpc.aio
server that predates the batch RPCs): many callers really run at once, the
server's own counters (grpc_server_handled_total) show which RPCs carried them,
and every caller gets what its single RPC would have answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pagemeter.v1 import plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_client import AsyncPagemeterClient, PagemeterClient, error_details
from pagemeter_client.outbox import Outbox
from pagemeter_client.sdk import record_usage_request
from pagemeter_server.api.auth import Credentials, Role
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.client.test_client_outbox import server_time
from tests.client.test_client_sdk import CuttingProxy
from tests.conftest import RunningServer, eagle_plan, examples, metric_limits, serving

QUOTA_SERVICE = "pagemeter.v1.QuotaService"


def handled(registry: CollectorRegistry, method: str, code: str = "OK") -> float:
    """How many calls of `method` the server finished with `code`."""
    labels = {
        "grpc_type": "UNARY",
        "grpc_service": QUOTA_SERVICE,
        "grpc_method": method,
        "grpc_code": code,
    }
    return registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def counted(registry: CollectorRegistry, method: str, expected: float) -> float:
    """The count of `method` once it reaches `expected` (the server counts a call a
    moment after its answer leaves), or after two seconds."""
    for _ in range(200):
        if handled(registry, method) >= expected:
            break
        await asyncio.sleep(0.01)
    return handled(registry, method)


def pages_plan(org_id: str, quota: int) -> plan_pb2.Plan:
    """`quota` pages a month, no overage: the quota is a hard wall."""
    return eagle_plan(
        org_id=org_id,
        metrics=[metric_limits("pages", contract_quota=quota, overage_allowed=False)],
    )


async def set_plans(target: str, *plans: plan_pb2.Plan) -> None:
    async with AsyncPagemeterClient(target, batching=False) as admin:
        for plan in plans:
            await admin.set_plan(plan)


def pages(usage: quota_pb2.GetUsageResponse) -> quota_pb2.MetricUsage:
    return {m.metric: m for m in usage.metrics}["pages"]


# -- coalescing happens, and the off switch --------------------------------------------


async def test_concurrent_checks_travel_in_batch_rpcs(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """64 concurrent check_quota calls of one client reach the server as a few CheckQuotaBatch RPCs and no CheckQuota; each caller gets its own decision."""
    await set_plans(pagemeter_server.target, eagle_plan())
    async with AsyncPagemeterClient(pagemeter_server.target) as client:
        answers = await asyncio.gather(
            *(client.check_quota("acme", {"pages": 1 + i % 3}) for i in range(64))
        )
    assert all(answer.allowed for answer in answers)
    assert [answer.metrics[0].requested for answer in answers] == [1 + i % 3 for i in range(64)]
    batches = await counted(registry, "CheckQuotaBatch", 1)
    assert 1 <= batches <= 8, f"64 concurrent calls took {batches} batch RPCs"
    assert handled(registry, "CheckQuota") == 0


async def test_with_batching_off_every_call_is_its_own_rpc(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """batching=False: 64 concurrent check_quota calls are 64 CheckQuota RPCs, and records RecordUsage RPCs."""
    await set_plans(pagemeter_server.target, eagle_plan())
    async with AsyncPagemeterClient(pagemeter_server.target, batching=False) as client:
        await asyncio.gather(*(client.check_quota("acme", {"pages": 1}) for _ in range(64)))
        await asyncio.gather(
            *(client.record_usage("acme", f"job-{i}", {"pages": 1}) for i in range(8))
        )
    assert await counted(registry, "CheckQuota", 64) == 64
    assert await counted(registry, "RecordUsage", 8) == 8
    assert handled(registry, "CheckQuotaBatch") == handled(registry, "RecordUsageBatch") == 0


async def test_a_call_alone_leaves_when_the_linger_ends_and_a_full_batch_at_once(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """A lone call waits its linger (and not much more) for company; a batch that reaches batch_max_items leaves without waiting."""
    await set_plans(pagemeter_server.target, eagle_plan())
    async with AsyncPagemeterClient(pagemeter_server.target, batch_linger=0.3) as client:
        await client.get_usage("acme")  # the channel is open: only the linger is timed
        started = time.monotonic()
        await client.check_quota("acme", {"pages": 1})
        alone = time.monotonic() - started
    assert 0.3 <= alone < 1.5
    async with AsyncPagemeterClient(
        pagemeter_server.target, batch_linger=1.0, batch_max_items=4
    ) as client:
        await client.get_usage("acme")
        started = time.monotonic()
        await asyncio.gather(*(client.check_quota("acme", {"pages": 1}) for _ in range(4)))
        full = time.monotonic() - started
    assert full < 0.8, f"a full batch waited {full:.3f} s"
    assert await counted(registry, "CheckQuotaBatch", 2) == 2


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"batch_linger": 1.5}, "batch_linger"),
        ({"batch_linger": -0.001}, "batch_linger"),
        ({"batch_linger": math.nan}, "batch_linger"),
        ({"batch_max_items": 0}, "batch_max_items"),
        ({"batch_max_items": 1001}, "batch_max_items"),
    ],
)
def test_settings_out_of_range_are_refused(options: dict[str, Any], problem: str) -> None:
    """A linger outside 0-1 s or a batch size outside 1-1,000 is refused when the client (either kind) is built."""
    for kind in (AsyncPagemeterClient, PagemeterClient):
        with pytest.raises(ValueError, match=problem):
            kind("127.0.0.1:1", **options)


# -- exactness under concurrency -------------------------------------------------------


async def test_200_concurrent_holds_against_50_admit_exactly_50(
    pagemeter_server: RunningServer,
) -> None:
    """200 concurrent reserve() holds of one page against a quota of 50 admit exactly 50; their commits count exactly 50 pages, and held goes back to 0."""
    await set_plans(pagemeter_server.target, pages_plan("acme", 50))
    async with AsyncPagemeterClient(pagemeter_server.target) as client:

        async def job(n: int) -> bool:
            answer = await client.check_quota("acme", {"pages": 1}, request_id=f"j{n}", hold=True)
            return answer.allowed

        admitted = [n for n, ok in enumerate(await asyncio.gather(*map(job, range(200)))) if ok]
        assert len(admitted) == 50
        held = await client.get_usage("acme")
        assert (pages(held).held, pages(held).committed) == (50, 0)
        records = await asyncio.gather(
            *(client.record_usage("acme", f"j{n}", {"pages": 1}) for n in admitted)
        )
        assert all(r.hold_released and not r.duplicate for r in records)
        usage = await client.get_usage("acme")
    assert (pages(usage).committed, pages(usage).held) == (50, 0)


async def test_reserve_under_coalescing_admits_exactly_the_quota(
    pagemeter_server: RunningServer,
) -> None:
    """200 concurrent reserve() blocks against a quota of 50: 50 bodies run, 150 raise QuotaDenied, and 50 pages are committed."""
    await set_plans(pagemeter_server.target, pages_plan("acme", 50))
    ran = 0
    async with AsyncPagemeterClient(pagemeter_server.target) as client:

        async def job() -> None:
            nonlocal ran
            async with client.reserve("acme", {"pages": 1}):
                ran += 1

        outcomes = await asyncio.gather(*(job() for _ in range(200)), return_exceptions=True)
        usage = await client.get_usage("acme")
    assert ran == 50
    assert sum(isinstance(o, Exception) for o in outcomes) == 150
    assert (pages(usage).committed, pages(usage).held) == (50, 0)


async def test_records_retried_with_the_same_ids_count_once(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """100 concurrent records (50 ids, each sent twice), whose batch answers are lost on the way so gRPC retries the batches, count each id once."""
    await set_plans(pagemeter_server.target, pages_plan("acme", 10_000))
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        AsyncPagemeterClient(proxy.target, initial_backoff=0.05) as client,
    ):
        await client.get_usage("acme")
        proxy.lose_next_answer()
        proxy.lose_next_answer()
        answers = await asyncio.gather(
            *(client.record_usage("acme", f"job-{n % 50}", {"pages": 2}) for n in range(100))
        )
        usage = await client.get_usage("acme")
    assert proxy.cuts == 2
    # Both batches were applied before their answers were lost: every answer a
    # caller sees is the retry's, a duplicate; each id counted once.
    assert all(a.status == quota_pb2.RECORD_STATUS_COMPLETED for a in answers)
    assert pages(usage).committed == 100
    assert handled(registry, "RecordUsage") == 0


# -- per call: deadline, errors, cancellation, metadata --------------------------------


@pytest.fixture
async def silent_target() -> AsyncIterator[str]:
    """A TCP listener that accepts connections and never says a word."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    for writer in writers:
        writer.close()
    await server.wait_closed()


async def test_each_call_keeps_its_own_deadline(silent_target: str) -> None:
    """Concurrent calls with deadlines of 0.3 s and 1.2 s against a server that never answers fail with DEADLINE_EXCEEDED, each no later than its own deadline and the long ones not at the short one's."""
    async with AsyncPagemeterClient(silent_target, batch_linger=0.05) as client:

        async def timed(seconds: float) -> tuple[float, grpc.StatusCode]:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.check_quota("acme", {"pages": 1}, timeout=seconds)
            return time.monotonic() - started, failed.value.code()

        results = await asyncio.gather(*(timed(0.3 if n % 2 else 1.2) for n in range(10)))
    for n, (took, code) in enumerate(results):
        limit = 0.3 if n % 2 else 1.2
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert limit - 0.06 <= took <= limit + 0.25, (limit, took)


async def test_an_invalid_call_fails_alone_with_the_single_rpcs_error(
    pagemeter_server: RunningServer,
) -> None:
    """Among good calls in one batch, a call with a malformed request_id raises INVALID_ARGUMENT with the code, message and details the single RPC raises; the others are answered."""
    await set_plans(pagemeter_server.target, eagle_plan())
    async with (
        AsyncPagemeterClient(pagemeter_server.target, batch_linger=0.05) as client,
        AsyncPagemeterClient(pagemeter_server.target, batching=False) as single,
    ):
        outcomes = await asyncio.gather(
            *(client.record_usage("acme", f"job-{n}", {"pages": 1}) for n in range(5)),
            client.record_usage("acme", "job 1", {"pages": 1}),
            *(client.check_quota("acme", {"pages": 1}) for _ in range(5)),
            client.check_quota("acme", {"pages": -1}),
            return_exceptions=True,
        )
        bad_record, bad_check = outcomes[5], outcomes[11]
        assert isinstance(bad_record, grpc.aio.AioRpcError)
        assert isinstance(bad_check, grpc.aio.AioRpcError)
        good = [o for n, o in enumerate(outcomes) if n not in (5, 11)]
        assert not any(isinstance(o, BaseException) for o in good)
        with pytest.raises(grpc.aio.AioRpcError) as alone_record:
            await single.record_usage("acme", "job 1", {"pages": 1})
        with pytest.raises(grpc.aio.AioRpcError) as alone_check:
            await single.check_quota("acme", {"pages": -1})
    for batched, alone in ((bad_record, alone_record.value), (bad_check, alone_check.value)):
        assert batched.code() == alone.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert batched.details() == alone.details()
        assert error_details(batched) == error_details(alone)


async def test_a_reused_request_id_fails_with_the_single_rpcs_error_info(
    pagemeter_server: RunningServer,
) -> None:
    """A record whose id another payload used is refused ALREADY_EXISTS with ErrorInfo REQUEST_ID_REUSED and its metadata, exactly as the single RPC refuses it."""
    await set_plans(pagemeter_server.target, eagle_plan())
    async with (
        AsyncPagemeterClient(pagemeter_server.target) as client,
        AsyncPagemeterClient(pagemeter_server.target, batching=False) as single,
    ):
        await client.record_usage("acme", "job-1", {"pages": 1})
        with pytest.raises(grpc.aio.AioRpcError) as batched:
            await asyncio.gather(
                client.record_usage("acme", "job-1", {"pages": 2}),
                client.record_usage("acme", "job-2", {"pages": 2}),
            )
        with pytest.raises(grpc.aio.AioRpcError) as alone:
            await single.record_usage("acme", "job-1", {"pages": 2})
    assert batched.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(batched.value) == error_details(alone.value)
    assert error_details(batched.value).error_infos[0].metadata["status"] == "completed"


async def test_a_caller_cancelled_while_gathering_leaves_the_batch(
    pagemeter_server: RunningServer,
) -> None:
    """A caller cancelled during the linger is taken out of the batch: its hold is never made, and the others' holds are."""
    await set_plans(pagemeter_server.target, eagle_plan())
    async with AsyncPagemeterClient(pagemeter_server.target, batch_linger=0.2) as client:
        calls = [
            asyncio.create_task(
                client.check_quota("acme", {"pages": 1}, request_id=f"h{n}", hold=True)
            )
            for n in range(5)
        ]
        await asyncio.sleep(0.05)
        calls[2].cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        usage = await client.get_usage("acme")
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert all(isinstance(o, quota_pb2.CheckQuotaResponse) and o.held for o in outcomes[:2])
    assert pages(usage).held == 4


async def test_a_caller_cancelled_in_flight_does_not_cancel_the_others(
    pagemeter_server: RunningServer,
) -> None:
    """Once a batch is sent, cancelling one of its callers raises CancelledError in that caller only: the others get their answers (the batch's first answer is lost on the way, so the RPC is surely still in flight when the caller is cancelled)."""
    await set_plans(pagemeter_server.target, eagle_plan())
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        AsyncPagemeterClient(proxy.target, batch_linger=0.02, initial_backoff=0.2) as client,
    ):
        await client.get_usage("acme")
        proxy.lose_next_answer()
        calls = [
            asyncio.create_task(
                client.check_quota("acme", {"pages": 1}, request_id=f"h{n}", hold=True)
            )
            for n in range(20)
        ]
        for _ in range(5000):  # until the answer is lost: the batch waits for its retry
            if proxy.cuts:
                break
            await asyncio.sleep(0.001)
        calls[0].cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert proxy.cuts == 1
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert all(isinstance(o, quota_pb2.CheckQuotaResponse) and o.held for o in outcomes[1:])


async def test_a_refused_credential_gets_the_single_rpcs_message(
    settings: Settings, redis_client: Any, clock: ManualClock
) -> None:
    """A tenant API key may not call CheckQuota: the batch RPC's refusal (which names CheckQuotaBatch) is not passed on; each call gets the single RPC's PERMISSION_DENIED."""
    creds = Credentials()
    creds.add(Role.ADMIN, "ops", "coalescing-admin-token-0123456789")
    async with serving(settings, redis_client, clock, credentials=creds) as running:
        async with AsyncPagemeterClient(
            running.target, token="coalescing-admin-token-0123456789"
        ) as admin:
            await admin.set_plan(eagle_plan())
            key = (await admin.create_api_key("acme")).secret
        async with AsyncPagemeterClient(running.target, token=key) as tenant:
            outcomes = await asyncio.gather(
                *(tenant.check_quota("", {"pages": 1}) for _ in range(3)),
                return_exceptions=True,
            )
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED
        assert outcome.details() == "tenant credentials may not call CheckQuota"


# -- a server without the batch RPCs ---------------------------------------------------


class OlderQuotaService(quota_pb2_grpc.QuotaServiceServicer):
    """A QuotaService from before the batch RPCs: grpc answers them UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.singles = 0

    async def CheckQuota(
        self, request: quota_pb2.CheckQuotaRequest, context: Any
    ) -> quota_pb2.CheckQuotaResponse:
        self.singles += 1
        return quota_pb2.CheckQuotaResponse(request_id=request.request_id, allowed=True)

    async def RecordUsage(
        self, request: quota_pb2.RecordUsageRequest, context: Any
    ) -> quota_pb2.RecordUsageResponse:
        self.singles += 1
        return quota_pb2.RecordUsageResponse(request_id=request.request_id)


@pytest.fixture
async def older_server() -> AsyncIterator[tuple[str, OlderQuotaService]]:
    server = grpc.aio.server()
    service = OlderQuotaService()  # type: ignore[abstract]  # the stubs declare every RPC abstract
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", service
    await server.stop(None)


async def test_a_server_without_batch_rpcs_gets_single_calls(
    older_server: tuple[str, OlderQuotaService], tmp_path: Path
) -> None:
    """An older server answers the batch RPCs UNIMPLEMENTED: every call is answered by its single RPC, later calls go alone at once, and the outbox delivers one record per RecordUsage."""
    target, service = older_server
    async with AsyncPagemeterClient(target) as client:
        first = await asyncio.gather(
            *(client.check_quota("acme", {"pages": 1}, request_id=f"c{n}") for n in range(10))
        )
        assert [a.request_id for a in first] == [f"c{n}" for n in range(10)]
        assert service.singles == 10
        await asyncio.gather(
            *(client.record_usage("acme", f"r{n}", {"pages": 1}) for n in range(10))
        )
        assert service.singles == 20
    with Outbox(tmp_path / "outbox.db") as outbox:
        for n in range(5):
            outbox.add(record_usage_request("acme", f"o{n}", {"pages": 1}))
        async with AsyncPagemeterClient(target, outbox=outbox) as client:
            result = await client.flush_outbox()
    assert [o.outcome for o in result.outcomes] == ["delivered"] * 5
    assert service.singles == 25


# -- the outbox flushes in batches ----------------------------------------------------


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "sync"])
async def test_the_outbox_flushes_in_batches(
    pagemeter_server: RunningServer,
    registry: CollectorRegistry,
    tmp_path: Path,
    blocking: bool,
) -> None:
    """A delivery pass sends 25 due records as RecordUsageBatch RPCs of batch_max_items (10), none as RecordUsage; each record is settled by its item: delivered, a duplicate, or refused and kept as a dead letter."""
    await set_plans(pagemeter_server.target, eagle_plan())
    with Outbox(tmp_path / "outbox.db", clock=server_time(pagemeter_server.clock)) as outbox:
        for n in range(25):
            document_type = "bad type" if n == 7 else "invoice"
            entry = outbox.add(
                record_usage_request("acme", f"r{n}", {"pages": 1}, document_type=document_type)
            )
            if n == 0:  # already delivered: the pass finds a duplicate
                await pagemeter_server.quota.RecordUsage(entry.request)
        if blocking:
            with PagemeterClient(pagemeter_server.target, outbox=outbox, batch_max_items=10) as c:
                result = await asyncio.to_thread(c.flush_outbox)
        else:
            async with AsyncPagemeterClient(
                pagemeter_server.target, outbox=outbox, batch_max_items=10
            ) as client:
                result = await client.flush_outbox()
        summary = outbox.summary()
    outcomes = {o.request_id: (o.outcome, o.code) for o in result.outcomes}
    assert outcomes["r0"] == ("duplicate", None)
    assert outcomes["r7"] == ("rejected", "INVALID_ARGUMENT")
    assert sum(outcome == "delivered" for outcome, _ in outcomes.values()) == 23
    assert (summary.pending, summary.dead) == (0, 1)
    assert await counted(registry, "RecordUsageBatch", 3) == 3
    assert handled(registry, "RecordUsage") == 1, "only the test's own first delivery of r0"


async def test_a_durable_record_goes_in_a_batch_and_is_removed(
    pagemeter_server: RunningServer, registry: CollectorRegistry, tmp_path: Path
) -> None:
    """record_usage with an outbox: concurrent first attempts share a RecordUsageBatch, and each delivered record leaves the outbox."""
    await set_plans(pagemeter_server.target, eagle_plan())
    with Outbox(tmp_path / "outbox.db", clock=server_time(pagemeter_server.clock)) as outbox:
        async with AsyncPagemeterClient(pagemeter_server.target, outbox=outbox) as client:
            answers = await asyncio.gather(
                *(client.record_usage("acme", f"d{n}", {"pages": 1}) for n in range(20))
            )
        summary = outbox.summary()
    assert all(not a.duplicate for a in answers)
    assert (summary.pending, summary.dead) == (0, 0)
    assert await counted(registry, "RecordUsageBatch", 1) >= 1
    assert handled(registry, "RecordUsage") == 0


async def test_the_blocking_client_sends_each_call_alone(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """The blocking client accepts the batching settings and sends check_quota and record_usage as single RPCs."""
    await set_plans(pagemeter_server.target, eagle_plan())

    def work() -> None:
        with PagemeterClient(pagemeter_server.target, batch_linger=0.01) as client:
            client.check_quota("acme", {"pages": 1})
            client.record_usage("acme", "job-1", {"pages": 1})

    await asyncio.to_thread(work)
    assert await counted(registry, "CheckQuota", 1) == 1
    assert await counted(registry, "RecordUsage", 1) == 1
    assert handled(registry, "CheckQuotaBatch") == 0


# -- every caller gets what its single RPC answers -----------------------------------

VALID_ID = "job-{n}"
CALL = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["check", "hold", "record", "failed_record"]),
        "flaw": st.sampled_from(
            [None, None, None, "org", "request_id", "negative", "metric_name", "document_type"]
        ),
        "units": st.integers(min_value=1, max_value=40),
        "metric": st.sampled_from(["pages", "documents", "unplanned"]),
    }
)


def outcome_of(result: object) -> tuple[Any, ...]:
    """What a caller can tell of an answer or an error, minus the figures that depend
    on how the calls interleave (committed, held, remaining)."""
    if isinstance(result, grpc.RpcError):
        details = error_details(result)
        infos = [(i.reason, i.domain, dict(i.metadata)) for i in details.error_infos]
        return ("error", details.code, details.message, details.field_violations, infos)
    if isinstance(result, quota_pb2.CheckQuotaResponse):
        metrics = [(m.metric, m.allowed, m.reason, m.requested) for m in result.metrics]
        return ("check", result.allowed, result.reason, result.held, result.request_id, metrics)
    assert isinstance(result, quota_pb2.RecordUsageResponse), result
    return ("record", result.status, result.duplicate, result.request_id, result.hold_released)


async def run_calls(
    client: AsyncPagemeterClient, org_id: str, calls: list[dict[str, Any]]
) -> list[tuple[Any, ...]]:
    def one(n: int, call: dict[str, Any]) -> Callable[[], Any]:
        flaw, metric = call["flaw"], call["metric"]
        org = "bad org!" if flaw == "org" else org_id
        request_id = "job 1" if flaw == "request_id" else f"job-{n}"
        units = {("bad metric!" if flaw == "metric_name" else metric): call["units"]}
        if flaw == "negative":
            units = {metric: -call["units"]}
        if call["kind"] in ("check", "hold"):
            hold = call["kind"] == "hold"
            return lambda: client.check_quota(
                org, units, request_id=request_id if hold or flaw else None, hold=hold
            )
        return lambda: client.record_usage(
            org,
            request_id,
            units,
            success=call["kind"] == "record",
            document_type="bad type" if flaw == "document_type" else "invoice",
        )

    results = await asyncio.gather(
        *(one(n, call)() for n, call in enumerate(calls)), return_exceptions=True
    )
    return [outcome_of(result) for result in results]


@settings(
    max_examples=examples(25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(calls=st.lists(CALL, min_size=1, max_size=40))
async def test_every_caller_gets_what_its_single_rpc_answers(
    pagemeter_server: RunningServer, calls: list[dict[str, Any]]
) -> None:
    """Random mixes of concurrent checks, holds and records, some invalid: each caller of a coalescing client gets the answer or the error (code, message, details) the same call gets alone, on a twin organization."""
    stamp = time.monotonic_ns()
    batched_org, single_org = f"b{stamp}", f"s{stamp}"
    roomy = {"contract_quota": 1_000_000, "overage_allowed": True}
    await set_plans(
        pagemeter_server.target,
        *(
            eagle_plan(
                org_id=org,
                metrics=[metric_limits("pages", **roomy), metric_limits("documents", **roomy)],
            )
            for org in (batched_org, single_org)
        ),
    )
    async with (
        AsyncPagemeterClient(pagemeter_server.target, batch_max_items=7) as coalescing,
        AsyncPagemeterClient(pagemeter_server.target, batching=False) as single,
    ):
        batched = await run_calls(coalescing, batched_org, calls)
        alone = await run_calls(single, single_org, calls)
    assert batched == alone


# -- items refused UNAVAILABLE are retried as gRPC retries a single call ---------------


@pytest.fixture
async def impatient_server(
    settings: Settings, clock: ManualClock, registry: CollectorRegistry
) -> AsyncIterator[RunningServer]:
    """The test server with a Redis timeout of 0.2 s: a paused Redis makes its
    batch items UNAVAILABLE (STORE_UNAVAILABLE) quickly."""
    impatient = dataclasses.replace(settings, redis_timeout_seconds=0.2)
    store = connect_redis(impatient.redis_url, impatient)
    try:
        async with serving(impatient, store, clock, registry) as running:
            yield running
    finally:
        await store.aclose()


async def test_items_refused_unavailable_are_sent_again_with_backoff(
    impatient_server: RunningServer, redis_sync: Any, registry: CollectorRegistry
) -> None:
    """While Redis is paused every item of a batch is refused UNAVAILABLE; the client sends the calls again after gRPC's backoff, in batches, and once Redis is back each caller gets its decision."""
    await set_plans(impatient_server.target, eagle_plan())
    async with AsyncPagemeterClient(
        impatient_server.target, initial_backoff=0.4, max_backoff=0.8
    ) as client:
        await client.get_usage("acme")
        redis_sync.client_pause(500, all=True)
        answers = await asyncio.gather(
            *(client.check_quota("acme", {"pages": 1}) for _ in range(10))
        )
    assert all(answer.allowed for answer in answers)
    assert await counted(registry, "CheckQuotaBatch", 2) >= 2, "a first batch, then the retries"
    assert handled(registry, "CheckQuota") == 0


async def test_an_item_still_unavailable_after_the_attempts_fails_as_the_single_call(
    impatient_server: RunningServer, redis_sync: Any
) -> None:
    """With max_attempts=1, a call whose item is refused UNAVAILABLE raises the UNAVAILABLE (message, ErrorInfo STORE_UNAVAILABLE) the single RPC raises."""
    await set_plans(impatient_server.target, eagle_plan())
    async with (
        AsyncPagemeterClient(impatient_server.target, max_attempts=1) as client,
        AsyncPagemeterClient(impatient_server.target, max_attempts=1, batching=False) as single,
    ):
        await client.get_usage("acme")
        await single.get_usage("acme")
        redis_sync.client_pause(1000, all=True)
        with pytest.raises(grpc.aio.AioRpcError) as batched:
            await client.check_quota("acme", {"pages": 1}, hold=True)
        with pytest.raises(grpc.aio.AioRpcError) as alone:
            await single.check_quota("acme", {"pages": 1}, hold=True)
    assert batched.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(batched.value) == error_details(alone.value)
