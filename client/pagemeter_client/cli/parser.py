"""The command line: the options every command takes, and the commands by area."""

from __future__ import annotations

import argparse
import os
from typing import TypeAlias

from pagemeter_client.cli.arguments import (
    SPEC_HELP,
    billing_anchor,
    billing_interval,
    calendar_date,
    count,
    effective_at,
    expires_at,
    grant_priority,
    instant,
    metric_spec,
    positive_seconds,
    seconds,
    unit_amount,
)
from pagemeter_client.cli.commands.admin import (
    cmd_adjust,
    cmd_audit,
    cmd_keys_create,
    cmd_keys_list,
    cmd_keys_revoke,
)
from pagemeter_client.cli.commands.billing import add_billing_commands
from pagemeter_client.cli.commands.events import add_events_commands
from pagemeter_client.cli.commands.jobs import cmd_check, cmd_record, cmd_release
from pagemeter_client.cli.commands.outbox import (
    FLUSH_WAIT_SECONDS,
    cmd_outbox_discard,
    cmd_outbox_flush,
    cmd_outbox_requeue,
    cmd_outbox_status,
)
from pagemeter_client.cli.commands.plans import (
    cmd_credits_grant,
    cmd_credits_list,
    cmd_credits_void,
    cmd_plan_apply,
    cmd_plan_export,
    cmd_plan_get,
    cmd_plan_set,
)
from pagemeter_client.cli.commands.reports import cmd_history, cmd_records, cmd_stats, cmd_usage
from pagemeter_client.cli.commands.webhooks import add_webhooks_commands
from pagemeter_client.cli.common import (
    TARGET_ENV,
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_ENV,
    TLS_KEY_ENV,
    TLS_SERVER_NAME_ENV,
    TOKEN_ENV,
    add_paging,
)
from pagemeter_client.sdk import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    STATISTICS_GROUPINGS,
    STATISTICS_PERIODS,
)

# What add_subparsers() returns (subscriptable only in annotations).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# The --tls-* options that name a file or a host: flag, metavar, variable, help.
TLS_OPTIONS = (
    ("--tls-ca", "FILE", TLS_CA_ENV, "PEM file of the CA that signed the server's certificate"),
    (
        "--tls-cert",
        "FILE",
        TLS_CERT_ENV,
        "client certificate (PEM) for mutual TLS, with --tls-key",
    ),
    ("--tls-key", "FILE", TLS_KEY_ENV, "client private key (PEM) for mutual TLS, with --tls-cert"),
    (
        "--tls-server-name",
        "NAME",
        TLS_SERVER_NAME_ENV,
        "check the server's certificate for NAME instead of the --target host",
    ),
)


