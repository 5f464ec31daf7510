"""The pipelined Redis connection (store/coalesce.py, decision 50), from outside.

Between the store and a real Redis sits a TCP proxy that can hold Redis's
replies back and cut connections, so that what happens to calls in flight when
Redis stalls, restarts or is failed over is provoked on purpose, not hoped for.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions

from pagemeter_server.domain.decisions import CheckCall
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.settings import Settings
from pagemeter_server.store.coalesce import PipelinedScripts, encode_command
from pagemeter_server.store.connections import connect_redis
from pagemeter_server.store.faults import is_transient
from pagemeter_server.store.quota import Store
from tests.conftest import START_MS, metric_limits
from tests.rules.test_rules_lua import set_plan

ECHO = "return ARGV[1]"


class RedisProxy:
    """Forwards a Redis connection both ways; can hold replies back and cut connections."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.replies_flowing = asyncio.Event()
        self.replies_flowing.set()
        self.requests: list[list[bytes]] = []  # per connection: the chunks the client wrote
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        """Close every connection through the proxy now, both sides."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def requested_bytes(self) -> bytes:
        return b"".join(b"".join(chunks) for chunks in self.requests)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [client_w, server_w]
        chunks: list[bytes] = []
        self.requests.append(chunks)
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w, chunks, hold=False)),
            asyncio.create_task(self._pump(server_r, client_w, None, hold=True)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        chunks: list[bytes] | None,
        *,
        hold: bool,
    ) -> None:
        try:
            while data := await source.read(65536):
                if chunks is not None:
                    chunks.append(data)
                if hold:
                    await self.replies_flowing.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.transport.abort()


def proxied_settings(proxy: RedisProxy, timeout: float = 2.0) -> Settings:
    return Settings(
        redis_url=proxy.url,
        listen="127.0.0.1:0",
        metrics_listen="",
        dev_open_access=True,
        redis_timeout_seconds=timeout,
    )


@pytest.fixture
async def proxy(redis_server: RedisProcess) -> AsyncIterator[RedisProxy]:
    async with RedisProxy(redis_server.port) as running:
        yield running


def piped_store(client: aioredis.Redis) -> Store:
    return Store(
        client,
        default_timezone="UTC",
        record_retention_days=40,
        usage_retention_days=400,
        coalesce=True,
    )


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.005)


async def test_concurrent_calls_leave_on_one_connection_in_few_writes(
    proxy: RedisProxy, redis_sync: redis.Redis
) -> None:
    """200 concurrent checks go out on one connection, in far fewer writes than calls,
    and each is counted: the holds placed are exactly the admitted ones."""
    client = connect_redis(proxy.url, proxied_settings(proxy))
    try:
        store = piped_store(client)
        await set_plan(store, metric_limits("pages", contract_quota=150, overage_allowed=False))
        await store.check("other", CheckCall({"pages": 1}), now_ms=START_MS)  # scripts loaded
        [connection] = [chunks for chunks in proxy.requests if b"EVALSHA" in b"".join(chunks)]
        connections, written = len(proxy.requests), len(connection)
        results = await asyncio.gather(
            *(
                store.check(
                    "acme",
                    CheckCall({"pages": 1}, request_id=f"j{i}", hold=True, hold_ttl_ms=60_000),
                    now_ms=START_MS,
                )
                for i in range(200)
            )
        )
        assert sum(r.allowed for r in results) == 150
        assert redis_sync.hget("pm:{acme}:held", "h:pages") == "150"
        assert len(proxy.requests) == connections, "the calls opened new connections"
        writes = connection[written:]
        assert b"".join(writes).count(b"EVALSHA") == 200
        assert len(writes) < 50, f"{len(writes)} writes for 200 calls"
    finally:
        await client.aclose()


async def test_calls_in_flight_on_a_cut_connection_are_sent_again_and_counted_once(
    proxy: RedisProxy, redis_sync: redis.Redis
) -> None:
    """Redis ran the calls but the connection died before their replies came back
    (a restart, a failover): each call is sent once more through redis-py's path and
    answered; the holds, idempotent by request id, are each counted once."""
    client = connect_redis(proxy.url, proxied_settings(proxy))
    try:
        store = piped_store(client)
        await set_plan(store, metric_limits("pages", contract_quota=1000, overage_allowed=False))
        proxy.replies_flowing.clear()
        calls = [
            asyncio.ensure_future(
                store.check(
                    "acme",
                    CheckCall({"pages": 2}, request_id=f"cut{i}", hold=True, hold_ttl_ms=60_000),
                    now_ms=START_MS,
                )
            )
            for i in range(40)
        ]
        await wait_until(lambda: proxy.requested_bytes().count(b"cut") >= 40)
        # Redis has run them all (its replies are held back by the proxy).
        await wait_until(lambda: redis_sync.hget("pm:{acme}:held", "h:pages") == "80")
        proxy.cut()
        proxy.replies_flowing.set()
        results = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert all(r.allowed and r.held for r in results)
        assert redis_sync.hget("pm:{acme}:held", "h:pages") == "80"
        # And the next calls work, on a new connection.
        again = await store.check(
            "acme",
            CheckCall({"pages": 2}, request_id="after", hold=True, hold_ttl_ms=60_000),
            now_ms=START_MS,
        )
        assert again.allowed and not again.duplicate
    finally:
        await client.aclose()


async def test_a_stalled_redis_fails_every_call_in_flight_within_the_timeout(
    proxy: RedisProxy,
) -> None:
    """No reply within --redis-timeout: every call in flight fails with TimeoutError
    (not retried: a stalled Redis must fail fast) and the next call, once Redis answers
    again, succeeds on a new connection."""
    client = connect_redis(proxy.url, proxied_settings(proxy, timeout=0.5))
    try:
        piped = PipelinedScripts(client)
        echo = client.register_script(ECHO)
        assert await piped.call(echo, [], ["warm"]) == "warm"
        proxy.replies_flowing.clear()
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(piped.call(echo, [], [str(i)]) for i in range(10)), return_exceptions=True
        )
        waited = time.monotonic() - started
        assert all(isinstance(o, redis.exceptions.TimeoutError) for o in outcomes), outcomes
        assert 0.4 <= waited < 1.6, waited
        proxy.replies_flowing.set()
        assert await piped.call(echo, [], ["later"]) == "later"
    finally:
        await client.aclose()


async def test_cancelled_callers_leave_every_other_reply_with_its_own_caller(
    redis_client: aioredis.Redis,
) -> None:
    """Replies come back in order; callers cancelled at random points in between must
    not shift them: every caller that stays gets its own value, in 30 random rounds."""
    piped = PipelinedScripts(redis_client)
    echo = redis_client.register_script(ECHO)
    rng = random.Random(18)
    for round_ in range(30):
        calls = [asyncio.ensure_future(piped.call(echo, [], [f"{round_}:{i}"])) for i in range(50)]
        if rng.random() < 0.5:
            await asyncio.sleep(0)  # cancel some after they were written, some before
        cancelled = {i for i in range(50) if rng.random() < 0.3}
        for i in cancelled:
            calls[i].cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            if i in cancelled:
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert outcome == f"{round_}:{i}"
    assert await piped.call(echo, [], ["last"]) == "last"


async def test_an_error_reply_fails_only_its_own_call(redis_client: aioredis.Redis) -> None:
    """A script error is raised as redis-py raises it, to its caller alone."""
    piped = PipelinedScripts(redis_client)
    echo = redis_client.register_script(ECHO)
    failing = redis_client.register_script("return redis.error_reply('ERR no such thing')")
    nested = redis_client.register_script("return {1, redis.error_reply('ERR inside')}")
    outcomes = await asyncio.gather(
        piped.call(echo, [], ["a"]),
        piped.call(failing, [], []),
        piped.call(echo, [], ["b"]),
        piped.call(nested, [], []),
        return_exceptions=True,
    )
    assert outcomes[0] == "a" and outcomes[2] == "b"
    assert isinstance(outcomes[1], redis.exceptions.ResponseError)
    assert "no such thing" in str(outcomes[1])
    direct = await nested(keys=[], args=[])  # as redis-py's own path returns it
    inside = outcomes[3]
    assert isinstance(inside, list) and isinstance(direct, list)
    assert inside[0] == direct[0] == 1
    assert isinstance(inside[1], redis.exceptions.ResponseError)


async def test_a_demoted_primary_is_left_for_a_new_connection(tmp_path: Path) -> None:
    """READONLY (the primary became a replica in a failover): the call fails as on
    redis-py's path, and the connection is dropped, so that once a writable primary
    is back the next call succeeds on a new connection."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        settings = Settings(redis_url=server.url, redis_timeout_seconds=2.0)
        client = connect_redis(server.url, settings)
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            piped = PipelinedScripts(client)
            writer = client.register_script("return redis.call('INCR', KEYS[1])")
            assert await piped.call(writer, ["n"], []) == 1
            first = {c["id"] for c in admin.client_list() if c["cmd"] == "evalsha"}
            admin.replicaof("127.0.0.1", "1")  # a replica of nothing: read-only
            # Redis 7 answers READONLY; Redis 6 wraps it in its script error. Either
            # way the call fails as transient (UNAVAILABLE, never INTERNAL).
            with pytest.raises(redis.exceptions.ResponseError) as refused:
                await piped.call(writer, ["n"], [])
            assert is_transient(refused.value), refused.value
            admin.replicaof("NO", "ONE")
            assert await piped.call(writer, ["n"], []) == 2
            now = {c["id"] for c in admin.client_list() if c["cmd"] == "evalsha"}
            assert now and not now & first
        finally:
            admin.close()
            await client.aclose()
    finally:
        server.stop()


