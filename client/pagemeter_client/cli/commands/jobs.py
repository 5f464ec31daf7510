"""One job's quota calls: `check`, `record`, `release`."""

from __future__ import annotations

import argparse

from pagemeter_client.cli.common import EXIT_DENIED, EXIT_OK, units
from pagemeter_client.cli.output import emit, show
from pagemeter_client.cli.render.quota import render_check, render_record, render_release
from pagemeter_client.sdk import PagemeterClient


def cmd_check(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.check_quota(
        args.org,
        units(args),
        request_id=args.request_id,
        hold=args.hold,
        hold_ttl=args.hold_ttl,
    )
    emit(args, response, lambda: render_check(response))
    return EXIT_OK if response.allowed else EXIT_DENIED


def cmd_record(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.record_usage(
        args.org,
        args.request_id,
        units(args),
        success=not args.failed,
        document_type=args.document_type,
        requested_at=args.requested_at,
        completed_at=args.completed_at,
    )
    return show(args, response, render_record)


def cmd_release(client: PagemeterClient, args: argparse.Namespace) -> int:
    return show(args, client.release_quota(args.org, args.request_id), render_release)
