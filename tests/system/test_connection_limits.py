"""Connection and stream limits of a real `pagemeter-server` process.

Each test starts the console command (embedded store, free loopback ports) and
floods it from this process: raw HTTP/2 connections that ignore the server's
SETTINGS (as an attacker's client would) and gRPC Watch streams. Memory is the
server process's RSS read with psutil, compared within one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from pagemeter_server.ops.embedded import free_port
from pagemeter_server.ops.limits import MemoryReturner, start_metrics_server
from pagemeter_server.settings import Settings, parse_settings

SERVER_COMMAND = Path(sys.executable).parent / "pagemeter-server"
STARTUP_DEADLINE_SECONDS = 20.0
MIB = 1024 * 1024

# -- a raw HTTP/2 client ------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM = 0x7
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
WATCH = "/grpc.health.v1.Health/Watch"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def literal_header(name: str, value: str) -> bytes:
    """HPACK literal without indexing, new name, no Huffman (names and values < 127 bytes)."""
    raw_name, raw_value = name.encode(), value.encode()
    return b"\x00" + bytes([len(raw_name)]) + raw_name + bytes([len(raw_value)]) + raw_value


class RawConnection:
    """One HTTP/2 connection that opens streams without waiting for the server's leave."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)
        self.pending = PREFACE + frame(SETTINGS, 0, 0)
        self.buffer = b""
        self.next_stream = 1
        self.settings: dict[int, int] = {}
        self.reset: dict[int, int] = {}
        self.answered: set[int] = set()
        self.goaway: bytes | None = None
        self.closed = False

    def open_streams(self, count: int, path: str, message: bytes | None = None) -> None:
        """Queue `count` new streams (HEADERS, and a gRPC message that ends the stream if given)."""
        block = b"".join(
            literal_header(name, value)
            for name, value in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "pagemeter"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        out = [self.pending]
        for _ in range(count):
            stream, self.next_stream = self.next_stream, self.next_stream + 2
            out.append(frame(HEADERS, END_HEADERS, stream, block))
            if message is not None:
                body = b"\x00" + struct.pack(">I", len(message)) + message
                out.append(frame(DATA, END_STREAM, stream, body))
        self.pending = b"".join(out)

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except OSError:
            self.closed = True
            return
        self.pending = self.pending[sent:]

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            kind, flags = self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
            if kind == SETTINGS and not flags & ACK:
                for at in range(0, len(payload), 6):
                    key, value = struct.unpack(">HI", payload[at : at + 6])
                    self.settings[key] = value
                self.pending += frame(SETTINGS, ACK, 0)
            elif kind == PING and not flags & ACK:
                self.pending += frame(PING, ACK, 0, payload)
            elif kind == RST_STREAM:
                self.reset[stream] = int.from_bytes(payload, "big")
            elif kind == HEADERS:
                self.answered.add(stream)
            elif kind == GOAWAY:
                self.goaway = payload[8:]

    def close(self) -> None:
        self.sock.close()


def pump(connections: list[RawConnection], seconds: float) -> None:
    """Send what each connection has queued and read what the server says, for `seconds`."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        while time.monotonic() < deadline:
            live = [c for c in connections if not c.closed]
            if not live:
                return
            for connection in live:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.pending else 0)
                selector.register(connection, events)
            for key, events in selector.select(max(0.0, deadline - time.monotonic())):
                ready = key.fileobj
                assert isinstance(ready, RawConnection)
                connection = ready
                if events & selectors.EVENT_WRITE:
                    connection.on_writable()
                if events & selectors.EVENT_READ:
                    connection.on_readable()
            for connection in live:
                selector.unregister(connection)


# -- the server process -------------------------------------------------------------------


class Server:
    """One `pagemeter-server` on free loopback ports with its own embedded store."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp_path / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(SERVER_COMMAND),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--metrics-listen",
                    f"127.0.0.1:{self.metrics_port}",
                    "--http-listen",
                    "",
                    "--data-dir",
                    str(tmp_path / "data"),
                    "--dev-open-access",
                    "--log-level",
                    "WARNING",
                    *flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.children: list[psutil.Process] = []
        deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"pagemeter-server exited during start-up:\n{self.log()}")
            with contextlib.suppress(grpc.RpcError):
                if self.check() == health_pb2.HealthCheckResponse.SERVING:
                    self.children = psutil.Process(self.process.pid).children(recursive=True)
                    return
            time.sleep(0.05)
        pytest.fail(f"pagemeter-server did not serve within {STARTUP_DEADLINE_SECONDS}s")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check(self) -> int:
        """One health Check on a fresh channel: the status, or grpc.RpcError."""
        with grpc.insecure_channel(self.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
            return int(reply.status)

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        for child in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


class Launch(Protocol):
    def __call__(self, *flags: str) -> Server: ...


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start servers with extra flags; every one is killed, with its store, at the end."""
    servers: list[Server] = []

    def _launch(*flags: str) -> Server:
        server = Server(tmp_path / str(len(servers)), *flags)
        servers.append(server)
        return server

    yield _launch
    for server in servers:
        server.stop()


async def open_watches(
    target: str, count: int, channels: int
) -> tuple[list[grpc.aio.Channel], list[grpc.aio.UnaryStreamCall[Any, Any]], dict[str, int]]:
    """Open `count` health Watch streams over `channels` connections; what each first answered."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    calls = [
        health_pb2_grpc.HealthStub(opened[i % channels]).Watch(health_pb2.HealthCheckRequest())
        for i in range(count)
    ]

    async def first(call: grpc.aio.UnaryStreamCall[Any, Any]) -> str:
        try:
            reply: health_pb2.HealthCheckResponse = await asyncio.wait_for(call.read(), 10)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        except TimeoutError:
            return "no answer"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    answers: dict[str, int] = {}
    for answer in await asyncio.gather(*(first(call) for call in calls)):
        answers[answer] = answers.get(answer, 0) + 1
    return opened, calls, answers


