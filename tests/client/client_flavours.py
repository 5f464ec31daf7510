"""Both clients behind the async client's interface, so one behavioural test runs on each.

The test server runs in the test's event loop, so a blocking call made there would
stall it: `InThread` runs each call of the blocking client in a worker thread
(`asyncio.to_thread`) and hands back its answer, or raises its error, unchanged.
A test takes the `connect` fixture and writes `async with connect(target, **options)
as client:`; it runs once with AsyncPagemeterClient and once with PagemeterClient.
Failed calls raise `grpc.aio.AioRpcError` from one and `grpc.RpcError` from the
other: a test that runs on both expects `grpc.RpcError`, which both are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal, cast

from pagemeter_client import AsyncPagemeterClient, PagemeterClient

Flavour = Literal["async", "sync"]
FLAVOURS: tuple[Flavour, ...] = ("async", "sync")
# Methods of the async client that are not coroutines: called as they are.
PLAIN_METHODS = frozenset({"start_outbox_flusher"})
ITERATORS = frozenset(
    {
        "iter_usage_records",
        "iter_audit_events",
        "iter_webhook_endpoints",
        "iter_webhook_deliveries",
        "iter_webhook_dead_letters",
    }
)

Connect = Callable[..., AsyncPagemeterClient]


class InThread:
    """A blocking client (or one of its Reservations) with the async client's methods."""

    def __init__(self, blocking: Any) -> None:
        self._blocking = blocking

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._blocking, name)
        if not callable(value) or name in PLAIN_METHODS:
            return value
        if name in ITERATORS:
            return lambda *args, **kwargs: _pages(value(*args, **kwargs))

        async def in_thread(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(value, *args, **kwargs)

        return in_thread

    def __repr__(self) -> str:
        return repr(self._blocking)

    @contextlib.asynccontextmanager
    async def reserve(self, *args: Any, **kwargs: Any) -> AsyncIterator[InThread]:
        manager = self._blocking.reserve(*args, **kwargs)
        job = await asyncio.to_thread(manager.__enter__)
        try:
            yield InThread(job)
        except BaseException as error:
            # The blocking reserve() settles the job and re-raises the same error.
            if not await asyncio.to_thread(
                manager.__exit__, type(error), error, error.__traceback__
            ):
                raise
        else:
            await asyncio.to_thread(manager.__exit__, None, None, None)

    async def __aenter__(self) -> InThread:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self._blocking.close)


async def _pages(items: Iterator[Any]) -> AsyncIterator[Any]:
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item


def connector(flavour: Flavour) -> Connect:
    """Makes clients of one flavour: both take the same arguments."""
    if flavour == "async":
        return AsyncPagemeterClient

    def blocking(*args: Any, **kwargs: Any) -> AsyncPagemeterClient:
        # InThread has the async client's methods; the cast lets tests say so.
        return cast(AsyncPagemeterClient, InThread(PagemeterClient(*args, **kwargs)))

    return blocking
