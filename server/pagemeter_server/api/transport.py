"""Which transport carries the call being handled: gRPC or the HTTP/JSON API.

Both transports run the same handlers through the same server interceptors
(metrics, access log, tracing): the HTTP gateway (api/http.py) sets this for
the calls it transcodes, so that what is observed can say how a call came in.
"""

from __future__ import annotations

import contextvars
from typing import Literal

Transport = Literal["grpc", "http"]

_transport: contextvars.ContextVar[Transport] = contextvars.ContextVar(
    "pagemeter_transport", default="grpc"
)


def current_transport() -> Transport:
    """The transport of the call being handled ("grpc" outside any HTTP call)."""
    return _transport.get()


def set_transport(transport: Transport) -> contextvars.Token[Transport]:
    return _transport.set(transport)


def reset_transport(token: contextvars.Token[Transport]) -> None:
    _transport.reset(token)