async def close_all(
    channels: list[grpc.aio.Channel], calls: list[grpc.aio.UnaryStreamCall[Any, Any]]
) -> None:
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close(None)


# -- memory ---------------------------------------------------------------------------------


async def test_memory_returns_after_a_flood_of_streams_and_watches(launch: Launch) -> None:
    """A flood of 12,000 raw HTTP/2 streams and 2,000 health Watch streams raises the server's RSS by a bounded amount, and the RSS comes back within a few seconds of the flood closing."""
    server = launch()
    for _ in range(20):  # warm up the ordinary path
        server.check()
    before = server.rss()

    raw = [RawConnection(server.port) for _ in range(60)]
    for connection in raw:
        connection.open_streams(200, REFLECTION)
    pump(raw, 2.0)
    channels, calls, answers = await open_watches(server.target, 2000, channels=20)
    pump(raw, 0.5)
    during = server.rss()
    for connection in raw:
        connection.close()
    await close_all(channels, calls)

    after = during
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and after > before + 30 * MIB:
        await asyncio.sleep(0.25)
        after = server.rss()
    summary = (
        f"RSS before {before / MIB:.0f} MiB, during {during / MIB:.0f} MiB, "
        f"after {after / MIB:.0f} MiB; Watch answers {answers}"
    )
    # Measured on a 2-core machine: unbounded, +111 MiB during the flood and
    # +108 MiB after it; bounded and trimmed, about +46 and +11.
    assert during - before < 90 * MIB, summary
    assert after - before < 30 * MIB, summary
    assert answers.get("SERVING", 0) <= 100, summary
    # The flood's calls leave the concurrent-call count as the server sees their
    # streams close, a moment after the client closed them: it serves again then.
    status: int | str = "never answered"
    deadline = time.monotonic() + 5
    while status != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
        try:
            status = server.check()
        except grpc.RpcError as error:
            status = str(error.code())
            await asyncio.sleep(0.1)
    assert status == health_pb2.HealthCheckResponse.SERVING, status


def test_memory_returner_gives_freed_malloc_memory_back() -> None:
    """MemoryReturner trims once the allocator holds 16 MiB more free memory, so RSS falls after large C allocations are freed."""
    returner = MemoryReturner(interval=0.05)
    if not returner.available:
        pytest.skip("not glibc: nothing to trim")
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    process = psutil.Process()
    # Many small blocks (below the mmap threshold), touched, so they live in
    # malloc's heap; keep one block at the end so the heap's top cannot shrink.
    blocks = [libc.malloc(4096) for _ in range(20_000)]
    for block in blocks:
        ctypes.memset(block, 1, 4096)
    keep = libc.malloc(64)
    grown = process.memory_info().rss
    returner.start()
    try:
        for block in blocks:
            libc.free(block)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and returner.trims == 0:
            time.sleep(0.05)
        returned = grown - process.memory_info().rss
    finally:
        returner.stop()
        libc.free(keep)
    assert returner.trims >= 1
    assert returned > 40 * MIB, f"only {returned / MIB:.1f} MiB returned"


# -- each limit -----------------------------------------------------------------------------


