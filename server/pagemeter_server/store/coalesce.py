"""Script calls over one pipelined connection (`--redis-pipelining`, decision 50).

A script call through redis-py's pool costs its own pool checkout, command
packing, socket write, read wakeup and `StreamReader` work. Under load that is
most of what a Redis round trip costs inside a gRPC handler, much more than
Redis's own time. Here every script call of the process shares one connection:
the calls made during one turn of the event loop leave in one socket write,
and their replies, which Redis sends in the order it received the calls, are
parsed by hiredis as they arrive and handed to their callers in order. Each
call stays its own atomic EVALSHA with its own reply or error (no MULTI).

The connection is made by redis-py's own pool (its `make_connection`): the
address (Sentinel's primary included), TLS, credentials and database are
redis-py's, and after the handshake the socket is spoken to directly. What the
connection cannot handle it gives back to redis-py's path, which is how every
call went before:

- a broken connection (Redis restarted, a failover, READONLY from a demoted
  primary): the calls in flight are sent once more through redis-py, which
  reconnects; that is the one quick retry redis-py's own path makes
  (connections.one_quick_retry). The next calls open a new connection;
- NOSCRIPT (a Redis restart emptied the script cache): the script is loaded
  and the call sent again on the connection;
- no reply within the Redis timeout: every call in flight fails with
  TimeoutError, not retried, as redis-py's path fails, and the connection is
  closed.

Cluster mode does not use it: there the calls go to the primary of each
organization's slot, and MOVED/ASK and failovers are redis-py's cluster
client's work (decision 50).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis._parsers import BaseParser
from redis.commands.core import AsyncScript

from pagemeter_server.store.faults import demoted_primary


def encode_command(*parts: str | int | float) -> bytes:
    """One command in RESP, packed by hiredis (in C) as redis-py packs it."""
    packed: bytes = hiredis.pack_command(parts)  # type: ignore[arg-type]  # stub: 1-tuple
    return packed


class PipelinedConnection(asyncio.Protocol):
    """One Redis connection whose calls are written together and answered in order."""

    def __init__(self, timeout: float | None, previous: asyncio.BaseProtocol) -> None:
        self.timeout = timeout
        # redis-py's protocol for the socket: told when it closes, so that
        # redis-py's own disconnect (closing the client) does not wait forever.
        self._previous = previous
        # An error reply, at the top or inside an array, becomes redis-py's
        # exception for it (NoScriptError, ReadOnlyError, ...), as redis-py reads it.
        self._reader = hiredis.Reader(replyError=BaseParser.parse_error, encoding="utf-8")
        # The calls sent and not yet answered, oldest first, with when they left.
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.broken: Exception | None = None

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        while (reply := reader.gets()) is not False:
            if isinstance(reply, hiredis.PushNotification):
                # RESP3 (redis-py's protocol) lets Redis push messages nobody
                # asked for (maintenance notices): they are not a call's reply.
                continue
            if not waiting:
                self._break(redis.exceptions.ConnectionError("Redis sent a reply nobody asked"))
                return
            future, _ = waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, redis.exceptions.RedisError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        lost = f"Connection to Redis lost: {exc or 'closed'}"
        self._break(redis.exceptions.ConnectionError(lost))
        self._previous.connection_lost(exc)

    # -- calls -------------------------------------------------------------------

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue one command; the future has its reply (or raises its error)."""
        if self.broken is not None:
            raise self.broken
        future = self._loop.create_future()
        self._outgoing.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._waiting.append((future, 0.0))
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.broken is not None or self._transport is None:
            return
        outgoing, self._outgoing = self._outgoing, []
        sent_at = self._loop.time()
        count = len(outgoing)
        # The queued calls are the newest in _waiting: stamp their departure.
        waiting = self._waiting
        for index in range(len(waiting) - count, len(waiting)):
            waiting[index] = (waiting[index][0], sent_at)
        self._transport.write(b"".join(outgoing))
        if self._watchdog is None and self.timeout is not None:
            self._watchdog = self._loop.call_later(self.timeout, self._check_stalled)

    def _check_stalled(self) -> None:
        """Fail everything in flight when the oldest call has waited out the timeout."""
        self._watchdog = None
        if not self._waiting or self.broken is not None or self.timeout is None:
            return
        oldest_sent = self._waiting[0][1]
        due = oldest_sent + self.timeout
        if oldest_sent and self._loop.time() >= due:
            self._break(redis.exceptions.TimeoutError("Timeout reading from Redis"))
            return
        self._watchdog = self._loop.call_at(
            due if oldest_sent else self._loop.time() + self.timeout, self._check_stalled
        )

    def close(self) -> None:
        self._break(redis.exceptions.ConnectionError("Connection to Redis closed"))

    def _break(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)


class PipelinedScripts:
    """Every script call of the process on one PipelinedConnection, opened on demand."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        pool = client.connection_pool
        self.timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        self._connection: PipelinedConnection | None = None
        self._borrowed: Any = None  # the redis-py connection whose socket it is
        self._connecting: asyncio.Future[PipelinedConnection] | None = None
        self._loading: dict[int, asyncio.Future[str]] = {}

    async def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        connection = self._connection
        if connection is None or connection.broken is not None:
            # A failure to connect is the call's failure, as on redis-py's path
            # (which has already retried the connection once).
            connection = await self._connect()
        try:
            try:
                return await connection.send(
                    encode_command("EVALSHA", script.sha, len(keys), *keys, *args)
                )
            except redis.exceptions.NoScriptError:
                await self._load(script)
                return await connection.send(
                    encode_command("EVALSHA", script.sha, len(keys), *keys, *args)
                )
        except redis.exceptions.ConnectionError:
            pass
        except redis.exceptions.ResponseError as error:
            if not demoted_primary(error):
                raise
            # A demoted primary: the next calls connect again (to the new one).
            connection.close()
        # Once more through redis-py's path: it reconnects (to the new primary
        # after a failover), and it is how this call would have gone without
        # the pipeline, with the same one quick retry.
        return await script(keys=list(keys), args=list(args))

    async def _load(self, script: AsyncScript) -> None:
        """Load a script Redis does not have (after a restart, or never sent): once,
        however many calls found it missing together."""
        # Keyed by the script object: its text, as redis-py types it, is not only str.
        key = id(script)
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self.client.script_load(script.script))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        script.sha = await asyncio.shield(loading)

    async def _connect(self) -> PipelinedConnection:
        # Callers arriving while a connection is being made wait for that one.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> PipelinedConnection:
        pool = self.client.connection_pool
        old, self._borrowed = self._borrowed, None
        if old is not None:
            # Handed back disconnected: redis-py reconnects it on its next use.
            await old.disconnect(nowait=True)
            await pool.release(old)
        # A connection from redis-py's own pool, connected: the handshake (TLS,
        # AUTH, SELECT, Sentinel's choice of primary) is redis-py's. It stays
        # checked out while the pipeline speaks on its socket, so closing the
        # client (its pool) closes it too.
        borrowed = await pool.get_connection()  # type: ignore[no-untyped-call]
        writer = borrowed._writer
        if writer is None:  # pragma: no cover - get_connection connects
            await pool.release(borrowed)
            raise redis.exceptions.ConnectionError("redis-py gave an unconnected connection")
        self._borrowed = borrowed
        transport = writer.transport
        protocol = PipelinedConnection(self.timeout, transport.get_protocol())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        self._connection = protocol
        return protocol