def _global_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, for the top parser and (again) every subcommand.

    --target, --timeout, --json, the credential (--token) and TLS (--tls, --tls-*).

    Only the top parser's copy has defaults. The subcommands' copies default to
    SUPPRESS, so an option given before the subcommand is not reset by the
    subcommand's parser, and one given after it still counts. (Two separate
    copies: parsers built with `parents=` share the option objects, defaults too.)
    """

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=default(os.environ.get(TARGET_ENV) or DEFAULT_TARGET),
        help=f"server address (env {TARGET_ENV}; default {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=positive_seconds,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the response as protobuf JSON (field names as in the .proto)",
    )
    common.add_argument(
        "--token",
        default=default(os.environ.get(TOKEN_ENV) or None),
        help=(
            "admin or service token, or tenant API key, sent as 'authorization: Bearer'. "
            f"Prefer the environment variable {TOKEN_ENV} (the default): command-line "
            "arguments are visible to other users of the machine"
        ),
    )
    common.add_argument(
        "--tls",
        action="store_true",
        default=default(_env_flag(TLS_ENV)),
        help=f"connect with TLS, checking the server against the system's CAs (env {TLS_ENV}=1); "
        "implied by the other --tls-* options",
    )
    for flag, metavar, env, text in TLS_OPTIONS:
        common.add_argument(
            flag,
            metavar=metavar,
            default=default(os.environ.get(env) or None),
            help=f"{text} (env {env})",
        )
    return common


def _env_flag(name: str) -> bool:
    """An on/off environment variable: 1, true, yes or on (any case) is on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _add_plan_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    plan = commands.add_parser("plan", help="set or read an organization's plan")
    plan_commands = plan.add_subparsers(dest="plan_command", required=True, metavar="COMMAND")
    set_ = plan_commands.add_parser(
        "set", parents=[common], help="create or replace a plan", epilog=SPEC_HELP
    )
    set_.add_argument("org", metavar="ORG")
    set_.add_argument("--name", help="plan name, e.g. Business")
    set_.add_argument("--timezone", help="IANA timezone of the billing periods")
    set_.add_argument(
        "--billing-anchor",
        type=billing_anchor,
        metavar="TIME",
        help="RFC 3339 time, e.g. 2026-01-31T10:00:00Z: billing periods start at its local "
        "day of month and time of day in the plan's timezone (default: calendar months)",
    )
    set_.add_argument(
        "--billing-interval",
        type=billing_interval,
        metavar="month|year",
        help="how long an anchored period runs (default month; needs --billing-anchor)",
    )
    set_.add_argument("--rate-limit", type=count, help="CheckQuota calls per second (0: none)")
    set_.add_argument("--burst", type=count, help="calls allowed at once above the rate")
    set_.add_argument("--priority", help="processing priority (display only)")
    set_.add_argument("--support", help="support level (display only)")
    set_.add_argument("--currency", help="ISO 4217 code of the prices (default USD)")
    set_.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        type=metric_spec,
        metavar="SPEC",
        help="one metric's limits; repeat for each metric",
    )
    set_.add_argument("--from-json", metavar="FILE", help="a Plan in protobuf JSON ('-': stdin)")
    set_.set_defaults(run=cmd_plan_set)
    get = plan_commands.add_parser("get", parents=[common], help="show a plan")
    get.add_argument("org", metavar="ORG")
    get.set_defaults(run=cmd_plan_get)
    apply = plan_commands.add_parser(
        "apply",
        parents=[common],
        help="bring organizations to the plans of a YAML catalog (docs/client.md)",
    )
    apply.add_argument("file", metavar="FILE", help="the catalog: templates and organizations")
    apply.add_argument(
        "--dry-run", action="store_true", help="show what would change and change nothing"
    )
    apply.set_defaults(run=cmd_plan_apply)
    export = plan_commands.add_parser(
        "export", parents=[common], help="every organization's plan as a catalog"
    )
    export.add_argument("--output", metavar="FILE", help="write there instead of stdout")
    export.set_defaults(run=cmd_plan_export)


def _add_credit_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    credits = commands.add_parser("credits", help="prepaid credits")
    credit_commands = credits.add_subparsers(
        dest="credits_command", required=True, metavar="COMMAND"
    )
    grant = credit_commands.add_parser(
        "grant", parents=[common], help="add prepaid credits (once per --grant-id)"
    )
    grant.add_argument("org", metavar="ORG")
    grant.add_argument("metric", metavar="METRIC")
    grant.add_argument("units", metavar="UNITS", type=count)
    grant.add_argument("--grant-id", required=True, help="idempotency key of this grant")
    grant.add_argument("--reason", default="", help="why (purchase reference, goodwill, ...)")
    grant.add_argument(
        "--effective-at",
        type=effective_at,
        metavar="TIME",
        help="RFC 3339 time with a UTC offset, e.g. 2026-04-01T00:00:00Z: when the credits "
        "become usable (default: now)",
    )
    grant.add_argument(
        "--expires-at",
        type=expires_at,
        metavar="TIME",
        help="RFC 3339 time with a UTC offset: when what is left of them stops counting "
        "(default: never); after --effective-at and after now",
    )
    grant.add_argument(
        "--priority",
        type=grant_priority,
        metavar="0-100",
        help="draw order among the metric's grants, lower first; equal priorities are "
        "drawn earliest expiry first (default 50)",
    )
    grant.set_defaults(run=cmd_credits_grant)

    void = credit_commands.add_parser(
        "void",
        parents=[common],
        help="void a credit grant: what is left of it stops counting (idempotent)",
    )
    void.add_argument("org", metavar="ORG")
    void.add_argument("grant_id", metavar="GRANT_ID", help="the --grant-id it was granted with")
    void.add_argument("--reason", required=True, help="why (refund, chargeback, ...)")
    void.set_defaults(run=cmd_credits_void)

    list_ = credit_commands.add_parser(
        "list",
        parents=[common],
        help="an organization's credit grants, per metric in the order they are drawn",
    )
    list_.add_argument("org", metavar="ORG")
    list_.add_argument("--metric", default="", help="only this metric's grants")
    list_.set_defaults(run=cmd_credits_list)