async def test_closing_the_client_closes_the_pipelined_connection(
    redis_server: RedisProcess, redis_sync: redis.Redis
) -> None:
    """Closing the client (server shutdown) closes its pipelined connection at once."""
    client = connect_redis(redis_server.url, Settings(redis_url=redis_server.url))
    piped = PipelinedScripts(client)
    echo = client.register_script(ECHO)
    assert await piped.call(echo, [], ["x"]) == "x"
    before = len(redis_sync.client_list())
    await asyncio.wait_for(client.aclose(), 2)
    await wait_until(lambda: len(redis_sync.client_list()) < before)


async def test_a_script_missing_after_a_restart_is_loaded_once_for_all_its_callers(
    redis_client: aioredis.Redis, redis_sync: redis.Redis
) -> None:
    """After SCRIPT FLUSH (what a Redis restart does), 100 concurrent calls that all
    find their script missing load it once between them, and all succeed."""
    piped = PipelinedScripts(redis_client)
    echo = redis_client.register_script(ECHO + " -- loaded once")
    assert await piped.call(echo, [], ["warm"]) == "warm"
    redis_sync.script_flush()

    def loads() -> int:
        stats = redis_sync.info("commandstats")
        # Redis 7 counts SCRIPT LOAD apart; Redis 6 counts every SCRIPT subcommand
        # together (only loads happen between the two readings).
        counted = stats.get("cmdstat_script|load") or stats.get("cmdstat_script") or {}
        return int(counted.get("calls", 0))

    before = loads()
    outcomes = await asyncio.gather(*(piped.call(echo, [], [str(i)]) for i in range(100)))
    assert outcomes == [str(i) for i in range(100)]
    assert loads() - before == 1


async def test_messages_redis_pushes_unasked_are_not_taken_for_replies(
    redis_client: aioredis.Redis, redis_sync: redis.Redis
) -> None:
    """redis-py speaks RESP3, in which Redis may push messages nobody asked for (here:
    client-side caching invalidations, provoked on purpose); they must not be handed
    to a caller as its reply."""
    piped = PipelinedScripts(redis_client)
    reader = redis_client.register_script("return redis.call('GET', KEYS[1]) or 'none'")
    assert await piped.call(reader, ["pushed"], []) == "none"
    connection = piped._connection
    assert connection is not None
    assert await connection.send(encode_command("CLIENT", "TRACKING", "ON")) == "OK"
    for round_ in range(5):
        assert await piped.call(reader, ["pushed"], []) == (str(round_ - 1) if round_ else "none")
        redis_sync.set("pushed", str(round_))  # an invalidation is pushed to the connection
        await asyncio.sleep(0.02)
    outcomes = await asyncio.gather(*(piped.call(reader, ["pushed"], []) for _ in range(20)))
    assert outcomes == ["4"] * 20
    assert piped._connection is connection
