"""Connection and stream limits, and returning freed memory to the system.

What one replica holds for its callers is bounded here, whoever the callers are:

- HTTP/2 streams per connection (advertised in SETTINGS; a client that ignores
  it has the extra streams refused with RST_STREAM REFUSED_STREAM);
- connections (grpc core closes the ones beyond the limit as they arrive);
- RPCs in progress in the process (the extra ones are answered
  RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" at once);
- idle connections and connection age (a GOAWAY, then the connection is closed
  after the grace period whatever its streams do), so that no stream or
  connection holds its share for ever;
- grpc.health.v1 Watch streams, which live as long as the caller wants: a cap
  of their own (`BoundedHealthServicer`), below the RPC limit, so that Watch
  streams alone can never take every RPC slot (the health Check of a load
  balancer among them);
- the Prometheus exporter: prometheus-client's `start_http_server` serves each
  connection on a thread of its own with no timeout, so idle connections each
  kept a thread for ever (2,000 of them: 2,000 threads, +52 MB);
  `start_metrics_server` serves at most METRICS_MAX_CONNECTIONS at once, each
  with a timeout.

After a flood ends, glibc's malloc keeps the freed memory of gRPC core's
streams in its arenas (RSS stays up; nothing leaks: `malloc_trim(0)` gives it
back). `MemoryReturner` watches how much free memory the allocator holds and
trims while it holds at least `TRIM_THRESHOLD_BYTES` (see its docstring and
docs/decisions.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from prometheus_client import CollectorRegistry, make_wsgi_app

from pagemeter_server.settings import Settings

log = logging.getLogger("pagemeter.limits")

# Longest service name a health Watch may name: the stream keeps its request
# for its whole life, and pagemeter's own service names are under 40 bytes.
MAX_HEALTH_SERVICE_NAME = 200

# Trim when the allocator's free memory, or the RSS, grew by this much since the
# last trim (or the least seen since), checked every TRIM_INTERVAL_SECONDS.
TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024
TRIM_INTERVAL_SECONDS = 1.0
# ... or, with that much free, when the last trim is this old.
TRIM_SETTLE_SECONDS = 5.0

# The Prometheus exporter (/metrics): connections served at once (one thread
# each; those beyond are closed at once) and seconds a connection may take to
# send its request or read a block of the answer.
METRICS_MAX_CONNECTIONS = 16
METRICS_TIMEOUT_SECONDS = 5.0


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """grpc core channel arguments for the connection and stream limits."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Count open HTTP/2 streams against that limit, as clients do. gRPC
        # core's default also counts streams that have ended but are not yet
        # freed, and refuses new ones meanwhile: a client that keeps 300 calls
        # going on one channel (within the limit, as it sees it) then had a few
        # refused as UNAVAILABLE (RST_STREAM REFUSED_STREAM).
        ("grpc.http.overload_protection", 0),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
    ]
    if settings.max_connection_idle_seconds > 0:
        options.append(
            ("grpc.max_connection_idle_ms", round(settings.max_connection_idle_seconds * 1000))
        )
    if settings.max_connection_age_seconds > 0:
        options.append(
            ("grpc.max_connection_age_ms", round(settings.max_connection_age_seconds * 1000))
        )
        options.append(
            (
                "grpc.max_connection_age_grace_ms",
                round(settings.max_connection_age_grace_seconds * 1000),
            )
        )
    return options


