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
