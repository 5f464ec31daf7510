"""What the two clients run on: the async client's tasks and the blocking client's threads.

The clients themselves are written once, in `pagemeter_client._async`, and the
blocking one is generated from it (`make unasync`, tools/unasync.py). Where the
two must differ, the async source uses a name from here and the generator
swaps it for its blocking counterpart: `AsyncX` becomes `X`, `x_async` becomes
`x_sync`. Each pair has the same methods, so the generated code reads the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def run_blocking_async(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking function (the outbox's SQLite) in a worker thread, off the event loop."""
    return await asyncio.to_thread(function, *args, **kwargs)


def run_blocking_sync(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking function: the blocking client's caller is already a thread."""
    return function(*args, **kwargs)


async def sleep_async(seconds: float) -> None:
    await asyncio.sleep(seconds)


def sleep_sync(seconds: float) -> None:
    time.sleep(seconds)


# Mutual exclusion of whole passes (replays), held across calls.
AsyncLock = asyncio.Lock
Lock = threading.Lock


class AsyncStateLock:
    """Guards a few fields between awaits: nothing to do on one event loop.

    A task runs alone until its next await, and the guarded steps have none.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


# The blocking client's fields are shared by threads: a real lock.
StateLock = threading.Lock


class AsyncStopFlag:
    """Tells a background task to stop; `wait` is a pause it cuts short."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for the flag; True when it is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        return self._event.is_set()


# threading.Event has the same methods, and its wait(timeout) answers the same.
StopFlag = threading.Event


class AsyncWorker:
    """A background task of the running event loop."""

    def __init__(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(run(), name=name)

    def alive(self) -> bool:
        return not self._task.done()

    async def join(self) -> None:
        """Wait for the task to end (it was told to stop)."""
        await asyncio.gather(self._task, return_exceptions=True)

    async def interrupt(self, grace: float) -> None:
        """End the task now: cancelled at the call it is awaiting (`grace` is for threads)."""
        self._task.cancel()
        await self.join()


class Worker:
    """A background daemon thread."""

    def __init__(self, run: Callable[[], None], name: str) -> None:
        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        """Wait for the thread to end (it was told to stop), unless this is that thread."""
        if self._thread is not threading.current_thread():
            self._thread.join()

    def interrupt(self, grace: float) -> None:
        """Wait up to `grace` seconds for the thread, told to stop, to finish its call.

        A thread cannot be cancelled: it stops after the call it is making.
        """
        if self._thread is not threading.current_thread():
            self._thread.join(grace)
