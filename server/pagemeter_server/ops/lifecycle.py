"""Processes that never outlive pagemeter, and claims that only one pagemeter may hold.

Three mechanisms, each closing one way to a split brain after a crash
(docs/reliability.md, "Process lifecycle"):

- Parent-death signal. A child pagemeter starts (the embedded Redis, a worker of
  --workers N) gets SIGTERM from the kernel when its parent dies, even by
  SIGKILL (Linux `prctl(PR_SET_PDEATHSIG)`). The kernel sends it when the
  *thread* that forked the child ends, so children are forked from one thread
  that lives as long as the process (`spawn`). Where prctl is missing, a worker
  watches its parent's pid instead.
- A data-dir lock. `DataDirLock` takes an exclusive `flock` on a file in the
  embedded store's data dir and is inherited by the Redis child, so it is held
  until both pagemeter and its Redis have exited: a second embedded store can
  never open the same append-only file.
- A port claim. `PortClaim` binds an abstract unix socket named after the gRPC
  port, so a second `--workers N` (whose workers bind with SO_REUSEPORT) cannot
  silently share the port with a live one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
LOCK_FILE_NAME = "pagemeter.lock"
# How long a start waits for the lock of a pagemeter that has exited: its Redis
# got the parent-death SIGTERM and is flushing its append-only file.
TAKEOVER_SECONDS = 5.0


class InUse(RuntimeError):
    """Another process holds what this one needs (a data dir, a port)."""


class Phase:
    """Where a run is: "starting" until it serves, then "serving", then "stopping".

    An error that ends the run is reported for what it interrupted: a failure
    while stopping must not read as a failed start.
    """

    def __init__(self) -> None:
        self.now = "starting"

    def failure(self, exc: BaseException) -> str:
        """One line for an error that ended the run."""
        if self.now == "starting":
            return f"pagemeter could not start: {exc}"
        return f"pagemeter failed while {self.now}: {exc}"


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved once here: never look symbols up in a forked child."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    bound: Callable[..., int] = prctl
    return bound


_PRCTL = _load_prctl()


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Have this process receive `signum` when its parent `parent_pid` ends.

    Called first thing in a worker. The check of getppid() after prctl closes the
    race with a parent that died before prctl ran (nobody would signal us then).
    """
    if _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0:
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signum)
        return
    _watch_parent(parent_pid, signum)


def _watch_parent(parent_pid: int, signum: int) -> None:
    """Fallback without prctl: a thread that signals this process once it is orphaned."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="pagemeter-parent-watch", daemon=True).start()


# Run as `python -I -S -c _EXEC_BOUND <parent pid> <signal> <program> <args...>`:
# ask for the parent-death signal, give up if the parent is already gone (the
# race between fork and prctl), then become the program. The signal survives
# execve. A wrapper rather than a Popen preexec_fn: with a preexec_fn, CPython
# forks with fork() instead of vfork() and runs the at-fork handlers of the
# libraries loaded, and gRPC's restart its poller threads in the child, which
# then abort when the child closes its descriptors (seen as a SIGABRT of the
# child in the test suite). The wrapper adds one Python start-up (~15 ms).
_EXEC_BOUND = """
import ctypes, os, sys
parent, signum = int(sys.argv[1]), int(sys.argv[2])
if sys.platform.startswith("linux"):
    prctl = ctypes.CDLL(None).prctl
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if prctl(1, signum, 0, 0, 0) == 0 and os.getppid() != parent:
        sys.exit(1)
os.execvp(sys.argv[3], sys.argv[3:])
"""


def bound_command(args: Sequence[str], signum: int = signal.SIGTERM) -> list[str]:
    """`args` as a command whose process gets `signum` when the forking thread ends.

    For Popen calls from a thread that lives as long as the process (the main
    thread of a tool, or `spawn`'s): the child then dies with this process, even
    when it is killed with SIGKILL. Where prctl does not exist the command runs
    unbound.
    """
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _EXEC_BOUND,
        str(os.getpid()),
        str(int(signum)),
        *args,
    ]


class _Spawner:
    """One daemon thread, alive as long as the process, that forks every child.

    PR_SET_PDEATHSIG fires when the forking *thread* ends: a child forked from a
    thread-pool thread (asyncio.to_thread) would be sent SIGTERM when that pool
    thread exits, long before pagemeter does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # A forked child has no spawner thread, whatever the parent had.
        self._lock = threading.Lock()
        self._queue, self._thread = None, None

    def run(self, call: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return call()
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._serve, args=(self._queue,), name="pagemeter-spawner", daemon=True
                )
                self._thread.start()
            jobs = self._queue
        done: Future[Any] = Future()
        jobs.put((call, done))
        return done.result()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
        while True:
            call, done = jobs.get()
            try:
                done.set_result(call())
            except BaseException as exc:  # handed to the caller, which re-raises it
                done.set_exception(exc)


_SPAWNER = _Spawner()


def spawn(
    args: Sequence[str], *, pass_fds: Sequence[int] = (), **popen: Any
) -> subprocess.Popen[bytes]:
    """Popen(args) for a child that must not outlive this process.

    The child is forked from the long-lived spawner thread with a parent-death
    SIGTERM, and put in its own process group, so that a Ctrl-C in a terminal
    reaches pagemeter alone: pagemeter drains first and stops the child after.
    """

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            bound_command(args), pass_fds=tuple(pass_fds), process_group=0, **popen
        )

    child: subprocess.Popen[bytes] = _SPAWNER.run(start)
    return child


