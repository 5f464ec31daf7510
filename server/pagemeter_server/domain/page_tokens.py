"""Page tokens: opaque to callers, bound to the list and the organization they page.

A token names the list it belongs to ("records", "audit", ...), the organization
and the position after which the next page starts. A token of one organization
(or of another list) handed to another is refused as one this service did not
issue, so a cursor can never be replayed across tenants or lists.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from pagemeter_server.domain.errors import BadPageToken

_VERSION = "p1"


def encode_page_token(kind: str, org_id: str, position: str) -> str:
    """The token of the page after `position` in list `kind` of `org_id`."""
    text = "\n".join((_VERSION, kind, org_id, position))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(token: str, kind: str, org_id: str) -> str:
    """The position a token carries; BadPageToken unless it was issued for this list and org."""
    try:
        padded = token + "=" * (-len(token) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode()
    except (ValueError, UnicodeError, binascii.Error) as exc:
        raise BadPageToken(token) from exc
    parts = text.split("\n")
    if len(parts) != 4 or parts[:3] != [_VERSION, kind, org_id] or not parts[3]:
        raise BadPageToken(token)
    return parts[3]


# Every answer must fit gRPC's 4 MiB message limit (the server's send limit and
# every default client's receive limit). A page is cut at this many bytes, which
# leaves room for the fields around the listed items.
ANSWER_BUDGET = 3 * 1024 * 1024


def items_that_fit(sizes: Iterable[int], budget: int = ANSWER_BUDGET) -> int:
    """How many of the items, in order, fit in `budget` bytes (always at least one).

    `sizes` are the items' encoded sizes; each also costs a few bytes of tag and
    length prefix in the repeated field.
    """
    used, count = 0, 0
    for size in sizes:
        used += size + 6
        if used > budget and count > 0:
            break
        count += 1
    return count
