"""Coalescing concurrent script calls into pipelines (auto-pipelining).

Under load many RPCs wait on Redis at once, each paying for its own round trip,
socket write and read. The coalescer queues the script calls made during one
turn of the event loop and sends them together as one pipeline (no MULTI: each
script stays its own atomic call, and each call gets its own reply or its own
error). A script missing from Redis's cache (after a restart) is loaded and its
calls re-sent; the other calls of the pipeline are not affected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

MAX_PIPELINE = 512


@dataclass
class _Pending:
    script: AsyncScript
    keys: Sequence[Any]
    args: Sequence[Any]
    future: asyncio.Future[Any]


class Coalescer:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._queue: list[_Pending] = []
        self._scheduled = False
        # Pipelines in flight, referenced so that they are not collected early.
        self._sending: set[asyncio.Task[None]] = set()

    async def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        pending = _Pending(script, keys, args, loop.create_future())
        self._queue.append(pending)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_soon)
        return await pending.future

    def _flush_soon(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue, []
        for start in range(0, len(batch), MAX_PIPELINE):
            task = asyncio.ensure_future(self._send(batch[start : start + MAX_PIPELINE]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._pipeline(batch)
            missing = [
                (item, reply)
                for item, reply in zip(batch, replies, strict=True)
                if isinstance(reply, redis.exceptions.NoScriptError)
            ]
            if missing:
                for script in {id(item.script): item.script for item, _ in missing}.values():
                    script.sha = await self.client.script_load(script.script)
                retried = await self._pipeline([item for item, _ in missing])
                fixed = dict(zip((id(item) for item, _ in missing), retried, strict=True))
                replies = [
                    fixed.get(id(item), reply) for item, reply in zip(batch, replies, strict=True)
                ]
        except BaseException as exc:  # the whole pipeline failed: every call fails alike
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, reply in zip(batch, replies, strict=True):
            if item.future.done():
                continue
            if isinstance(reply, Exception):
                item.future.set_exception(reply)
            else:
                item.future.set_result(reply)

    async def _pipeline(self, batch: Sequence[_Pending]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for item in batch:
                pipe.evalsha(item.script.sha, len(item.keys), *item.keys, *item.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
