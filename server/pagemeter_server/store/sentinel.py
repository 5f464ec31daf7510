"""Sentinel discovery that stays correct when many calls discover at once.

redis-py's async `Sentinel.discover_master` moves the sentinel that answered to
the front of its list by swapping two positions it read before an `await`.
When several connections are opened at the same moment — exactly what a
failover causes, as every in-flight RPC reconnects — another call may have
reordered the list meanwhile, and the swap writes one sentinel twice and drops
another. The dropped sentinel is never asked again (pagemeter loses a sentinel
of its quorum for discovery) and never closed. This subclass asks the same
questions and reorders without any `await` between reading and writing the
list, so the list stays a permutation of the configured sentinels.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError, SentinelConnectionPool
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.connection import SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    RedisError,
    ResponseError,
    TimeoutError,
)

from pagemeter_server.domain.errors import ConfigurationError
from pagemeter_server.settings import Settings, sentinel_url_options

log = logging.getLogger("pagemeter_server.sentinel")


class SteadySentinel(AsyncSentinel):
    """An async Sentinel whose list of sentinels concurrent discoveries cannot corrupt."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        """The primary's (host, port) from the first sentinel that knows a healthy one."""
        errors: list[str] = []
        for sentinel in list(self.sentinels):  # a snapshot: others may reorder meanwhile
            try:
                masters: Any = await sentinel.sentinel_masters()  # a dict by name (RESP2)
            except (ConnectionError, TimeoutError) as error:
                errors.append(f"{sentinel} - {error!r}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                self._ask_first(sentinel)
                forced: str | None = getattr(self, "_force_master_ip", None)
                return (forced if forced is not None else state["ip"]), int(state["port"])
        detail = f" : {', '.join(errors)}" if errors else ""
        raise MasterNotFoundError(f"No master found for {service_name!r}{detail}")

    def _ask_first(self, sentinel: Any) -> None:
        """Move `sentinel` to the front; no await in here, so no other call interleaves."""
        self.sentinels.remove(sentinel)
        self.sentinels.insert(0, sentinel)


def primary_options(url: str) -> dict[str, Any]:
    """Connection options for the primary the sentinels name, from --redis-url.

    In sentinel mode the URL's host and port are not used (the sentinels name
    the primary); its username, password, database and scheme are: `rediss://`
    turns TLS on, with redis-py's query parameters such as `ssl_ca_certs`.
    An empty URL means no password, database 0, no TLS.
    """
    if not url:
        return {}
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    options.pop("host", None)
    options.pop("port", None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return options


def sentinel_kwargs(settings: Settings, retry: Any) -> dict[str, Any]:
    """What each connection to a sentinel is opened with, by both clients.

    The timeouts of --redis-timeout, `retry` (none: the next sentinel in the
    list is the retry), and the sentinels' own username, password and TLS from
    --sentinel-url; the files it names must be readable (ConfigurationError).
    """
    options = sentinel_url_options(settings.sentinel_url)
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in options:
            path = options[name]
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigurationError(
                    f"--sentinel-url {name}: cannot read {path}: {exc.strerror}"
                ) from None
    return {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "retry": retry,
        **options,
    }


async def check_sentinel_access(client: aioredis.Redis) -> None:
    """Refuse to start when every sentinel that answers turns pagemeter away.

    A sentinel that refuses the credentials or fails the TLS handshake is a
    configuration error, unlike one that is down: without this check pagemeter
    would start and stay NOT_SERVING without saying why. If some sentinels
    accept and others refuse, pagemeter starts and warns (as while a password
    is rotated one sentinel at a time). Sentinels that do not answer are left
    to the health probe. The messages name the sentinel and redis-py's reason,
    never the password.
    """
    # A cluster client has no single connection pool (and no sentinels).
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    if manager is None:
        return
    sentinels = list(manager.sentinels)
    outcomes = await asyncio.gather(*(_refusal(sentinel) for sentinel in sentinels))
    refused = [outcome for outcome in outcomes if outcome]
    if not refused:
        return
    answering = sum(outcome is not None for outcome in outcomes)
    how = (
        "if the sentinels need a username and password or TLS, give them in "
        "PAGEMETER_SENTINEL_URL (or --sentinel-url), e.g. "
        "rediss://user:password@?ssl_ca_certs=/path/ca.pem"
    )
    if len(refused) == answering:
        raise ConfigurationError(
            "the sentinels refused pagemeter: " + "; ".join(refused) + f"; {how}"
        )
    log.warning(
        "%d of %d sentinels refused pagemeter: %s; %s",
        len(refused),
        len(sentinels),
        "; ".join(refused),
        how,
    )


async def _refusal(sentinel: Any) -> str | None:
    """Why a sentinel turned pagemeter away; "" if it answered, None if it did not answer."""
    kwargs = sentinel.connection_pool.connection_kwargs
    where = f"{kwargs.get('host')}:{kwargs.get('port')}"
    try:
        await sentinel.sentinel_masters()
    except (AuthenticationError, ResponseError) as error:
        return f"{where} ({error})"
    except ConnectionError as error:
        return _turned_away(where, error)
    except (TimeoutError, OSError, RedisError):
        return None  # not an answer: the health probe reports what follows
    return ""


def _turned_away(where: str, error: ConnectionError) -> str | None:
    """Why a sentinel that accepted the connection turned it down; None if it never answered.

    A failed TLS handshake names its reason. A connection closed or reset before
    any answer is what a TLS port does to a client without TLS, and a TLS 1.3
    port requiring a client certificate to a client without one.
    """
    if _tls_failure(error):
        return f"{where} (TLS: {error})"
    if isinstance(error.__context__, ConnectionResetError) or str(error) == (
        "Connection closed by server."
    ):
        return (
            f"{where} (closed the connection before any answer: does it want TLS, or a "
            "client certificate?)"
        )
    return None


def _tls_failure(error: BaseException) -> bool:
    """Whether a connection failed in its TLS handshake (a certificate, a protocol)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class WaitingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The primary's connection pool, bounded like BlockingConnectionPool: a call that
    finds every connection busy waits (`timeout` seconds) for one instead of failing
    with MaxConnectionsError, as the pool of a plain Redis URL does (connections.py)."""
