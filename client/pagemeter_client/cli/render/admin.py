"""Keys, corrections and the audit trail."""

from __future__ import annotations

import argparse

from pagemeter.v1 import admin_pb2
from pagemeter_client.cli.render import text as fmt

SHOWN_ONCE = "This secret is shown once: pagemeter keeps only its digest and cannot show it again."


def _revoked_text(key: admin_pb2.ApiKey) -> str:
    return f"yes, at {fmt.when(key.revoked_at)}" if key.revoked else "no"


def api_key_fields(key: admin_pb2.ApiKey) -> list[tuple[str, str]]:
    return [
        ("key id", key.key_id),
        ("organization", key.org_id),
        ("name", key.name or "-"),
        ("created at", fmt.when(key.created_at)),
        ("last used at", fmt.when(key.last_used_at)),
        ("revoked", _revoked_text(key)),
    ]


def render_created_key(response: admin_pb2.CreateApiKeyResponse) -> str:
    return fmt.fields([*api_key_fields(response.key), ("secret", response.secret)]) + "\n"


def render_revoked_key(response: admin_pb2.RevokeApiKeyResponse) -> str:
    pairs = [
        *api_key_fields(response.key),
        ("already revoked", fmt.yes_no(response.already_revoked)),
    ]
    return fmt.fields(pairs)


def render_api_keys(response: admin_pb2.ListApiKeysResponse) -> str:
    if not response.keys:
        return "no API keys"
    rows = [
        [
            key.key_id,
            key.name or "-",
            fmt.when(key.created_at),
            fmt.when(key.last_used_at),
            fmt.when(key.revoked_at) if key.revoked else "-",
        ]
        for key in response.keys
    ]
    headers = ["key id", "name", "created at", "last used at", "revoked at"]
    return fmt.table(headers, rows, left=len(headers))


def render_adjustment(args: argparse.Namespace, response: admin_pb2.AdjustUsageResponse) -> str:
    return fmt.fields(
        [
            ("organization", args.org),
            ("metric", args.metric),
            ("period", response.period_id),
            ("committed before", str(response.committed_before)),
            ("committed after", str(response.committed_after)),
            ("duplicate", fmt.yes_no(response.duplicate)),
        ]
    )


def render_audit(response: admin_pb2.ListAuditEventsResponse) -> str:
    if not response.events:
        text = "no audit events"
    else:
        rows = [
            [fmt.when(e.at), e.actor, e.action, e.target or "-", e.reason or "-", e.event_id]
            for e in response.events
        ]
        headers = ["at", "actor", "action", "target", "reason", "event id"]
        text = fmt.table(headers, rows, left=len(headers))
    if response.next_page_token:
        text += f"\n\nnext page token: {response.next_page_token}"
    return text
