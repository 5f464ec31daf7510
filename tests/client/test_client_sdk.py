"""The Python SDK (async and sync clients) against a real pagemeter server and Redis.

Retries are proven with a real TCP proxy that lets the server process a call and
then drops the connection before the answer gets back, so the client must retry
the same message; deadlines with a real listener that never answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_client import (
    AsyncPagemeterClient,
    PagemeterClient,
    QuotaDenied,
    RetryPolicy,
    error_details,
)
from pagemeter_client.sdk import record_usage_request, window_name
from pagemeter_server.ops.embedded import free_port
from tests.client.client_flavours import Connect
from tests.conftest import START_MS, RunningServer, eagle_plan

Q = quota_pb2
HTTP2_HEADERS_FRAME = 0x1


class CuttingProxy:
    """A TCP proxy in front of the server that can drop a connection mid-call.

    Bytes from client to server pass untouched. Bytes back are read frame by frame
    (HTTP/2 frames: 9-byte header, then the payload): when the server starts its
    answer to an RPC (a HEADERS frame on a stream), the proxy closes both sides
    instead of forwarding it. The server has then done the work; the client only
    sees the connection die (UNAVAILABLE) and must retry to learn the result.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cuts_left = 0
        self.cuts = 0
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def lose_next_answer(self) -> None:
        """Drop the connection that carries the next RPC answer."""
        self.cuts_left += 1

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [client_w, server_w]
        pumps = [
            asyncio.create_task(self._pump_requests(client_r, server_w)),
            asyncio.create_task(self._pump_answers(server_r, client_w, server_w)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    @staticmethod
    async def _pump_requests(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()

    async def _pump_answers(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        try:
            while True:
                header = await source.readexactly(9)
                payload = await source.readexactly(int.from_bytes(header[:3], "big"))
                stream_id = int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
                if header[3] == HTTP2_HEADERS_FRAME and stream_id and self.cuts_left:
                    self.cuts_left -= 1
                    self.cuts += 1
                    return
                sink.write(header + payload)
                await sink.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            sink.close()
            upstream.close()


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


@pytest.fixture
async def client(
    connect: Connect, pagemeter_server: RunningServer
) -> AsyncIterator[AsyncPagemeterClient]:
    """A client of the test server (async, then blocking), whose org "acme" has Eagle Doc's plan."""
    async with connect(pagemeter_server.target) as sdk:
        await sdk.set_plan(eagle_plan())
        yield sdk


def figures(usage: quota_pb2.GetUsageResponse, metric: str) -> quota_pb2.MetricUsage:
    return {m.metric: m for m in usage.metrics}[metric]


# -- plain calls --------------------------------------------------------------------------


async def test_round_trip_of_every_call(client: AsyncPagemeterClient) -> None:
    """check, hold, record, release, usage, plan and credits calls return the server's messages."""
    plan = (await client.get_plan("acme")).plan
    assert plan.name == "Business" and plan.version == 1

    peek = await client.check_quota("acme", {"pages": 10})
    assert peek.allowed and not peek.held and peek.request_id == ""

    held = await client.check_quota("acme", {"pages": 10}, hold=True, hold_ttl=60)
    assert held.allowed and held.held
    assert len(held.request_id) == 32, "a hold without an id gets a uuid4 hex id"

    recorded = await client.record_usage(
        "acme", held.request_id, {"pages": 9}, document_type="invoice"
    )
    assert recorded.status == Q.RECORD_STATUS_COMPLETED and recorded.hold_released

    dropped = await client.check_quota("acme", {"pages": 5}, request_id="job-2", hold=True)
    released = await client.release_quota("acme", dropped.request_id)
    assert released.outcome == Q.RELEASE_OUTCOME_RELEASED
    assert dict(released.released_units) == {"pages": 5}

    grant = await client.grant_credits("acme", "pages", 300, "grant-1", reason="purchase 42")
    assert grant.balance == 300 and not grant.duplicate

    pages = figures(await client.get_usage("acme"), "pages")
    assert (pages.committed, pages.held, pages.prepaid_balance) == (9, 0, 300)
    march = await client.get_usage("acme", year=2026, month=3)
    assert figures(march, "pages").committed == 9


async def test_hold_ttl_accepts_a_timedelta(client: AsyncPagemeterClient) -> None:
    """A hold_ttl given as a timedelta reaches the server as that duration."""
    held = await client.check_quota(
        "acme", {"pages": 1}, request_id="ttl-1", hold=True, hold_ttl=timedelta(seconds=90)
    )
    assert held.hold_expires_at.ToDatetime(UTC) == datetime(2026, 3, 15, 12, 1, 30, tzinfo=UTC)


async def test_server_errors_carry_decoded_details(client: AsyncPagemeterClient) -> None:
    """A refused call raises an RpcError whose BadRequest field violations error_details decodes."""
    with pytest.raises(grpc.RpcError) as refused:
        await client.record_usage("acme", "not a valid id!", {"pages": 1})
    details = error_details(refused.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in details.field_violations] == ["request_id"]
    assert details.lines()[0].startswith("INVALID_ARGUMENT: ")


def test_naive_times_are_refused_before_sending() -> None:
    """A datetime without a timezone is refused, since protobuf would silently read it as UTC."""
    with pytest.raises(ValueError, match="completed_at must be timezone-aware"):
        record_usage_request("acme", "job-1", {"pages": 1}, completed_at=datetime(2026, 3, 1))


def test_retry_policy_is_gRPC_service_config() -> None:
    """The retry policy becomes a service config retrying only UNAVAILABLE on every pagemeter service."""
    config = json.loads(RetryPolicy(max_attempts=4, initial_backoff=0.05).service_config())
    (method,) = config["methodConfig"]
    assert {n["service"] for n in method["name"]} == {
        "pagemeter.v1.QuotaService",
        "pagemeter.v1.AdminService",
        "pagemeter.v1.ReportingService",
    }
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert "retryPolicy" not in json.loads(RetryPolicy(max_attempts=1).service_config())
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=6)


# -- reserve() ----------------------------------------------------------------------------


async def test_reserve_commits_the_reserved_units_on_normal_exit(
    client: AsyncPagemeterClient,
) -> None:
    """Leaving the block normally records the reserved units and frees the hold."""
    async with client.reserve("acme", {"pages": 12, "documents": 1}) as job:
        assert job.decision.held and job.request_id == job.decision.request_id
        during = await client.get_usage("acme")
        assert figures(during, "pages").held == 12
    usage = await client.get_usage("acme")
    assert (figures(usage, "pages").committed, figures(usage, "pages").held) == (12, 0)
    assert figures(usage, "documents").committed == 1
    assert (usage.jobs.succeeded, usage.jobs.failed) == (1, 0)


async def test_reserve_commit_records_the_actual_units(client: AsyncPagemeterClient) -> None:
    """commit(units) inside the block records those units once and nothing more on exit."""
    async with client.reserve("acme", {"pages": 12}, request_id="job-7") as job:
        result = await job.commit({"pages": 7}, document_type="invoice")
    assert result.request_id == "job-7" and not result.duplicate
    usage = await client.get_usage("acme")
    assert figures(usage, "pages").committed == 7 and usage.jobs.total == 1


async def test_reserve_records_a_failed_job_when_the_body_raises(
    client: AsyncPagemeterClient,
) -> None:
    """An exception in the block records the job as failed (nothing consumed) and propagates."""
    with pytest.raises(RuntimeError, match="OCR crashed"):
        async with client.reserve("acme", {"pages": 12}):
            raise RuntimeError("OCR crashed")
    usage = await client.get_usage("acme")
    pages = figures(usage, "pages")
    assert (pages.committed, pages.held) == (0, 0)
    assert (usage.jobs.succeeded, usage.jobs.failed) == (0, 1)


async def test_reserve_keeps_the_body_error_when_recording_the_failure_fails(
    connect: Connect,
    pagemeter_server: RunningServer,
) -> None:
    """If recording the failed job fails too, the body's own exception propagates, with a note."""
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        connect(proxy.target, max_attempts=2, initial_backoff=0.05) as sdk,
    ):
        await sdk.set_plan(eagle_plan())

        async def crash_while_every_answer_is_lost() -> None:
            async with sdk.reserve("acme", {"pages": 12}):
                proxy.lose_next_answer()
                proxy.lose_next_answer()  # both attempts of the failure record
                raise RuntimeError("OCR crashed")

        with pytest.raises(RuntimeError, match="OCR crashed") as raised:
            await crash_while_every_answer_is_lost()
    assert proxy.cuts == 2
    (note,) = raised.value.__notes__
    assert note.startswith("pagemeter: recording the failed job also failed (UNAVAILABLE: ")


async def test_reserve_release_drops_the_hold_and_records_nothing(
    client: AsyncPagemeterClient,
) -> None:
    """release() in the block frees the hold; leaving the block then records nothing."""
    async with client.reserve("acme", {"pages": 12}) as job:
        released = await job.release()
    assert released.outcome == Q.RELEASE_OUTCOME_RELEASED
    usage = await client.get_usage("acme")
    assert (figures(usage, "pages").held, usage.jobs.total) == (0, 0)


async def test_reserve_raises_quota_denied_without_running_the_body(
    client: AsyncPagemeterClient,
) -> None:
    """A denied reservation raises QuotaDenied naming the reason and max_admissible; no body, no hold."""
    ran = False
    with pytest.raises(QuotaDenied) as denied:
        async with client.reserve("acme", {"pages": 2501, "documents": 1}):
            ran = True
    assert not ran
    assert denied.value.reason == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert str(denied.value) == (
        "quota denied: HARD_LIMIT_EXCEEDED (documents: ok, requested 1, max admissible 500; "
        "pages: HARD_LIMIT_EXCEEDED, requested 2501, max admissible 2500)"
    )
    assert denied.value.retry_after is None
    usage = await client.get_usage("acme")
    assert figures(usage, "pages").held == figures(usage, "documents").held == 0


async def test_quota_denied_without_overage_names_quota_exceeded(
    client: AsyncPagemeterClient,
) -> None:
    """Past the contract quota of a metric without overage, QuotaDenied says QUOTA_EXCEEDED."""
    with pytest.raises(
        QuotaDenied, match=r"documents: QUOTA_EXCEEDED, requested 501, max admissible 500"
    ):
        async with client.reserve("acme", {"documents": 501}):
            pass


async def test_sync_client_round_trip_and_reserve(pagemeter_server: RunningServer) -> None:
    """The blocking client makes the same calls and its reserve() commits, fails and denies alike."""

    def worker() -> quota_pb2.GetUsageResponse:
        with PagemeterClient(pagemeter_server.target) as sdk:
            sdk.set_plan(eagle_plan())
            with sdk.reserve("acme", {"pages": 100}) as job:
                assert job.decision.allowed
            with pytest.raises(ValueError, match="bad scan"), sdk.reserve("acme", {"pages": 5}):
                raise ValueError("bad scan")
            with pytest.raises(QuotaDenied), sdk.reserve("acme", {"pages": 5000}):
                pytest.fail("the body of a denied reservation ran")
            held = sdk.check_quota("acme", {"pages": 3}, hold=True)
            assert sdk.release_quota("acme", held.request_id).outcome == Q.RELEASE_OUTCOME_RELEASED
            assert sdk.grant_credits("acme", "pages", 10, "g-1").balance == 10
            assert sdk.get_plan("acme").plan.name == "Business"
            return sdk.get_usage("acme", year=2026, month=3)

    usage = await asyncio.to_thread(worker)
    assert figures(usage, "pages").committed == 100
    assert (usage.jobs.succeeded, usage.jobs.failed) == (1, 1)


def test_async_client_made_outside_any_event_loop_works_inside_one() -> None:
    """The async client opens its channel on first use, so it may be built before the loop runs."""
    sdk = AsyncPagemeterClient(f"127.0.0.1:{free_port()}", timeout=0.3, max_attempts=1)

    async def use() -> grpc.StatusCode:
        try:
            await sdk.get_usage("acme")
        except grpc.aio.AioRpcError as error:
            return error.code()
        finally:
            await sdk.close()
        raise AssertionError("nothing listens there")

    assert asyncio.run(use()) in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


# -- retries ------------------------------------------------------------------------------


async def test_retry_resends_the_same_record_and_it_counts_once(
    connect: Connect,
    pagemeter_server: RunningServer,
) -> None:
    """When the answer to RecordUsage is lost, gRPC's retry re-sends the same id: a duplicate, counted once."""
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        connect(proxy.target, initial_backoff=0.05) as sdk,
    ):
        await sdk.set_plan(eagle_plan())
        proxy.lose_next_answer()
        result = await sdk.record_usage("acme", "job-1", {"pages": 10})
        usage = await sdk.get_usage("acme")
    assert proxy.cuts == 1 and proxy.connections == 2, "the first answer was really lost"
    assert result.duplicate, (
        "the server saw job-1 twice and answered the retry with the first result"
    )
    assert figures(usage, "pages").committed == 10 and usage.jobs.total == 1


async def test_without_retries_the_lost_answer_is_an_error(
    connect: Connect, pagemeter_server: RunningServer
) -> None:
    """With max_attempts=1 the same lost answer surfaces as UNAVAILABLE (so the retry above is real)."""
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        connect(proxy.target, max_attempts=1) as sdk,
    ):
        await sdk.set_plan(eagle_plan())
        proxy.lose_next_answer()
        with pytest.raises(grpc.RpcError) as lost:
            await sdk.record_usage("acme", "job-1", {"pages": 10})
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    # A fresh client: the cut channel may still try the dead socket once, and
    # without retries that second failure would be about the proxy, not the server.
    async with connect(pagemeter_server.target, max_attempts=1) as direct:
        again = await direct.record_usage("acme", "job-1", {"pages": 10})
    assert again.duplicate, "the server had recorded the first attempt"


