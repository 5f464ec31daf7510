"""Webhook endpoints: `webhooks create|list|show|update|delete|rotate-secret`, their
delivery log (`deliveries`), dead letters (`dead-letters`) and `replay`.

Every command needs the admin credential (WebhookService, docs/webhooks.md). What
the server would refuse for sure (an id that is not an endpoint id, a URL that is
not http:// or https://, an unknown event type, a replay naming neither one event
nor a time range, an update that changes nothing) is refused here first, exit 2,
with nothing sent. The signing secret is printed by `create` and `rotate-secret`
only, once, with a line saying so (on stderr with --json, so stdout stays JSON).
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from typing import TypeAlias

from pagemeter.v1 import webhooks_pb2
from pagemeter_client.cli.arguments import instant
from pagemeter_client.cli.commands.events import EVENT_TYPES
from pagemeter_client.cli.common import EXIT_OK, InputProblem, add_paging, page_or_all
from pagemeter_client.cli.output import emit, show
from pagemeter_client.cli.render import webhooks as render
from pagemeter_client.sdk import PagemeterClient

# The server's own rules, repeated so a typo is refused before anything is sent.
ENDPOINT_ID = re.compile(r"we_[0-9a-f]{24}")
EVENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}:[0-9]{1,20}-[0-9]{1,20}")
URL_SCHEMES = ("http://", "https://")
# RotateWebhookSecretRequest.overlap_seconds: at most 30 days.
MAX_OVERLAP_HOURS = 30 * 24

# What add_subparsers() returns (subscriptable only in annotations).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def endpoint_id(text: str) -> str:
    """An endpoint id as `webhooks create` printed it (argparse type)."""
    if not ENDPOINT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an endpoint id: we_ and 24 hex digits, as `webhooks create` "
            "and `webhooks list` print it"
        )
    return text


def endpoint_url(text: str) -> str:
    """An endpoint URL: http:// or https:// (argparse type; the server checks the rest)."""
    if not text.lower().startswith(URL_SCHEMES):
        raise argparse.ArgumentTypeError(f"{text!r} must start with http:// or https://")
    return text


def event_id(text: str) -> str:
    """An event id as in the webhook-id header: <org_id>:<ms>-<n> (argparse type)."""
    if not EVENT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event id: <org_id>:<ms>-<n>, as in the webhook-id header "
            "and the deliveries and dead letters lists"
        )
    return text


def overlap_hours(text: str) -> float:
    """Hours the old secret keeps signing: more than 0, at most 720 (argparse type)."""
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not 0 < hours <= MAX_OVERLAP_HOURS or hours * 3600 < 1:
        raise argparse.ArgumentTypeError(
            f"--overlap-hours must be a number of hours above 0 and at most "
            f"{MAX_OVERLAP_HOURS} (30 days) (got {text!r})"
        )
    return hours


def _add_type_option(
    parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, help_text: str
) -> None:
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=EVENT_TYPES,
        metavar="TYPE",
        help=f"{help_text}; repeat for several ({', '.join(EVENT_TYPES)})",
    )


