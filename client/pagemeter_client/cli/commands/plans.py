"""Plans and prepaid credits: `plan set`, `plan get`, `plan apply`, `plan export`,
`credits grant`, `credits void`, `credits list`."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format, text_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import plan_pb2
from pagemeter_client.cli.catalog import Catalog, export_document, load_catalog
from pagemeter_client.cli.common import InputProblem
from pagemeter_client.cli.output import show
from pagemeter_client.cli.render.quota import (
    render_credit_grants,
    render_grant,
    render_plan,
    render_voided_grant,
)
from pagemeter_client.sdk import PagemeterClient, error_details


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
    if args.billing_anchor is not None:
        plan.billing_anchor.CopyFrom(args.billing_anchor)
    if args.billing_interval is not None:
        plan.billing_interval = args.billing_interval
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
    response = client.grant_credits(
        args.org,
        args.metric,
        args.units,
        args.grant_id,
        args.reason,
        effective_at=args.effective_at,
        expires_at=args.expires_at,
        priority=args.priority,
    )
    return show(args, response, render_grant)


def cmd_credits_void(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.void_credit_grant(args.org, args.grant_id, args.reason)
    return show(args, response, lambda voided: render_voided_grant(args, voided))


def cmd_credits_list(client: PagemeterClient, args: argparse.Namespace) -> int:
    return show(args, client.list_credit_grants(args.org, args.metric), render_credit_grants)


def _comparable(plan: plan_pb2.Plan) -> str:
    """A plan as text, without what the server sets on every change."""
    copy = plan_pb2.Plan()
    copy.CopyFrom(plan)
    copy.ClearField("version")
    copy.ClearField("updated_at")
    return text_format.MessageToString(copy, message_formatter=_readable_time)


def _readable_time(message: Message, indent: int, as_one_line: bool) -> str | None:
    """A Timestamp (billing_anchor) in the diff as RFC 3339, a Duration (an alert's
    grant_expiring_within) as protobuf JSON writes it (604800s), not seconds and nanos."""
    if isinstance(message, (Timestamp, Duration)):
        return message.ToJsonString()
    return None


def _current_plan(client: PagemeterClient, org: str) -> plan_pb2.Plan | None:
    try:
        return client.get_plan(org).plan
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _as_stored(client: PagemeterClient, catalog: Catalog, org: str) -> plan_pb2.Plan:
    """The organization's plan from its template, as the server would store it; a
    plan the server refuses is reported at the catalog's line of the field at fault."""
    template = catalog.templates[catalog.organizations[org]]
    plan = plan_pb2.Plan()
    plan.CopyFrom(template.plan)
    plan.org_id = org
    try:
        return client.set_plan(plan, validate_only=True).plan
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        problems = error_details(error).field_violations or [("plan", error.details() or "")]
        lines = [
            f"{catalog.where(template.name, field)}: template {template.name!r} "
            f"(for {org!r}): {field}: {description}"
            for field, description in problems
        ]
        raise InputProblem("\n".join(lines)) from None


def cmd_plan_apply(client: PagemeterClient, args: argparse.Namespace) -> int:
    """Bring every organization of the catalog to its template's plan: show each
    change as a diff, then (without --dry-run) set it; unchanged ones are left alone."""
    catalog = load_catalog(args.file)
    desired = {org: _as_stored(client, catalog, org) for org in sorted(catalog.organizations)}
    changes = 0
    for org, plan in desired.items():
        current = _current_plan(client, org)
        before = _comparable(current) if current is not None else ""
        if before == _comparable(plan):
            print(f"{org}: unchanged ({catalog.organizations[org]})")
            continue
        changes += 1
        verb = "would change" if args.dry_run else "changes"
        print(f"{org}: {verb} to {catalog.organizations[org]!r}")
        diff = difflib.unified_diff(
            before.splitlines(), _comparable(plan).splitlines(), "stored", "catalog", lineterm=""
        )
        print("\n".join(f"  {line}" for line in diff))
        if not args.dry_run:
            stored = client.set_plan(plan).plan
            print(f"{org}: set, plan version {stored.version}")
    done = "to change" if args.dry_run else "changed"
    print(f"{changes} of {len(desired)} organizations {done}")
    return 0


def cmd_plan_export(client: PagemeterClient, args: argparse.Namespace) -> int:
    """Every organization's plan as a catalog `plan apply` takes."""
    plans: list[plan_pb2.Plan] = []
    token = ""
    while True:
        page = client.list_plans(page_size=1000, page_token=token)
        plans.extend(page.plans)
        token = page.next_page_token
        if not token:
            break
    text = export_document(plans)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