def alive(pid: int) -> bool:
    """True when pid runs; a zombie (killed, not yet reaped) counts as exited."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


# -- the data-dir lock ----------------------------------------------------------------

_HELD: dict[str, int] = {}  # data dirs this process holds the lock of, and the descriptor
_HELD_LOCK = threading.Lock()


def _drop_inherited_locks() -> None:
    """In a forked child (os.fork, multiprocessing's fork): close the copies of the
    lock descriptors, which would otherwise keep the parent's data dirs locked
    for as long as the child lives. The parent's lock is unaffected. (Children
    started by `spawn` run no at-fork handler: without a preexec_fn, CPython
    forks them with vfork and execs at once, so Redis keeps its copy.)"""
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()
    for fd in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)
_HOLDER_LINE = re.compile(r"^(\S+) pid (\d+)$", re.MULTILINE)


class DataDirLock:
    """An exclusive flock on `<data dir>/pagemeter.lock`, which names its holders.

    The file says `pagemeter pid P` (the process that took the lock) and, once it
    runs, `redis-server pid R`. The descriptor is passed to the Redis child, so
    the lock lasts until both have exited. It is released by closing the
    descriptor, never by LOCK_UN, which would unlock it for the child too.
    """

    def __init__(self, data_dir: str | os.PathLike[str], wait: float = TAKEOVER_SECONDS) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE_NAME
        self.wait = wait
        self._fd: int | None = None
        self._key = str(self.data_dir.resolve())

    @property
    def fd(self) -> int:
        assert self._fd is not None, "the lock is not held"
        return self._fd

    def acquire(self) -> None:
        """Take the lock, or raise InUse in one line naming the holder.

        A live holder is refused at once. When the pagemeter that took the lock has
        exited, its child may still hold it while it flushes and exits: wait up to
        `wait` seconds for that.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._take(fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pagemeter pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        with _HELD_LOCK:
            _HELD[self._key] = fd

    def _take(self, fd: int) -> None:
        deadline: float | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            holders = _read_holders(fd)
            owner = holders.get("pagemeter")
            with _HELD_LOCK:
                ours = self._key in _HELD
            if ours or (owner is not None and owner != os.getpid() and alive(owner)):
                raise InUse(
                    f"data dir {self.data_dir} is in use by pagemeter pid {owner or os.getpid()}"
                )
            if deadline is None:
                deadline = time.monotonic() + self.wait
            if time.monotonic() >= deadline:
                raise InUse(f"data dir {self.data_dir} {_still_held(holders, self.wait)}")
            time.sleep(0.05)

    def record_child(self, pid: int, name: str = "redis-server") -> None:
        """Add the child that shares the lock to the file (for the next starter's message)."""
        end = os.fstat(self.fd).st_size
        os.pwrite(self.fd, f"{name} pid {pid}\n".encode(), end)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _HELD_LOCK:
            # Not ours any more in a forked child, which closed it already.
            ours = _HELD.get(self._key) == fd
            if ours:
                del _HELD[self._key]
        if ours:
            os.close(fd)


def _read_holders(fd: int) -> dict[str, int]:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return {}
    return {name: int(pid) for name, pid in _HOLDER_LINE.findall(text)}


def _still_held(holders: dict[str, int], waited: float) -> str:
    owner = holders.get("pagemeter")
    others = [(name, pid) for name, pid in holders.items() if name != "pagemeter" and alive(pid)]
    who = ", ".join(f"{name} pid {pid}" for name, pid in others) or "another process"
    left_by = f", left running by pagemeter pid {owner}, which has exited" if owner else ""
    return f"is still in use by {who}{left_by} (waited {waited:g}s); stop it and start again"


# -- the port claim -------------------------------------------------------------------


class PortClaim:
    """An exclusive claim on a TCP port for this network namespace.

    An abstract unix socket named after the port: the kernel frees it when the
    process dies (no stale file), and like the port it belongs to the network
    namespace. The port alone is the key, so `0.0.0.0:P` and `127.0.0.1:P`,
    which SO_REUSEPORT would let overlap, cannot both be claimed. Connecting to
    it and reading SO_PEERCRED names the holder.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.name = f"\0pagemeter-grpc-port-{port}"
        self._socket: socket.socket | None = None

    def acquire(self) -> None:
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inherited by children
        try:
            claim.bind(self.name)
        except OSError as exc:
            claim.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            raise InUse(
                f"port {self.port} is already served by {self._holder()}; pass --reuse-port "
                "to share it on purpose"
            ) from None
        claim.listen(16)
        claim.setblocking(False)
        self._socket = claim

    def _holder(self) -> str:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.name)
            raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, _uid, _gid = struct.unpack("3i", raw)
        except OSError:
            return "another pagemeter"
        finally:
            probe.close()
        return f"pagemeter pid {pid}"

    def tend(self) -> None:
        """Accept and drop the probes of refused starters, so its backlog never fills."""
        if self._socket is None:
            return
        while True:
            try:
                connection, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            connection.close()

    def release(self) -> None:
        claim, self._socket = self._socket, None
        if claim is not None:
            with contextlib.suppress(OSError):
                claim.close()
