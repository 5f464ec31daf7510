"""The Lua scripts: where they are read from, and how batches are made of them.

Scripts are loaded once per connection pool by redis-py's Script objects, which
run EVALSHA and reload the script on NOSCRIPT (after a Redis restart, for example).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

ScriptReply = list[Any]
ScriptArg = str | int | float


def script_parts(name: str) -> tuple[str, str, str]:
    """(header comment, shared helpers, body) of a script file."""
    folder = resources.files("pagemeter_server.store") / "lua"
    lib = (folder / "_lib.lua").read_text(encoding="utf-8")
    lines = (folder / name).read_text(encoding="utf-8").splitlines(keepends=True)
    header_end = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return "".join(lines[:header_end]), lib, "".join(lines[header_end:])


def script_text(name: str) -> str:
    # The script's header comment stays first, so a script read back from Redis
    # still says what it is; the shared helpers go between header and body.
    header, lib, body = script_parts(name)
    return header + lib + body


_BATCH_TEMPLATE = """\
-- {name}_batch: {name}.lua applied to several calls of ONE organization in one
-- atomic script call, in order (a later item sees what an earlier one did).
-- Generated from {name}.lua when the store loads its scripts.
--
-- KEYS    the keys of every item, one item after the other (all under the
--         organization's hash tag, so the call stays on one cluster slot)
-- ARGV[1] item count N; ARGV[2 .. 1+2N] per item: its key count, its ARGV count;
--         then the ARGV of every item, one item after the other
--
-- Returns one reply per item, each what {name}.lua returns for it, or
-- {{'ERR', message}} for an item whose script raised an error (the other items
-- are not affected by it).
{lib}
local function one(KEYS, ARGV)
{body}
end

local count = tonumber(ARGV[1])
local replies = {{}}
local next_key, next_arg = 1, 2 + 2 * count
for i = 1, count do
  local nkeys, nargs = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local item_keys, item_args = {{}}, {{}}
  for k = 1, nkeys do
    item_keys[k] = KEYS[next_key + k - 1]
  end
  for a = 1, nargs do
    item_args[a] = ARGV[next_arg + a - 1]
  end
  next_key, next_arg = next_key + nkeys, next_arg + nargs
  local ok, reply = pcall(one, item_keys, item_args)
  if ok then
    replies[i] = reply
  else
    replies[i] = {{'ERR', tostring(reply)}}
  end
end
return replies
"""


def batch_script_text(name: str) -> str:
    _, lib, body = script_parts(f"{name}.lua")
    return _BATCH_TEMPLATE.format(name=name, lib=lib, body=body)


SCRIPTS = (
    "check",
    "record",
    "release",
    "usage",
    "set_plan",
    "grant",
    "adjust",
    "key_create",
    "key_revoke",
    "key_auth",
    "migrate_plan",
)
# Scripts that also run as batches of one organization's calls (see _BATCH_TEMPLATE).
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
        "adjust",
        "key_create",
        "key_revoke",
    }
)