async def test_retried_hold_keeps_the_generated_request_id(
    connect: Connect, pagemeter_server: RunningServer
) -> None:
    """A hold without a request_id gets its id before the first attempt, so the retry holds once."""
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        connect(proxy.target, initial_backoff=0.05) as sdk,
    ):
        await sdk.set_plan(eagle_plan())
        proxy.lose_next_answer()
        held = await sdk.check_quota("acme", {"pages": 40}, hold=True)
        usage = await sdk.get_usage("acme")
    assert proxy.cuts == 1
    assert held.duplicate and held.held and len(held.request_id) == 32
    assert figures(usage, "pages").held == 40


async def test_sync_client_retries_with_the_same_request_id(
    pagemeter_server: RunningServer,
) -> None:
    """The blocking client retries a lost RecordUsage answer the same way: one record."""
    async with CuttingProxy(pagemeter_server.port) as proxy:

        def worker() -> tuple[quota_pb2.RecordUsageResponse, quota_pb2.GetUsageResponse]:
            with PagemeterClient(proxy.target, initial_backoff=0.05) as sdk:
                sdk.set_plan(eagle_plan())
                proxy.lose_next_answer()
                return sdk.record_usage("acme", "job-9", {"pages": 3}), sdk.get_usage("acme")

        result, usage = await asyncio.to_thread(worker)
    assert proxy.cuts == 1 and result.duplicate
    assert figures(usage, "pages").committed == 3