def _add_job_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    check = commands.add_parser(
        "check", parents=[common], help="may these units be used now? (exit 3: denied)"
    )
    check.add_argument("org", metavar="ORG")
    check.add_argument("units", metavar="METRIC=UNITS", nargs="+", type=unit_amount)
    check.add_argument("--hold", action="store_true", help="reserve the units for the job")
    check.add_argument("--request-id", help="the job's id (made up with --hold when omitted)")
    check.add_argument(
        "--hold-ttl",
        type=positive_seconds,
        metavar="SECONDS",
        help="how long the hold lives (default: the server's)",
    )
    check.set_defaults(run=cmd_check)

    record = commands.add_parser("record", parents=[common], help="record a finished job")
    record.add_argument("org", metavar="ORG")
    record.add_argument("request_id", metavar="REQUEST_ID")
    record.add_argument("units", metavar="METRIC=UNITS", nargs="+", type=unit_amount)
    record.add_argument(
        "--failed", action="store_true", help="the job failed: count it, consume nothing"
    )
    record.add_argument("--document-type", default="", help="e.g. invoice")
    record.add_argument(
        "--completed-at",
        type=instant,
        metavar="ISO8601",
        help="when the job finished (default: now)",
    )
    record.add_argument(
        "--requested-at", type=instant, metavar="ISO8601", help="when the job was requested"
    )
    record.set_defaults(run=cmd_record)

    release = commands.add_parser("release", parents=[common], help="drop a job's hold")
    release.add_argument("org", metavar="ORG")
    release.add_argument("request_id", metavar="REQUEST_ID")
    release.set_defaults(run=cmd_release)

    usage = commands.add_parser(
        "usage",
        parents=[common],
        help="one billing period's usage (a calendar month, or from the plan's billing anchor)",
    )
    _add_read_org(usage)
    usage.add_argument("--year", type=int, help="2020-2100, with --month")
    usage.add_argument(
        "--month", type=int, help="1-12, with --year: the period that starts in that month"
    )
    usage.set_defaults(run=cmd_usage)


def _add_read_org(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "org",
        metavar="ORG",
        nargs="?",
        default="",
        help="the organization; leave it out with a tenant API key, which names its own",
    )


def _add_admin_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    keys = commands.add_parser("keys", help="tenant API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = key_commands.add_parser(
        "create", parents=[common], help="make an API key (its secret is shown once)"
    )
    create.add_argument("org", metavar="ORG")
    create.add_argument("--name", default="", help="a label, e.g. 'billing page'")
    create.set_defaults(run=cmd_keys_create)
    list_ = key_commands.add_parser("list", parents=[common], help="an organization's keys")
    list_.add_argument("org", metavar="ORG")
    list_.set_defaults(run=cmd_keys_list)
    revoke = key_commands.add_parser(
        "revoke", parents=[common], help="revoke a key (its next call is refused)"
    )
    revoke.add_argument("org", metavar="ORG")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(run=cmd_keys_revoke)

    adjust = commands.add_parser(
        "adjust",
        parents=[common],
        help="correct a billing period's committed units (once per --id)",
    )
    adjust.add_argument("org", metavar="ORG")
    adjust.add_argument("metric", metavar="METRIC")
    adjust.add_argument(
        "units", metavar="UNITS", type=int, help="units to add, or to remove when negative"
    )
    adjust.add_argument("--reason", required=True, help="why (ticket, refund reference, ...)")
    adjust.add_argument(
        "--id", dest="adjustment_id", required=True, help="idempotency key of this correction"
    )
    adjust.add_argument(
        "--year", type=int, help="2020-2100, with --month (default: the period in progress)"
    )
    adjust.add_argument(
        "--month", type=int, help="1-12, with --year: the period that starts in that month"
    )
    adjust.set_defaults(run=cmd_adjust)

    audit = commands.add_parser(
        "audit", parents=[common], help="an organization's audit trail, newest first"
    )
    audit.add_argument("org", metavar="ORG")
    add_paging(audit, "events")
    audit.set_defaults(run=cmd_audit)


