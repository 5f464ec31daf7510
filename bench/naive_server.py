"""The benchmark's honest reference: the shortest quota handler on pagemeter's stack.

Same stack and settings as `pagemeter-server` (grpc.aio under uvloop, the same
server options, redis-py with hiredis connected as pagemeter connects), one
generic handler for `/pagemeter.v1.QuotaService/CheckQuota` that decodes the
request, runs one EVALSHA of a small quota script (each metric's counter against
its limit, all or nothing) and answers allowed or QUOTA_EXCEEDED. No interceptor,
no authentication, no validation, no plan, no events. What a handler with one
Redis round trip cannot avoid on this stack, it pays; the rest of pagemeter's
time per call is pagemeter's own (issue 18). Not part of the product; used by
bench/run.py.

    python bench/naive_server.py --listen 127.0.0.1:50098 --redis-url redis://...
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

from pagemeter.v1 import quota_pb2
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import close_redis, connect_redis

# The empty handler's server options (bench/empty_server.py: pagemeter's own).
from empty_server import DEFAULTS, METHOD, SERVER_OPTIONS  # isort: skip

# KEYS: one counter per metric. ARGV: the requested units of each metric, then
# the limit of each (in KEYS order). Returns 1 when every metric fits, else 0.
QUOTA_SCRIPT = """
local n = #KEYS
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + tonumber(ARGV[i]) > tonumber(ARGV[n + i]) then return 0 end
end
return 1
"""
LIMIT = 10**12


class NaiveHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, client: Any) -> None:
        self.script = client.register_script(QUOTA_SCRIPT)
        self.handler = grpc.unary_unary_rpc_method_handler(
            self.check_quota,
            request_deserializer=quota_pb2.CheckQuotaRequest.FromString,
            response_serializer=quota_pb2.CheckQuotaResponse.SerializeToString,
        )

    async def check_quota(
        self, request: quota_pb2.CheckQuotaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> quota_pb2.CheckQuotaResponse:
        metrics = sorted(request.units)
        keys = [f"naive:{{{request.org_id}}}:{metric}" for metric in metrics]
        units = [request.units[metric] for metric in metrics]
        allowed = await self.script(keys=keys, args=[*units, *([LIMIT] * len(metrics))])
        return quota_pb2.CheckQuotaResponse(
            allowed=bool(allowed),
            reason=(
                quota_pb2.DECISION_REASON_WITHIN_QUOTA
                if allowed
                else quota_pb2.DECISION_REASON_QUOTA_EXCEEDED
            ),
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.handler if handler_call_details.method == METHOD else None


async def serve(listen: str, redis_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client = connect_redis(redis_url, Settings(redis_url=redis_url))
    server = grpc.aio.server(
        options=SERVER_OPTIONS, maximum_concurrent_rpcs=DEFAULTS.max_concurrent_rpcs
    )
    server.add_generic_rpc_handlers((NaiveHandler(client),))
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    await stop.wait()
    await server.stop(1)
    await close_redis(client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50098")
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed on Linux
        asyncio.run(serve(args.listen, args.redis_url))
    else:
        uvloop.run(serve(args.listen, args.redis_url))


if __name__ == "__main__":
    main()