def test_stream_limit_is_advertised_and_extra_streams_are_refused(launch: Launch) -> None:
    """The server advertises --max-concurrent-streams in its HTTP/2 SETTINGS and refuses the streams a client opens beyond it with REFUSED_STREAM."""
    server = launch("--max-concurrent-streams", "20")
    connection = RawConnection(server.port)
    pump([connection], 0.3)  # the SETTINGS exchange: the client now knows the limit
    connection.open_streams(50, REFLECTION)
    pump([connection], 1.5)
    connection.close()
    assert connection.settings.get(SETTINGS_MAX_CONCURRENT_STREAMS) == 20
    refused = [s for s, code in connection.reset.items() if code == REFUSED_STREAM]
    assert len(refused) == 30, connection.reset


async def test_a_client_within_the_stream_limit_is_never_refused(launch: Launch) -> None:
    """A gRPC client keeping 300 calls going on one channel (it queues those beyond 100 streams) has none refused, round after round."""
    server = launch()
    failures: dict[str, int] = {}
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def one() -> None:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.aio.AioRpcError as exc:
                key = f"{exc.code().name}: {exc.details()}"
                failures[key] = failures.get(key, 0) + 1

        for _ in range(20):
            await asyncio.gather(*(one() for _ in range(300)))
    assert failures == {}


def test_default_stream_limit_is_advertised(launch: Launch) -> None:
    """With no flag the server advertises 100 concurrent streams per connection."""
    server = launch()
    connection = RawConnection(server.port)
    pump([connection], 0.5)
    connection.close()
    assert connection.settings.get(SETTINGS_MAX_CONCURRENT_STREAMS) == 100


def test_connections_beyond_the_limit_are_closed(launch: Launch) -> None:
    """With --max-connections 10, ten raw connections stay open and the others are closed at once; once they go, calls are served again."""
    server = launch("--max-connections", "10")
    time.sleep(0.5)  # the start-up health checks' connections are let go
    held = [RawConnection(server.port) for _ in range(10)]
    pump(held, 0.5)
    extra = [RawConnection(server.port) for _ in range(5)]
    pump(held + extra, 1.0)
    assert not any(c.closed for c in held)
    assert all(c.closed for c in extra)
    with pytest.raises(grpc.RpcError):
        server.check()
    for connection in held + extra:
        connection.close()
    time.sleep(0.3)
    assert server.check() == health_pb2.HealthCheckResponse.SERVING


def test_rpcs_beyond_the_limit_are_resource_exhausted(launch: Launch) -> None:
    """With --max-concurrent-rpcs 30, 30 idle streams take every slot: another call is RESOURCE_EXHAUSTED at once, and is served after they close."""
    server = launch("--max-concurrent-rpcs", "30", "--max-health-watchers", "5")
    connection = RawConnection(server.port)
    connection.open_streams(30, REFLECTION)
    pump([connection], 1.0)
    with pytest.raises(grpc.RpcError) as refused:
        server.check()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    connection.close()
    time.sleep(0.3)
    assert server.check() == health_pb2.HealthCheckResponse.SERVING


async def test_health_watch_streams_are_capped(launch: Launch) -> None:
    """With --max-health-watchers 5, five Watch streams are served, the sixth is RESOURCE_EXHAUSTED, Check still answers, and a Watch is served again after one ends."""
    server = launch("--max-health-watchers", "5")
    channels, calls, answers = await open_watches(server.target, 5, channels=1)
    assert answers == {"SERVING": 5}
    more_channels, more_calls, refused = await open_watches(server.target, 1, channels=1)
    assert refused == {"RESOURCE_EXHAUSTED": 1}
    assert server.check() == health_pb2.HealthCheckResponse.SERVING
    calls[0].cancel()
    await asyncio.sleep(0.3)
    again_channels, again_calls, again = await open_watches(server.target, 1, channels=1)
    assert again == {"SERVING": 1}
    await close_all(channels + more_channels + again_channels, calls + more_calls + again_calls)


async def test_health_watch_of_a_long_service_name_is_refused(launch: Launch) -> None:
    """A Watch naming a service of 100,000 characters is INVALID_ARGUMENT instead of a stream that keeps the name for its life."""
    server = launch()
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="x" * 100_000)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_idle_connection_is_closed(launch: Launch) -> None:
    """A connection without calls for --max-connection-idle seconds gets a GOAWAY and is closed."""
    server = launch("--max-connection-idle", "0.5")
    connection = RawConnection(server.port)
    pump([connection], 3.0)
    connection.close()
    assert connection.goaway is not None and connection.closed


