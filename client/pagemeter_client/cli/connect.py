"""The client for the parsed options: target, deadline, credential and TLS."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pagemeter_client.cli.common import InputProblem
from pagemeter_client.sdk import PagemeterClient


def _read_pem(option: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as problem:
        raise InputProblem(f"cannot read the {option} file {path}: {problem.strerror}") from None


def make_client(args: argparse.Namespace, **extra: Any) -> PagemeterClient:
    """The client for the parsed options: target, deadline, token and TLS (and `extra`)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputProblem("--tls-cert and --tls-key go together (mutual TLS needs both)")
    tls_files = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    options: dict[str, Any] = {
        "timeout": args.timeout,
        "token": args.token or None,
        "tls": bool(args.tls or any(tls_files)),
        "root_certificates": _read_pem("--tls-ca", args.tls_ca),
        "client_certificate": _read_pem("--tls-cert", args.tls_cert),
        "client_key": _read_pem("--tls-key", args.tls_key),
        "tls_server_name": args.tls_server_name or None,
        **extra,
    }
    try:
        return PagemeterClient(args.target, **options)
    except ValueError as problem:  # the SDK's messages never contain the token
        raise InputProblem(str(problem)) from None
