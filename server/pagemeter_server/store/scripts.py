"""The Lua scripts: which there are, and where the text Redis runs is read from.

Scripts are loaded once per connection pool by redis-py's Script objects, which
run EVALSHA and reload the script on NOSCRIPT (after a Redis restart, for example).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from pagemeter_server.domain.periods import Month

ScriptReply = list[Any]
ScriptArg = str | int | float


def script_text(name: str) -> str:
    """The text script `name` ("check", "check_batch", ...) is loaded as.

    It is the file lua/built/<name>.lua, which `make scripts` (build_scripts.py)
    writes from the sources in lua/; a line number in a Redis error is a line of
    that file.
    """
    built = resources.files("pagemeter_server.store") / "lua" / "built" / f"{name}.lua"
    return built.read_text(encoding="utf-8")


SCRIPTS = (
    "check",
    "record",
    "release",
    "usage",
    "set_plan",
    "grant",
    "void_grant",
    "list_grants",
    "alerts",
    "adjust",
    "key_create",
    "key_revoke",
    "key_auth",
    "migrate_plan",
    "migrate_credits",
    "billing_close",
    # Webhook delivery (store/webhooks.py, docs/webhooks.md).
    "webhook_endpoint",
    "webhook_advance",
    "webhook_lease",
)
# Scripts that also run as batches of one organization's calls, as <name>_batch
# (see build_scripts.py).
BATCH_SCRIPTS = ("check", "record")
# Scripts whose every call may change what a caller is told was kept: with
# --replica-acks their acknowledgement waits for the replicas (replica_acks.py).
# check.lua changes state only when it places a hold (its callers say so).
CHANGING_SCRIPTS = frozenset(
    {
        "record",
        "record_batch",
        "release",
        "set_plan",
        "grant",
        "void_grant",
        "adjust",
        "alerts",
        "key_create",
        "key_revoke",
        "billing_close",
    }
)


@dataclass(frozen=True)
class PreparedCall:
    """One script call's keys and arguments, for a guess of the org's timezone.

    `month` is the month the keys name (the answer is read in it) and `timezone`
    the guess they were built for.
    """

    keys: list[str]
    args: list[ScriptArg]
    month: Month
    timezone: str
    # The instant the call decides at (a check's now, a record's completed_at).
    instant_ms: int = 0