def add_webhooks_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    webhooks = commands.add_parser(
        "webhooks", help="webhook endpoints, their secrets, deliveries and replays"
    )
    sub = webhooks.add_subparsers(dest="webhooks_command", required=True, metavar="COMMAND")

    create = sub.add_parser(
        "create",
        parents=[common],
        help="register an endpoint (its signing secret is shown once)",
    )
    create.add_argument("url", metavar="URL", type=endpoint_url, help="http:// or https://")
    create.add_argument(
        "--org", default="", help="only this organization's events (default: every one's)"
    )
    _add_type_option(create, "only events of this type (default: all)")
    create.add_argument("--description", default="", help="a label, at most 256 characters")
    create.add_argument(
        "--disabled", action="store_true", help="create it disabled (deliver nothing yet)"
    )
    create.set_defaults(run=cmd_webhooks_create)

    list_ = sub.add_parser("list", parents=[common], help="the endpoints, by id")
    list_.add_argument(
        "--org",
        default="",
        help="only those receiving this organization's events (its own and every one's)",
    )
    add_paging(list_, "endpoints")
    list_.set_defaults(run=cmd_webhooks_list)

    show_ = sub.add_parser("show", parents=[common], help="one endpoint (never its secret)")
    show_.add_argument("endpoint_id", metavar="ID", type=endpoint_id)
    show_.set_defaults(run=cmd_webhooks_show)

    update = sub.add_parser(
        "update", parents=[common], help="change an endpoint's URL, types, description or state"
    )
    update.add_argument("endpoint_id", metavar="ID", type=endpoint_id)
    update.add_argument("--url", type=endpoint_url, help="the new URL")
    types = update.add_mutually_exclusive_group()
    _add_type_option(types, "receive only events of these types")
    types.add_argument(
        "--all-types", action="store_true", help="receive events of every type again"
    )
    update.add_argument("--description", help="the new description ('' clears it)")
    state = update.add_mutually_exclusive_group()
    state.add_argument(
        "--enable", dest="enabled", action="store_const", const=True, help="deliver again"
    )
    state.add_argument(
        "--disable",
        dest="enabled",
        action="store_const",
        const=False,
        help="stop delivering; the endpoint keeps its place and resumes from it",
    )
    update.set_defaults(run=cmd_webhooks_update, enabled=None)

    delete = sub.add_parser(
        "delete",
        parents=[common],
        help="remove an endpoint, its delivery log and dead letters (idempotent)",
    )
    delete.add_argument("endpoint_id", metavar="ID", type=endpoint_id)
    delete.set_defaults(run=cmd_webhooks_delete)

    rotate = sub.add_parser(
        "rotate-secret",
        parents=[common],
        help="make a new signing secret (shown once); the old one keeps signing for a while",
    )
    rotate.add_argument("endpoint_id", metavar="ID", type=endpoint_id)
    rotate.add_argument(
        "--overlap-hours",
        type=overlap_hours,
        metavar="H",
        help="hours the old secret keeps signing beside the new one, at most 720 "
        "(default: the server's --webhook-secret-overlap-hours, 24)",
    )
    rotate.set_defaults(run=cmd_webhooks_rotate)

    deliveries = sub.add_parser(
        "deliveries", parents=[common], help="an endpoint's delivery log, newest first"
    )
    deliveries.add_argument("endpoint_id", metavar="ID", type=endpoint_id)
    add_paging(deliveries, "deliveries")
    deliveries.set_defaults(run=cmd_webhooks_deliveries)

    dead = sub.add_parser(
        "dead-letters",
        parents=[common],
        help="the events an endpoint did not take within the retry window, newest first",
    )
    dead.add_argument("endpoint_id", metavar="ID", type=endpoint_id)
    add_paging(dead, "dead letters")
    dead.set_defaults(run=cmd_webhooks_dead_letters)

    replay = sub.add_parser(
        "replay",
        parents=[common],
        help="deliver again one event (--event) or the events of a time range (--from, --to)",
    )
    replay.add_argument("endpoint_id", metavar="ID", type=endpoint_id)
    replay.add_argument(
        "--event",
        type=event_id,
        metavar="EVENT_ID",
        help="one event: <org_id>:<ms>-<n>, as in webhook-id and the dead letters",
    )
    replay.add_argument(
        "--from",
        dest="start",
        type=instant,
        metavar="TIME",
        help="the events appended from this time (ISO 8601 with offset), with --to",
    )
    replay.add_argument(
        "--to", dest="end", type=instant, metavar="TIME", help="... up to this time, included"
    )
    replay.add_argument(
        "--org",
        default="",
        help="the organization of the range (needed for an endpoint of every organization)",
    )
    replay.set_defaults(run=cmd_webhooks_replay)


def _print_secret_note(args: argparse.Namespace) -> None:
    # With --json on stderr, so that stdout stays one JSON document.
    print(render.SHOWN_ONCE_NOTE, file=sys.stderr if args.json else sys.stdout)