# -- deadlines ----------------------------------------------------------------------------


async def test_every_call_has_the_clients_deadline(connect: Connect, silent_target: str) -> None:
    """A server that never answers makes the call fail with DEADLINE_EXCEEDED after the client's timeout."""
    async with connect(silent_target, timeout=0.3) as sdk:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            await sdk.get_usage("acme")
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


async def test_a_call_can_override_the_deadline(connect: Connect, silent_target: str) -> None:
    """timeout= on one call replaces the client's deadline for that call."""
    async with connect(silent_target, timeout=60) as sdk:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            await sdk.check_quota("acme", {"pages": 1}, timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


async def test_sync_client_deadline(silent_target: str) -> None:
    """The blocking client raises a DEADLINE_EXCEEDED RpcError when the deadline passes."""

    def call() -> grpc.StatusCode:
        with PagemeterClient(silent_target, timeout=0.3) as sdk:
            try:
                sdk.record_usage("acme", "job-1", {"pages": 1})
            except grpc.RpcError as error:
                return error_details(error).code
        raise AssertionError("the call returned")

    assert await asyncio.to_thread(call) == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.usefixtures("plans_migrated")
async def test_quota_denied_by_a_window_says_which_and_when_to_retry(
    client: AsyncPagemeterClient, pagemeter_server: RunningServer
) -> None:
    """Past a per-minute window, QuotaDenied names the window and retry_after is the time to its reset."""
    pagemeter_server.clock.set(START_MS + 15_000)  # 15 s into a minute
    await client.set_plan(
        plan_pb2.Plan(
            org_id="acme",
            name="Burst",
            metrics=[
                plan_pb2.MetricLimits(
                    metric="pages",
                    windows=[plan_pb2.WindowLimit(window=plan_pb2.WINDOW_MINUTE, limit=10)],
                )
            ],
        )
    )
    with pytest.raises(QuotaDenied) as denied:
        async with client.reserve("acme", {"pages": 11}):
            pass
    assert denied.value.retry_after is None, "11 never fit a window of 10"
    async with client.reserve("acme", {"pages": 6}):
        pass
    with pytest.raises(QuotaDenied) as denied:
        async with client.reserve("acme", {"pages": 5}):
            pass
    assert str(denied.value) == (
        "quota denied: WINDOW_LIMIT_EXCEEDED (pages: WINDOW_LIMIT_EXCEEDED (per minute), "
        "requested 5, max admissible 4), retry after 45s"
    )
    assert denied.value.retry_after == timedelta(seconds=45)
    assert window_name(denied.value.response.metrics[0].denied_by) == "minute"


@pytest.mark.usefixtures("plans_migrated")
async def test_a_plan_with_a_billing_anchor_round_trips(client: AsyncPagemeterClient) -> None:
    """billing_anchor and billing_interval go through set_plan and come back from
    get_plan and list_plans; usage then reads the anchored period."""
    plan = plan_pb2.Plan(
        org_id="globex",
        name="Annual",
        timezone="Europe/Berlin",
        billing_interval=plan_pb2.BILLING_INTERVAL_YEAR,
        metrics=[plan_pb2.MetricLimits(metric="pages", contract_quota=24_000)],
    )
    plan.billing_anchor.FromDatetime(datetime(2025, 6, 1, 9, 30, tzinfo=ZoneInfo("Europe/Berlin")))
    stored = (await client.set_plan(plan)).plan
    assert stored.billing_anchor.ToJsonString() == "2025-06-01T07:30:00Z"
    assert stored.billing_interval == plan_pb2.BILLING_INTERVAL_YEAR
    got = (await client.get_plan("globex")).plan
    assert (got.billing_anchor, got.billing_interval) == (
        stored.billing_anchor,
        stored.billing_interval,
    )
    listed = {p.org_id: p for p in (await client.list_plans()).plans}["globex"]
    assert listed.billing_anchor == stored.billing_anchor
    # On 2026-03-15 the yearly period in progress began 2025-06-01 at 09:30 Berlin time.
    assert (await client.get_usage("globex")).period_id == "2025-06-01"
