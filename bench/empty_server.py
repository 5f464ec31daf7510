"""The benchmark's floor: a gRPC server that answers CheckQuota without doing anything.

Same stack and settings as `pagemeter-server` (grpc.aio under uvloop, the same
server options), one generic handler for `/pagemeter.v1.QuotaService/CheckQuota`
that decodes the request and returns an empty CheckQuotaResponse: no interceptor,
no authentication, no validation, no Redis. What pagemeter's handlers reach on
top of this is their own cost. Not part of the product; used by bench/run.py.

    python bench/empty_server.py --listen 127.0.0.1:50099
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

from pagemeter.v1 import quota_pb2
from pagemeter_server.app import MAX_MESSAGE_BYTES
from pagemeter_server.ops.limits import server_options
from pagemeter_server.settings import Settings

METHOD = "/pagemeter.v1.QuotaService/CheckQuota"
# The options create_server gives grpc.aio.server (pagemeter_server.app), with
# the default connection and stream limits.
DEFAULTS = Settings()
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    *server_options(DEFAULTS),
]


async def check_quota(
    request: quota_pb2.CheckQuotaRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> quota_pb2.CheckQuotaResponse:
    return quota_pb2.CheckQuotaResponse()


class EmptyHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.handler = grpc.unary_unary_rpc_method_handler(
            check_quota,
            request_deserializer=quota_pb2.CheckQuotaRequest.FromString,
            response_serializer=quota_pb2.CheckQuotaResponse.SerializeToString,
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.handler if handler_call_details.method == METHOD else None


async def serve(listen: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = grpc.aio.server(
        options=SERVER_OPTIONS, maximum_concurrent_rpcs=DEFAULTS.max_concurrent_rpcs
    )
    server.add_generic_rpc_handlers((EmptyHandler(),))
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50099")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed on Linux
        asyncio.run(serve(args.listen))
    else:
        uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
