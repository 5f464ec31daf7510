"""Plans and prepaid credits: `plan set`, `plan get`, `credits grant`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from google.protobuf import json_format

from pagemeter.v1 import plan_pb2
from pagemeter_client.cli.common import InputProblem
from pagemeter_client.cli.output import show
from pagemeter_client.cli.render.quota import render_grant, render_plan
from pagemeter_client.sdk import PagemeterClient


def _load_plan(path: str) -> plan_pb2.Plan:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        return json_format.Parse(text, plan_pb2.Plan())
    except (OSError, json_format.ParseError) as problem:
        raise InputProblem(f"cannot read a Plan from {path}: {problem}") from None


def plan_from_args(args: argparse.Namespace) -> plan_pb2.Plan:
    """The plan to send: the --from-json file (if any) with the flags given on top."""
    plan = _load_plan(args.from_json) if args.from_json else plan_pb2.Plan()
    if plan.org_id and plan.org_id != args.org:
        raise InputProblem(f"{args.from_json} is the plan of {plan.org_id!r}, not {args.org!r}")
    plan.org_id = args.org
    flags = {
        "name": args.name,
        "timezone": args.timezone,
        "api_rate_limit": args.rate_limit,
        "api_burst": args.burst,
        "processing_priority": args.priority,
        "support_level": args.support,
        "currency": args.currency,
    }
    for name, value in flags.items():
        if value is not None:
            setattr(plan, name, value)
    if args.metrics:
        del plan.metrics[:]
        plan.metrics.extend(args.metrics)
    if not args.from_json and (args.name is None or not args.metrics):
        raise InputProblem("plan set needs --name and at least one --metric (or --from-json)")
    return plan


def cmd_plan_set(client: PagemeterClient, args: argparse.Namespace) -> int:
    return show(args, client.set_plan(plan_from_args(args)), lambda set_: render_plan(set_.plan))


def cmd_plan_get(client: PagemeterClient, args: argparse.Namespace) -> int:
    return show(args, client.get_plan(args.org), lambda got: render_plan(got.plan))


def cmd_credits_grant(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.grant_credits(args.org, args.metric, args.units, args.grant_id, args.reason)
    return show(args, response, render_grant)
