"""Keys, corrections and the audit trail: `keys create|list|revoke`, `adjust`, `audit`."""

from __future__ import annotations

import argparse
import sys

from pagemeter.v1 import admin_pb2
from pagemeter_client.cli.common import EXIT_OK, page_or_all
from pagemeter_client.cli.output import emit, show
from pagemeter_client.cli.render.admin import (
    SHOWN_ONCE,
    render_adjustment,
    render_api_keys,
    render_audit,
    render_created_key,
    render_revoked_key,
)
from pagemeter_client.sdk import PagemeterClient


def cmd_keys_create(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.create_api_key(args.org, args.name)
    emit(args, response, lambda: render_created_key(response))
    # With --json on stderr, so that stdout stays one JSON document.
    print(SHOWN_ONCE, file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_keys_list(client: PagemeterClient, args: argparse.Namespace) -> int:
    return show(args, client.list_api_keys(args.org), render_api_keys)


def cmd_keys_revoke(client: PagemeterClient, args: argparse.Namespace) -> int:
    return show(args, client.revoke_api_key(args.org, args.key_id), render_revoked_key)


def cmd_adjust(client: PagemeterClient, args: argparse.Namespace) -> int:
    adjustment = client.adjust_usage(
        args.org,
        args.metric,
        args.units,
        reason=args.reason,
        adjustment_id=args.adjustment_id,
        year=args.year,
        month=args.month,
    )
    return show(args, adjustment, lambda adjusted: render_adjustment(args, adjusted))


def cmd_audit(client: PagemeterClient, args: argparse.Namespace) -> int:
    events = page_or_all(
        args,
        args.org,
        client.list_audit_events,
        client.iter_audit_events,
        lambda every: admin_pb2.ListAuditEventsResponse(events=every),
    )
    return show(args, events, render_audit)
