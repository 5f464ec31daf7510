"""Webhook delivery end to end: `pagemeter-server dispatch` processes deliver the
events a real server wrote to a real HTTP receiver on loopback, which verifies
every request with the `standardwebhooks` library. Receivers go down and come
back, dispatchers are SIGKILLed, two share the work, a cluster spreads the
organizations over its primaries, secrets rotate, events are dead-lettered and
replayed; nothing is lost, and a duplicate always carries its first webhook-id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from pagemeter.v1 import admin_pb2, quota_pb2, webhooks_pb2, webhooks_pb2_grpc
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import RedisProcess, free_port
from pagemeter_server.settings import Settings
from pagemeter_server.store.keys import OrgKeys
from server_process import SERVER, ServerProcess
from tests.conftest import RunningServer, eagle_plan, serving

FAST = [
    "--webhook-lease-seconds",
    "2",
    "--webhook-poll-interval",
    "0.05",
    "--webhook-backoff-seconds",
    "0.1",
    "--webhook-backoff-max-seconds",
    "0.5",
    "--webhook-timeout",
    "3",
    "--webhook-scan-interval",
    "5",
]


@dataclass
class Received:
    webhook_id: str
    body: bytes
    event: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1 that verifies every request with each secret in
    `secrets` (all must verify) and records what it accepted."""

    secrets: list[str]
    port: int = field(default_factory=free_port)
    delay: float = 0.0
    # Answer this status instead of taking the event (None: take it).
    refuse_with: int | None = None
    got: list[Received] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError as exc:
                self.unverified.append(f"{headers.get('webhook-id')}: {exc}")
                return web.Response(status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse_with is not None:
            return web.Response(status=self.refuse_with)
        self.got.append(Received(headers["webhook-id"], body, json.loads(body), headers))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> list[str]:
        return [r.webhook_id for r in self.got]

    def first_seen(self) -> list[str]:
        """Ids in the order they first arrived."""
        return list(dict.fromkeys(self.ids()))


def dispatcher(redis_url: str, folder: Path, name: str, *extra: str) -> ServerProcess:
    return ServerProcess(
        [str(SERVER), "dispatch", "--redis-url", redis_url, "--metrics-listen", "", *FAST, *extra],
        folder / f"{name}.log",
        target="",
        name=name,
    )


def wait_for_log(process: ServerProcess, text: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in process.log_text():
            return
        assert process.running(), process.log_tail()
        time.sleep(0.05)
    raise AssertionError(f"{process.name} never logged {text!r}:\n{process.log_tail()}")


@contextlib.contextmanager
def running(*processes: ServerProcess) -> Iterator[None]:
    try:
        for process in processes:
            process.start()
        for process in processes:
            wait_for_log(process, "dispatcher")
        yield
    finally:
        for process in processes:
            code = process.stop()
            if code is not None and code not in (0, -9):
                raise AssertionError(f"{process.name} exited {code}:\n{process.log_tail()}")
            assert "Traceback" not in process.log_text(), process.log_text()


async def until(check: Callable[[], bool], seconds: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


def stream_ids(client: redis.Redis | redis.RedisCluster, org: str, kind: str = "") -> list[str]:
    """The ids of the organization's events (of one type), in stream order."""
    entries = cast(list[tuple[str, dict[str, str]]], client.xrange(OrgKeys(org).events))
    return [f"{org}:{entry_id}" for entry_id, f in entries if not kind or f["type"] == kind]


async def record_jobs(server: RunningServer, org: str, count: int, prefix: str = "job") -> None:
    for number in range(count):
        await server.quota.RecordUsage(
            quota_pb2.RecordUsageRequest(
                org_id=org, request_id=f"{prefix}-{number}", units={"pages": 1}
            )
        )


def webhooks_stub(server: RunningServer) -> webhooks_pb2_grpc.WebhookServiceAsyncStub:
    return webhooks_pb2_grpc.WebhookServiceStub(server.channel)


async def create_endpoint(
    server: RunningServer, url: str, org: str = "", types: tuple[str, ...] = ()
) -> webhooks_pb2.CreateWebhookEndpointResponse:
    return await webhooks_stub(server).CreateWebhookEndpoint(
        webhooks_pb2.CreateWebhookEndpointRequest(org_id=org, url=url, event_types=list(types))
    )


def assert_none_lost_in_order(receiver: Receiver, expected: list[str]) -> None:
    """Every expected event arrived, first arrivals in stream order, duplicates only
    as the same webhook-id with the same body, and nothing unexpected."""
    assert not receiver.unverified, receiver.unverified
    assert set(receiver.ids()) == set(expected)
    assert receiver.first_seen() == expected
    bodies: dict[str, bytes] = {}
    for got in receiver.got:
        assert bodies.setdefault(got.webhook_id, got.body) == got.body
        assert got.event["id"] == got.webhook_id


@pytest.fixture
async def store_url(redis_sync: redis.Redis, redis_server: RedisProcess) -> str:
    return redis_server.url


@pytest.fixture
async def server(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[RunningServer]:
    async with serving(settings, redis_client, clock) as running_server:
        for org in ("acme", "globex"):
            await running_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org)))
        yield running_server


async def test_a_receiver_down_for_a_while_then_back_gets_every_event_in_order(
    server: RunningServer, store_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    """Connection refused for a few seconds: retried with backoff, then all delivered."""
    receiver = Receiver(secrets=[])
    created = await create_endpoint(server, receiver.url, org="acme")
    receiver.secrets = [created.secret]
    start_ms = created.endpoint.created_at.ToMilliseconds()
    with running(dispatcher(store_url, tmp_path, "dispatcher-1")):
        await record_jobs(server, "acme", 15)
        await asyncio.sleep(2.0)  # down: every attempt is refused
        await receiver.start()
        try:
            await record_jobs(server, "acme", 5, prefix="late")
            expected = stream_ids(redis_sync, "acme")
            assert len(expected) == 21, "the plan, then the jobs after the endpoint"
            expected = expected[1:]
            await until(lambda: set(receiver.ids()) >= set(expected), what="every event")
            await asyncio.sleep(0.5)  # nothing more arrives
        finally:
            await receiver.stop()
    assert start_ms > 0
    assert_none_lost_in_order(receiver, expected)
    log = await webhooks_stub(server).ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(
            endpoint_id=created.endpoint.endpoint_id, page_size=1000
        )
    )
    outcomes = {d.outcome for d in log.deliveries}
    assert outcomes == {"delivered", "failed"}, outcomes
    assert any(d.attempt > 1 and d.outcome == "delivered" for d in log.deliveries)


async def test_a_dispatcher_killed_mid_delivery_loses_nothing(
    server: RunningServer, store_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL while a slow receiver holds a request: a second dispatcher takes the
    partition over when the lease expires and delivers the rest from the cursor."""
    receiver = Receiver(secrets=[], delay=0.15)
    created = await create_endpoint(server, receiver.url)
    receiver.secrets = [created.secret]
    await receiver.start()
    first = dispatcher(store_url, tmp_path, "dispatcher-1")
    second = dispatcher(store_url, tmp_path, "dispatcher-2")
    try:
        with running(first):
            await record_jobs(server, "acme", 30)
            await record_jobs(server, "globex", 10)
            await until(lambda: len(receiver.got) >= 8, what="some deliveries")
            first.kill()
        delivered_before = len(set(receiver.ids()))
        with running(second):
            expected_acme = stream_ids(redis_sync, "acme")
            expected_globex = stream_ids(redis_sync, "globex")
            # The plan changes came before the endpoint; the jobs after it.
            expected_acme = expected_acme[-30:]
            expected_globex = expected_globex[-10:]
            await until(
                lambda: set(receiver.ids()) >= set(expected_acme + expected_globex),
                what="every event after the kill",
            )
    finally:
        await receiver.stop()
    assert delivered_before < 40
    got = receiver.first_seen()
    assert [i for i in got if i.startswith("acme:")] == expected_acme
    assert [i for i in got if i.startswith("globex:")] == expected_globex
    assert not receiver.unverified
    assert set(receiver.ids()) == set(expected_acme + expected_globex)


async def test_two_dispatchers_share_the_work_and_deliver_each_event_once(
    server: RunningServer, store_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    """Both hold leases; every event of twelve organizations arrives exactly once."""
    receiver = Receiver(secrets=[])
    created = await create_endpoint(server, receiver.url, types=("usage.recorded",))
    receiver.secrets = [created.secret]
    await receiver.start()
    orgs = [f"org-{n}" for n in range(12)]
    try:
        with running(
            dispatcher(store_url, tmp_path, "dispatcher-1"),
            dispatcher(store_url, tmp_path, "dispatcher-2"),
        ):

            def owners() -> set[str]:
                keys = redis_sync.keys("pm:wh:lease:*")
                return {str(redis_sync.get(key)) for key in keys} if len(keys) == 64 else set()

            await until(lambda: len(owners()) == 2, what="both dispatchers holding leases")
            for org in orgs:
                await record_jobs(server, org, 5)
            expected = [i for org in orgs for i in stream_ids(redis_sync, org, "usage.recorded")]
            assert len(expected) == 60
            await until(lambda: set(receiver.ids()) >= set(expected), what="every event")
            await asyncio.sleep(0.5)
    finally:
        await receiver.stop()
    assert sorted(receiver.ids()) == sorted(expected), "each event exactly once"
    assert not receiver.unverified


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    server: RunningServer, store_url: str, tmp_path: Path
) -> None:
    """During the overlap each request verifies with the old and with the new secret;
    after it, with the new one only."""
    receiver = Receiver(secrets=[])
    created = await create_endpoint(server, receiver.url, org="acme")
    old = created.secret
    rotated = await webhooks_stub(server).RotateWebhookSecret(
        webhooks_pb2.RotateWebhookSecretRequest(
            endpoint_id=created.endpoint.endpoint_id, overlap_seconds=3
        )
    )
    new = rotated.secret
    assert new != old
    assert len(rotated.endpoint.secrets) == 2
    receiver.secrets = [old, new]
    await receiver.start()
    try:
        with running(dispatcher(store_url, tmp_path, "dispatcher-1")):
            await record_jobs(server, "acme", 2)
            await until(lambda: len(set(receiver.ids())) == 2, what="events in the overlap")
            await asyncio.sleep(3.2)  # the overlap is over
            receiver.secrets = [new]
            await record_jobs(server, "acme", 1, prefix="after")
            await until(lambda: len(set(receiver.ids())) == 3, what="the event after it")
            assert not receiver.unverified
            last = receiver.got[-1]
            with pytest.raises(WebhookVerificationError):
                Webhook(old).verify(last.body, last.headers)
    finally:
        await receiver.stop()


async def test_events_past_the_retry_window_are_dead_lettered_then_replayed(
    server: RunningServer, store_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    """A receiver answering 500 for longer than --webhook-retry-hours: the events are
    dead-lettered (listed, counted in the log) and later ones still flow; a replay
    of one dead letter and of a time range brings them with their webhook-ids."""
    receiver = Receiver(secrets=[], refuse_with=500)
    created = await create_endpoint(server, receiver.url, org="acme")
    endpoint_id = created.endpoint.endpoint_id
    receiver.secrets = [created.secret]
    await receiver.start()
    stub = webhooks_stub(server)
    try:
        # 0.0005 hours: 1.8 s of retries.
        with running(
            dispatcher(store_url, tmp_path, "dispatcher-1", "--webhook-retry-hours", "0.0005")
        ):
            await record_jobs(server, "acme", 2)
            lost = stream_ids(redis_sync, "acme")[-2:]

            async def dead() -> list[str]:
                answer = await stub.ListWebhookDeadLetters(
                    webhooks_pb2.ListWebhookDeadLettersRequest(endpoint_id=endpoint_id)
                )
                return [d.event_id for d in answer.dead_letters]

            deadline = time.monotonic() + 20
            while sorted(await dead()) != sorted(lost):
                assert time.monotonic() < deadline, await dead()
                await asyncio.sleep(0.1)
            receiver.refuse_with = None
            await record_jobs(server, "acme", 1, prefix="after")
            after = stream_ids(redis_sync, "acme")[-1]
            await until(lambda: receiver.ids() == [after], what="the next event")

            await stub.ReplayWebhookEvents(
                webhooks_pb2.ReplayWebhookEventsRequest(endpoint_id=endpoint_id, event_id=lost[0])
            )
            await until(lambda: receiver.ids() == [after, lost[0]], what="the replayed event")
            start, end = Timestamp(), Timestamp()
            start.FromMilliseconds(int(lost[0].split(":")[1].split("-")[0]))
            end.FromMilliseconds(int(after.split(":")[1].split("-")[0]))
            await stub.ReplayWebhookEvents(
                webhooks_pb2.ReplayWebhookEventsRequest(
                    endpoint_id=endpoint_id, start_time=start, end_time=end
                )
            )
            await until(lambda: len(receiver.got) == 5, what="the replayed range")
            assert receiver.ids()[2:] == [*lost, after]
            assert not redis_sync.hlen(OrgKeys("acme").prefix + "whreplays")
    finally:
        await receiver.stop()
    log = await stub.ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id, page_size=1000)
    )
    assert sum(d.outcome == "dead_letter" for d in log.deliveries) == 2
    assert sum(d.replay for d in log.deliveries) == 4


@pytest.mark.parametrize("backend", ["cluster"], indirect=True)
async def test_events_of_orgs_on_different_primaries_are_all_delivered(
    server: RunningServer,
    settings: Settings,
    redis_cluster: list[RedisProcess],
    tmp_path: Path,
) -> None:
    """A Redis Cluster: organizations on each of the three primaries, one dispatcher."""
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster[0].port, decode_responses=True)
    orgs = ["acme", "globex", "initech", "umbrella", "hooli", "stark"]
    slots_by_node = {
        str(client.get_node_from_key(OrgKeys(org).events).name)  # type: ignore[no-untyped-call]
        for org in orgs
    }
    assert len(slots_by_node) == 3, "the organizations cover every primary"
    receiver = Receiver(secrets=[])
    created = await create_endpoint(server, receiver.url, types=("usage.recorded",))
    receiver.secrets = [created.secret]
    await receiver.start()
    try:
        with running(
            dispatcher(redis_cluster[0].url, tmp_path, "dispatcher-1", "--redis-mode", "cluster")
        ):
            for org in orgs:
                await record_jobs(server, org, 4)
            expected = [i for org in orgs for i in stream_ids(client, org, "usage.recorded")]
            assert len(expected) == 24
            await until(lambda: set(receiver.ids()) >= set(expected), what="every event")
    finally:
        await receiver.stop()
        client.close()
    for org in orgs:
        assert [i for i in receiver.first_seen() if i.startswith(org + ":")] == [
            i for i in expected if i.startswith(org + ":")
        ]
    assert not receiver.unverified