class BoundedHealthServicer(AsyncHealthServicer):  # type: ignore[misc]  # grpcio-health-checking has no annotations
    """grpc.health.v1 with at most `max_watchers` Watch streams at a time.

    A Watch beyond the limit is answered RESOURCE_EXHAUSTED at once (Check still
    answers); a Watch naming a service longer than MAX_HEALTH_SERVICE_NAME is
    INVALID_ARGUMENT. Everything else is grpcio's own servicer.
    """

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0

    async def Watch(  # noqa: N802 - the gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> None:
        if len(request.service) > MAX_HEALTH_SERVICE_NAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"service name longer than {MAX_HEALTH_SERVICE_NAME} characters",
            )
        if self.watchers >= self.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health Watch streams on this server (limit {self.max_watchers}); "
                "use Check, or Watch again later",
            )
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class MemoryReturner:
    """A daemon thread that gives memory glibc's malloc holds free back to the system.

    Every `interval` seconds it reads how many bytes the allocator's arenas hold
    free (`mallinfo2().fordblks`) and the process's RSS. It calls
    `malloc_trim(0)`, which releases the free pages of every arena (a few
    milliseconds at a few hundred MB), when at least `threshold` bytes lie free
    and either that free memory grew by `threshold` over the least seen since
    the last trim, or RSS did, or the last trim is `settle` seconds old. The
    free count cannot tell resident free memory from free memory already
    trimmed, so only the last rule catches what a flood frees after a trim in
    its middle; a trim with nothing to return costs well under a millisecond.
    Without glibc (musl, macOS) it does nothing.
    """

    def __init__(
        self,
        threshold: int = TRIM_THRESHOLD_BYTES,
        interval: float = TRIM_INTERVAL_SECONDS,
        settle: float = TRIM_SETTLE_SECONDS,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        self.settle = settle
        self.trims = 0
        self._libc = _glibc()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._libc is not None

    def free_bytes(self) -> int:
        assert self._libc is not None
        info: _MallInfo2 = self._libc.mallinfo2()
        return int(info.fordblks)

    def trim(self) -> None:
        assert self._libc is not None
        self._libc.malloc_trim(0)
        self.trims += 1

    def start(self) -> None:
        if self._libc is None or self._thread is not None:
            return
        # The baseline is read here, not when the thread first runs: what is
        # freed between the two would otherwise count as the baseline.
        baseline = (self.free_bytes(), _rss())
        self._thread = threading.Thread(
            target=self._run, args=baseline, name="pagemeter-memory", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, low_free: int, low_rss: int) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            free, rss = self.free_bytes(), _rss()
            low_free, low_rss = min(low_free, free), min(low_rss, rss)
            grown = free - low_free >= self.threshold or rss - low_rss >= self.threshold
            settled = time.monotonic() - last >= self.settle
            if free >= self.threshold and (grown or settled):
                self.trim()
                low_free, low_rss = self.free_bytes(), _rss()
                last = time.monotonic()
                log.debug(
                    "returned freed memory to the system: RSS %d MiB, now %d MiB",
                    rss >> 20,
                    low_rss >> 20,
                )


def _rss() -> int:
    """This process's resident set size in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _glibc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallinfo2 = libc.mallinfo2
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    mallinfo2.argtypes = []
    malloc_trim.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_returner: tuple[int, MemoryReturner] | None = None
_returner_lock = threading.Lock()


def return_freed_memory() -> MemoryReturner:
    """Start this process's MemoryReturner (once per process) and return it."""
    global _returner
    with _returner_lock:
        if _returner is None or _returner[0] != os.getpid():
            _returner = (os.getpid(), MemoryReturner())
            _returner[1].start()
        return _returner[1]


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing (an access line per scrape is noise)."""


class _BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `max_connections` of them; others are closed."""

    daemon_threads = True
    max_connections = METRICS_MAX_CONNECTIONS
    _slots: threading.BoundedSemaphore

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or went away: no traceback on stderr."""
        log.debug("metrics connection ended: %s", sys.exc_info()[1])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start_metrics_server(
    port: int,
    addr: str,
    registry: CollectorRegistry,
    *,
    max_connections: int = METRICS_MAX_CONNECTIONS,
    timeout: float = METRICS_TIMEOUT_SECONDS,
) -> tuple[WSGIServer, threading.Thread]:
    """prometheus-client's start_http_server, with a bound on connections and a timeout.

    Returns the server (`shutdown()` stops it) and its thread, as start_http_server does.
    """
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_BoundedWSGIServer):
        address_family = family

    class Handler(_QuietHandler):
        pass

    Server.max_connections = max_connections
    Handler.timeout = timeout
    httpd = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), Server, Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="pagemeter-metrics", daemon=True)
    thread.start()
    return httpd, thread