def _add_report_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    history = commands.add_parser(
        "history", parents=[common], help="usage and contract terms period by period"
    )
    _add_read_org(history)
    history.add_argument(
        "--months", type=count, default=0, help="how many billing periods, 1-24 (default 12)"
    )
    history.set_defaults(run=cmd_history)

    stats = commands.add_parser(
        "stats", parents=[common], help="usage by day, week or month and by document type"
    )
    _add_read_org(stats)
    stats.add_argument(
        "--period", choices=list(STATISTICS_PERIODS), help="length of the rows (default monthly)"
    )
    stats.add_argument(
        "--start",
        type=calendar_date,
        metavar="YYYY-MM-DD",
        help="first day (default: 30 days before --end)",
    )
    stats.add_argument(
        "--end",
        type=calendar_date,
        metavar="YYYY-MM-DD",
        help="last day, included (default: today in the plan's timezone)",
    )
    stats.add_argument(
        "--group-by",
        choices=list(STATISTICS_GROUPINGS),
        help="date rows, document type rows, or both (default date)",
    )
    stats.set_defaults(run=cmd_stats)

    records = commands.add_parser(
        "records", parents=[common], help="usage records (jobs), newest first"
    )
    _add_read_org(records)
    add_paging(records, "records")
    records.set_defaults(run=cmd_records)


def _add_outbox_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    outbox = commands.add_parser(
        "outbox", help="a client outbox file: RecordUsage calls waiting for delivery"
    )
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True, metavar="COMMAND")
    status = outbox_commands.add_parser(
        "status", parents=[common], help="count and list the records (no server needed)"
    )
    status.add_argument("file", metavar="FILE")
    status.add_argument(
        "--limit", type=count, default=50, help="records listed, oldest first (0: all; default 50)"
    )
    status.set_defaults(outbox_run=cmd_outbox_status)
    flush = outbox_commands.add_parser(
        "flush",
        parents=[common],
        help="send the pending records now (exit 1 if some stay undelivered)",
    )
    flush.add_argument("file", metavar="FILE")
    flush.add_argument("--limit", type=count, default=0, help="records tried at most (0: all)")
    flush.add_argument(
        "--wait",
        type=seconds,
        default=FLUSH_WAIT_SECONDS,
        help="seconds to wait for records another flusher holds, then send them (default "
        f"{FLUSH_WAIT_SECONDS:g}; 0: do not wait); exit 1 if some are still held",
    )
    flush.set_defaults(outbox_run=cmd_outbox_flush)
    requeue = outbox_commands.add_parser(
        "requeue", parents=[common], help="make dead letters pending again (all, or these ids)"
    )
    requeue.add_argument("file", metavar="FILE")
    requeue.add_argument("ids", metavar="ID", nargs="*", type=count)
    requeue.set_defaults(outbox_run=cmd_outbox_requeue)
    discard = outbox_commands.add_parser(
        "discard", parents=[common], help="delete these records for good"
    )
    discard.add_argument("file", metavar="FILE")
    discard.add_argument("ids", metavar="ID", nargs="+", type=count)
    discard.set_defaults(outbox_run=cmd_outbox_discard)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; defaults come from PAGEMETER_TARGET, PAGEMETER_TOKEN, ..."""
    parser = argparse.ArgumentParser(
        prog="pagemeter",
        parents=[_global_options(with_defaults=True)],
        description="Operate and query a pagemeter quota service.",
        epilog="exit codes: 0 ok, 1 gRPC error (or records left in the outbox), 2 bad usage, "
        "3 check denied",
    )
    common = _global_options(with_defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_plan_commands(commands, common)
    _add_credit_commands(commands, common)
    _add_admin_commands(commands, common)
    _add_job_commands(commands, common)
    _add_report_commands(commands, common)
    add_billing_commands(commands, common)
    add_events_commands(commands, common)
    add_webhooks_commands(commands, common)
    _add_outbox_commands(commands, common)
    return parser
