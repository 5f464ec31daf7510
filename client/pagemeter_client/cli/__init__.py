"""The `pagemeter` command: plans, credits, keys, checks, records, usage and reports.

Exit codes: 0 success; 1 the server answered with a gRPC error (printed as
`error: CODE: message` on stderr, with any google.rpc details; one line for
UNAUTHENTICATED, PERMISSION_DENIED and RESOURCE_EXHAUSTED), or `outbox flush`
left records undelivered; 2 bad command line or input file (nothing was sent);
3 `check` was answered "denied" (the decision is still printed, on stdout);
130 interrupted.

`pagemeter outbox status|flush|requeue|discard FILE` work on a client outbox
file (see pagemeter_client.outbox); only `flush` talks to the server.

Credentials come from $PAGEMETER_TOKEN (or --token, which other users of the
machine can see in the process list); TLS from --tls and the --tls-* options or
their environment variables. The token is never printed.

The package: `parser` builds the command line (with the value types of
`arguments`), `commands/` do the work by area, `render/` turns the answers into
text, `output` prints them and the errors, `connect` builds the client, and
`common` holds the exit codes and what the commands share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc

from pagemeter_client.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_RPC_ERROR,
    EXIT_USAGE,
    Command,
    InputProblem,
    OutboxCommand,
)
from pagemeter_client.cli.connect import make_client
from pagemeter_client.cli.output import print_rpc_error
from pagemeter_client.cli.parser import build_parser

__all__ = ["build_parser", "main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on bad usage (2) and after --help (0); report, don't exit,
        # so main() can be called from tests and other programs.
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Call the server for the parsed command and print the answer."""
    outbox_command: OutboxCommand | None = getattr(args, "outbox_run", None)
    try:
        if outbox_command is not None:
            return outbox_command(args)
        command: Command = args.run
        with make_client(args) as client:
            code = command(client, args)
        sys.stdout.flush()  # here, so that a reader gone away is handled below
        return code
    except InputProblem as problem:
        print(f"pagemeter: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as error:
        print_rpc_error(error, args.target)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`pagemeter usage ACME | head -1`): nothing is left
        # to tell it. Point stdout at /dev/null so the interpreter's final flush
        # does not fail again, and exit as the shells expect of SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
