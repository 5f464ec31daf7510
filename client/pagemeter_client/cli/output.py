"""Printing answers (readable text or JSON) and gRPC errors."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from pagemeter_client.cli.common import EXIT_OK, TOKEN_ENV
from pagemeter_client.sdk import error_details

# What a call that never reached the server ends with.
UNREACHED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Errors about the caller's credentials: one line each, without the details.
ACCESS_ERRORS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def emit(args: argparse.Namespace, response: Message, render: Callable[[], str]) -> None:
    """Print the response: protobuf JSON with --json, else the readable rendering."""
    if args.json:
        print(
            json_format.MessageToJson(
                response,
                preserving_proto_field_name=True,
                # Zeros and false are figures too: print them, not just what is non-default.
                always_print_fields_with_no_presence=True,
            )
        )
    else:
        print(render())


Response = TypeVar("Response", bound=Message)


def show(args: argparse.Namespace, response: Response, render: Callable[[Response], str]) -> int:
    """Print the response as `emit` does; the command is done (exit 0)."""
    emit(args, response, lambda: render(response))
    return EXIT_OK


def emit_document(args: argparse.Namespace, document: object, render: Callable[[], str]) -> None:
    """Print a document that is not a protobuf message: indented JSON with --json, else text."""
    print(json.dumps(document, indent=2) if args.json else render())


def print_rpc_error(error: grpc.RpcError, target: str = "") -> None:
    """`error: CODE: message` on stderr, then the google.rpc details, one per line.

    Refusals of the caller's credentials (UNAUTHENTICATED, PERMISSION_DENIED,
    RESOURCE_EXHAUSTED) are one line, with a hint where it helps. A call that
    never reached the server (UNAVAILABLE or DEADLINE_EXCEEDED without a detail
    from it) gets a hint line: a TLS mismatch looks just like that.
    """
    details = error_details(error)
    if details.code in ACCESS_ERRORS:
        print(f"error: {_access_error_line(details.code, details.message)}", file=sys.stderr)
        return
    first, *more = details.lines()
    print(f"error: {first}", file=sys.stderr)
    for line in more:
        print(line, file=sys.stderr)
    if details.code in UNREACHED and not details.error_infos:
        print(
            f"  hint: is the server at {target or 'the target'} reachable, and do --tls and "
            "--tls-* match how it serves (plaintext, TLS or mutual TLS)?",
            file=sys.stderr,
        )


def _access_error_line(code: grpc.StatusCode, message: str) -> str:
    text = f"{code.name}: {' '.join(message.split())}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        text += f" (set {TOKEN_ENV}, or --token, to a valid token or API key)"
    return text