async def test_old_connection_ends_its_streams_after_the_grace(launch: Launch) -> None:
    """A Watch stream on a connection older than --max-connection-age ends once --max-connection-age-grace has passed, freeing its slot."""
    server = launch("--max-connection-age", "1", "--max-connection-age-grace", "0.5")
    channels, calls, answers = await open_watches(server.target, 1, channels=1)
    assert answers == {"SERVING": 1}
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(calls[0].read(), 10)
    assert time.monotonic() - started < 5
    await close_all(channels, calls)


# -- the Prometheus exporter ---------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """Connections that send half a request line and then nothing."""
    opened = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        connection.sendall(b"GET /metrics HTTP/1.1\r\n")
        opened.append(connection)
    return opened


def test_metrics_exporter_keeps_no_thread_per_idle_connection(launch: Launch) -> None:
    """40 idle connections to the server's /metrics port add at most 16 threads (not one each), and a scrape is served once they are gone."""
    server = launch()
    process = psutil.Process(server.process.pid)
    assert "pagemeter_build_info" in scrape(server.metrics_port)
    threads = process.num_threads()
    idle = idle_connections(server.metrics_port, 40)
    time.sleep(1.0)
    during = process.num_threads()
    for connection in idle:
        connection.close()
    assert during - threads <= 16, f"{during - threads} more threads"
    deadline = time.monotonic() + 5
    while True:
        try:
            assert "pagemeter_build_info" in scrape(server.metrics_port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_metrics_exporter_drops_connections_that_send_nothing() -> None:
    """An exporter connection that sends no complete request within the timeout is closed by the server, and connections beyond the limit are closed at once."""
    registry = CollectorRegistry()
    Counter("limits_test_total", "a counter", registry=registry).inc()
    httpd, thread = start_metrics_server(0, "127.0.0.1", registry, max_connections=3, timeout=0.5)
    port = httpd.server_port
    try:
        idle = idle_connections(port, 5)
        started = time.monotonic()
        ended: list[float] = []
        for connection in idle:
            connection.settimeout(5)
            while connection.recv(1024):  # until the server closes it
                pass
            ended.append(time.monotonic() - started)
        for connection in idle:
            connection.close()
        assert max(ended) < 3, ended
        assert "limits_test_total 1.0" in scrape(port)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# -- settings -------------------------------------------------------------------------------


def test_limit_settings_have_defaults_flags_and_variables() -> None:
    """Every limit has its documented default, a flag and a PAGEMETER_ variable (the flag wins)."""
    defaults = parse_settings([], environ={})
    assert (
        defaults.max_concurrent_streams,
        defaults.max_connections,
        defaults.max_concurrent_rpcs,
        defaults.max_health_watchers,
        defaults.max_connection_idle_seconds,
        defaults.max_connection_age_seconds,
        defaults.max_connection_age_grace_seconds,
    ) == (100, 1000, 1000, 100, 300.0, 1800.0, 60.0)
    environ = {
        "PAGEMETER_MAX_CONCURRENT_STREAMS": "50",
        "PAGEMETER_MAX_CONNECTIONS": "200",
        "PAGEMETER_MAX_CONCURRENT_RPCS": "400",
        "PAGEMETER_MAX_HEALTH_WATCHERS": "20",
        "PAGEMETER_MAX_CONNECTION_IDLE": "0",
        "PAGEMETER_MAX_CONNECTION_AGE": "600",
        "PAGEMETER_MAX_CONNECTION_AGE_GRACE": "5",
    }
    configured = parse_settings(["--max-connections", "300"], environ=environ)
    assert (
        configured.max_concurrent_streams,
        configured.max_connections,
        configured.max_concurrent_rpcs,
        configured.max_health_watchers,
        configured.max_connection_idle_seconds,
        configured.max_connection_age_seconds,
        configured.max_connection_age_grace_seconds,
    ) == (50, 300, 400, 20, 0.0, 600.0, 5.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_concurrent_streams", 0, "--max-concurrent-streams"),
        ("max_connections", 0, "--max-connections"),
        ("max_concurrent_rpcs", 0, "--max-concurrent-rpcs"),
        ("max_health_watchers", 1000, "--max-health-watchers must be below"),
        ("max_connection_idle_seconds", -1.0, "--max-connection-idle"),
        ("max_connection_age_seconds", float("nan"), "--max-connection-age"),
        ("max_connection_age_grace_seconds", 1e12, "--max-connection-age-grace"),
    ],
)
def test_inconsistent_limits_are_refused(field: str, value: object, message: str) -> None:
    """A limit out of range (or Watch streams that could take every RPC slot) stops the server at start-up with a message naming the flag."""
    with pytest.raises(ValueError, match=message):
        Settings(**{field: value}).validate()  # type: ignore[arg-type]
