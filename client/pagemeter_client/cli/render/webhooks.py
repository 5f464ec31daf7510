"""Webhook endpoints, their secrets, the delivery log, dead letters and replays."""

from __future__ import annotations

from pagemeter.v1 import webhooks_pb2
from pagemeter_client.cli.render import text as fmt

SHOWN_ONCE_NOTE = (
    "This signing secret is shown once: pagemeter does not show it again "
    "(`pagemeter webhooks rotate-secret` makes a new one)."
)
EVERY_ORGANIZATION = "(every organization)"
EVERY_TYPE = "(all)"


def _organization(org_id: str) -> str:
    return org_id or EVERY_ORGANIZATION


def _types(event_types: list[str]) -> str:
    return ", ".join(event_types) or EVERY_TYPE


def _secret_text(secret: webhooks_pb2.WebhookSecretInfo) -> str:
    """`a1b2c3d4 (current)`, or `... (signs until <time>)` for one in its overlap."""
    if secret.HasField("expires_at"):
        return f"{secret.secret_id} (signs until {fmt.when(secret.expires_at)})"
    return f"{secret.secret_id} (current)"


def endpoint_fields(endpoint: webhooks_pb2.WebhookEndpoint) -> list[tuple[str, str]]:
    return [
        ("endpoint id", endpoint.endpoint_id),
        ("organization", _organization(endpoint.org_id)),
        ("url", endpoint.url),
        ("event types", _types(list(endpoint.event_types))),
        ("description", endpoint.description or "-"),
        ("enabled", fmt.yes_no(endpoint.enabled)),
        ("created at", fmt.when(endpoint.created_at)),
        ("updated at", fmt.when(endpoint.updated_at)),
        ("signing secrets", ", ".join(_secret_text(s) for s in endpoint.secrets) or "-"),
    ]


def render_endpoint(endpoint: webhooks_pb2.WebhookEndpoint) -> str:
    return fmt.fields(endpoint_fields(endpoint))


def render_with_secret(endpoint: webhooks_pb2.WebhookEndpoint, secret: str) -> str:
    """The endpoint, then its new secret (a blank line before the note that follows)."""
    return fmt.fields([*endpoint_fields(endpoint), ("secret", secret)]) + "\n"


def render_endpoints(response: webhooks_pb2.ListWebhookEndpointsResponse) -> str:
    if not response.endpoints:
        text = "no webhook endpoints"
    else:
        rows = [
            [
                e.endpoint_id,
                _organization(e.org_id),
                fmt.yes_no(e.enabled),
                _types(list(e.event_types)),
                e.url,
                e.description or "-",
            ]
            for e in response.endpoints
        ]
        headers = ["endpoint id", "organization", "enabled", "event types", "url", "description"]
        text = fmt.table(headers, rows, left=len(headers))
    return _with_next_page(text, response.next_page_token)


def render_deleted(endpoint_id: str, response: webhooks_pb2.DeleteWebhookEndpointResponse) -> str:
    deleted = "yes" if response.deleted else "no (there was no such endpoint)"
    return fmt.fields([("endpoint id", endpoint_id), ("deleted", deleted)])


def render_deliveries(response: webhooks_pb2.ListWebhookDeliveriesResponse) -> str:
    if not response.deliveries:
        text = "no deliveries"
    else:
        rows = [
            [
                fmt.when(d.at),
                d.event_id,
                d.event_type,
                d.outcome,
                str(d.attempt),
                str(d.http_status) if d.http_status else "-",
                str(d.duration_ms),
                fmt.yes_no(d.replay),
                d.error or "-",
            ]
            for d in response.deliveries
        ]
        headers = ["at", "event id", "type", "outcome", "attempt", "http status", "ms"]
        headers += ["replay", "error"]
        text = _table_with_text_last(headers, rows, left=4)
    return _with_next_page(text, response.next_page_token)


def render_dead_letters(response: webhooks_pb2.ListWebhookDeadLettersResponse) -> str:
    if not response.dead_letters:
        text = "no dead letters"
    else:
        rows = [
            [fmt.when(d.at), d.event_id, d.event_type, str(d.attempts), d.last_error or "-"]
            for d in response.dead_letters
        ]
        headers = ["given up at", "event id", "type", "attempts", "last error"]
        text = _table_with_text_last(headers, rows, left=3)
    return _with_next_page(text, response.next_page_token)


def render_replay(
    endpoint_id: str, what: str, response: webhooks_pb2.ReplayWebhookEventsResponse
) -> str:
    pairs = [("replay id", response.replay_id), ("endpoint id", endpoint_id), ("events", what)]
    note = (
        "Queued: the dispatchers deliver these events again, in order, each with the "
        "webhook-id it had (receivers deduplicate by it)."
    )
    return f"{fmt.fields(pairs)}\n\n{note}"


def _table_with_text_last(headers: list[str], rows: list[list[str]], *, left: int) -> str:
    """A table whose first `left` columns are text, then figures, then one text column
    (the error) that is left as it is, after the others."""
    figures = fmt.table(headers[:-1], [row[:-1] for row in rows], left=left)
    lines = figures.splitlines()
    width = max(len(line) for line in lines)
    last = [headers[-1], *(row[-1] for row in rows)]
    return "\n".join(
        f"{line.ljust(width)}  {cell}".rstrip() for line, cell in zip(lines, last, strict=True)
    )


def _with_next_page(text: str, token: str) -> str:
    return f"{text}\n\nnext page token: {token}" if token else text
