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

from typing import Any

from redis.asyncio.sentinel import MasterNotFoundError
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError, TimeoutError


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