def cmd_webhooks_create(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.create_webhook_endpoint(
        args.url,
        org_id=args.org,
        event_types=args.types or (),
        description=args.description,
        disabled=args.disabled,
    )
    emit(args, response, lambda: render.render_with_secret(response.endpoint, response.secret))
    _print_secret_note(args)
    return EXIT_OK


def cmd_webhooks_list(client: PagemeterClient, args: argparse.Namespace) -> int:
    endpoints = page_or_all(
        args,
        args.org,
        client.list_webhook_endpoints,
        client.iter_webhook_endpoints,
        lambda every: webhooks_pb2.ListWebhookEndpointsResponse(endpoints=every),
    )
    return show(args, endpoints, render.render_endpoints)


def cmd_webhooks_show(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.get_webhook_endpoint(args.endpoint_id)
    return show(args, response, lambda got: render.render_endpoint(got.endpoint))


def cmd_webhooks_update(client: PagemeterClient, args: argparse.Namespace) -> int:
    event_types: list[str] | None = [] if args.all_types else args.types
    changes = (args.url, event_types, args.description, args.enabled)
    if all(change is None for change in changes):
        raise InputProblem(
            "name something to change: --url, --type or --all-types, --description, "
            "--enable or --disable"
        )
    response = client.update_webhook_endpoint(
        args.endpoint_id,
        url=args.url,
        event_types=event_types,
        description=args.description,
        enabled=args.enabled,
    )
    return show(args, response, lambda updated: render.render_endpoint(updated.endpoint))


def cmd_webhooks_delete(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.delete_webhook_endpoint(args.endpoint_id)
    return show(args, response, lambda deleted: render.render_deleted(args.endpoint_id, deleted))


def cmd_webhooks_rotate(client: PagemeterClient, args: argparse.Namespace) -> int:
    overlap = None if args.overlap_hours is None else round(args.overlap_hours * 3600)
    response = client.rotate_webhook_secret(args.endpoint_id, overlap=overlap)
    emit(args, response, lambda: render.render_with_secret(response.endpoint, response.secret))
    _print_secret_note(args)
    return EXIT_OK


def cmd_webhooks_deliveries(client: PagemeterClient, args: argparse.Namespace) -> int:
    deliveries = page_or_all(
        args,
        args.endpoint_id,
        client.list_webhook_deliveries,
        client.iter_webhook_deliveries,
        lambda every: webhooks_pb2.ListWebhookDeliveriesResponse(deliveries=every),
    )
    return show(args, deliveries, render.render_deliveries)


def cmd_webhooks_dead_letters(client: PagemeterClient, args: argparse.Namespace) -> int:
    dead_letters = page_or_all(
        args,
        args.endpoint_id,
        client.list_webhook_dead_letters,
        client.iter_webhook_dead_letters,
        lambda every: webhooks_pb2.ListWebhookDeadLettersResponse(dead_letters=every),
    )
    return show(args, dead_letters, render.render_dead_letters)


def _replay_range(args: argparse.Namespace) -> tuple[datetime, datetime] | None:
    """The time range of a replay, or None for one event; refuses every other mix."""
    has_range = args.start is not None or args.end is not None
    if args.event and has_range:
        raise InputProblem("name one event (--event) or a time range (--from, --to), not both")
    if args.event:
        return None
    if args.start is None or args.end is None:
        raise InputProblem("name one event (--event EVENT_ID), or a time range: --from and --to")
    if args.start > args.end:
        raise InputProblem("--from must not be after --to")
    start: datetime = args.start
    end: datetime = args.end
    return start, end


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def cmd_webhooks_replay(client: PagemeterClient, args: argparse.Namespace) -> int:
    span = _replay_range(args)
    if span is None:
        response = client.replay_webhook_events(
            args.endpoint_id, event_id=args.event, org_id=args.org
        )
        what = f"event {args.event}"
    else:
        start, end = span
        response = client.replay_webhook_events(
            args.endpoint_id, org_id=args.org, start_time=start, end_time=end
        )
        what = f"from {_utc(start)} to {_utc(end)}"
        if args.org:
            what += f" of {args.org}"
    return show(
        args, response, lambda replayed: render.render_replay(args.endpoint_id, what, replayed)
    )
