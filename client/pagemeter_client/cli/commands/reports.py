"""Usage reads and reports: `usage`, `history`, `stats`, `records`."""

from __future__ import annotations

import argparse

from pagemeter.v1 import reporting_pb2
from pagemeter_client.cli.common import page_or_all, read_org
from pagemeter_client.cli.output import show
from pagemeter_client.cli.render.reports import render_records, render_statistics
from pagemeter_client.cli.render.usage import render_history, render_usage
from pagemeter_client.sdk import PagemeterClient


def cmd_usage(client: PagemeterClient, args: argparse.Namespace) -> int:
    usage = client.get_usage(read_org(args), year=args.year, month=args.month)
    return show(args, usage, render_usage)


def cmd_history(client: PagemeterClient, args: argparse.Namespace) -> int:
    return show(args, client.get_usage_history(read_org(args), months=args.months), render_history)


def cmd_stats(client: PagemeterClient, args: argparse.Namespace) -> int:
    statistics = client.get_usage_statistics(
        read_org(args),
        period=args.period,
        start_date=args.start,
        end_date=args.end,
        group_by=args.group_by,
    )
    return show(args, statistics, render_statistics)


def cmd_records(client: PagemeterClient, args: argparse.Namespace) -> int:
    records = page_or_all(
        args,
        read_org(args),
        client.list_usage_records,
        client.iter_usage_records,
        lambda every: reporting_pb2.ListUsageRecordsResponse(records=every),
    )
    return show(args, records, render_records)
