"""Writes the Lua scripts as Redis runs them: lua/built/<name>.lua.

Redis scripts cannot include one another, so each script Redis runs is put
together from parts declared once:

- the script's source, lua/<name>.lua: its header comment (KEYS, ARGV, what it
  returns) and its body;
- the shared helpers of lua/_lib.lua;
- declarations generated here: the DecisionReason codes of
  protos/pagemeter/v1/quota.proto as `local REASON_<NAME> = <number>`, and the
  functions that write a metric row (check_row, record_row) in the column order
  declared in store/replies.py;
- for check_batch and record_batch, the loop that runs the body once per item.

The result is committed, so that what Redis runs can be read and a line number
in a Redis error is a line of a file. `make scripts` writes the files; `make
lint` runs this with --check, which fails when a built file differs from what
its sources make:

    python -m pagemeter_server.store.build_scripts [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pagemeter.v1 import quota_pb2
from pagemeter_server.store.replies import CHECK_COLUMNS, RECORD_COLUMNS, Column
from pagemeter_server.store.scripts import BATCH_SCRIPTS, SCRIPTS

LUA_DIR = Path(__file__).resolve().parent / "lua"
BUILT_DIR = LUA_DIR / "built"


def _generated_note(sources: str) -> str:
    return (
        f"--\n"
        f"-- Generated from {sources} by `make scripts`; do not edit.\n"
        f"-- Built with server/pagemeter_server/store/lua/_lib.lua, the DecisionReason\n"
        f"-- codes of protos/pagemeter/v1/quota.proto and the row columns declared in\n"
        f"-- server/pagemeter_server/store/replies.py.\n"
    )


def _source_parts(name: str) -> tuple[str, str]:
    """(header comment, body) of lua/<name>.lua."""
    lines = (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8").splitlines(keepends=True)
    header_end = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return "".join(lines[:header_end]), "".join(lines[header_end:])


def reason_constants() -> str:
    """DecisionReason as Lua constants: DECISION_REASON_OVERAGE = 3 -> local REASON_OVERAGE = 3."""
    lines = ["-- DecisionReason (protos/pagemeter/v1/quota.proto)."]
    for value in quota_pb2.DecisionReason.DESCRIPTOR.values:
        short = value.name.removeprefix("DECISION_REASON_")
        lines.append(f"local REASON_{short} = {value.number}")
    return "\n".join(lines) + "\n"


_LUA_WRITERS = {
    "str": "r.{}",
    "int": "fmt(r.{})",
    "opt_int": "opt(r.{})",
    "bool": "bool01(r.{})",
    "period": "(r.{} and 'N' or 'M')",
    "windows": "r.{}",
}


def row_writer(function: str, columns: tuple[Column, ...], declared_as: str) -> str:
    """A Lua function writing one metric row from a table with the columns' names as fields."""
    names = [column.name for column in columns]
    listing = ["--  "]
    for name in names:
        if len(listing[-1]) + len(name) + 2 > 80:
            listing.append("--  ")
        listing[-1] += f" {name},"
    listing[-1] = listing[-1].removesuffix(",")
    parts = [_LUA_WRITERS[column.kind].format(column.name) for column in columns]
    body = " .. ',' ..\n    ".join(parts)
    return (
        f"-- {function}(r): one metric's row, the fields of r joined by ',' in the order of\n"
        f"-- {declared_as} (store/replies.py):\n"
        + "\n".join(listing)
        + f"\nlocal function {function}(r)\n  return {body}\nend\n"
    )


_ROW_WRITERS = (
    ("check_row", CHECK_COLUMNS, "CHECK_COLUMNS"),
    ("record_row", RECORD_COLUMNS, "RECORD_COLUMNS"),
)


def generated_declarations(body: str) -> str:
    """The reason constants, and the row writers `body` names: each local function
    is made anew on every script call, so a script carries only those it uses."""
    writers = [
        row_writer(function, columns, declared_as)
        for function, columns, declared_as in _ROW_WRITERS
        if re.search(rf"\b{function}\b", body)
    ]
    return "\n".join([reason_constants(), *writers])


def script(name: str) -> str:
    """What lua/built/<name>.lua holds for a single script."""
    header, body = _source_parts(name)
    lib = (LUA_DIR / "_lib.lua").read_text(encoding="utf-8")
    note = _generated_note(f"server/pagemeter_server/store/lua/{name}.lua")
    return f"{header}{note}\n{lib}\n{generated_declarations(body)}{body}"


_BATCH_HEADER = """\
-- {name}_batch: {name}.lua applied to several calls of ONE organization in one
-- atomic script call, in order (a later item sees what an earlier one did).
--
-- KEYS    the keys of every item, one item after the other (all under the
--         organization's hash tag, so the call stays on one cluster slot)
-- ARGV[1] item count N; ARGV[2 .. 1+2N] per item: its key count, its ARGV count;
--         then the ARGV of every item, one item after the other
--
-- Returns one reply per item, each what {name}.lua returns for it, or
-- {{'ERR', message}} for an item whose script raised an error (the other items
-- are not affected by it).
"""

_BATCH_LOOP = """\
local count = tonumber(ARGV[1])
local replies = {}
local next_key, next_arg = 1, 2 + 2 * count
for i = 1, count do
  local nkeys, nargs = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local item_keys, item_args = {}, {}
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
    replies[i] = {'ERR', tostring(reply)}
  end
end
return replies
"""


def batch_script(name: str) -> str:
    """What lua/built/<name>_batch.lua holds: the body of <name>.lua run once per item."""
    _, body = _source_parts(name)
    lib = (LUA_DIR / "_lib.lua").read_text(encoding="utf-8")
    note = _generated_note(f"server/pagemeter_server/store/lua/{name}.lua")
    return (
        f"{_BATCH_HEADER.format(name=name)}{note}\n{lib}\n{generated_declarations(body)}"
        f"\nlocal function one(KEYS, ARGV)\n{body}\nend\n\n{_BATCH_LOOP}"
    )


def built_scripts() -> dict[str, str]:
    """File name in lua/built -> its text, for every script Redis runs."""
    built = {f"{name}.lua": script(name) for name in SCRIPTS}
    built.update({f"{name}_batch.lua": batch_script(name) for name in BATCH_SCRIPTS})
    return built


def differences(folder: Path = BUILT_DIR) -> list[str]:
    """The files of `folder` that differ from what the sources make, missing, or left over."""
    wanted = built_scripts()
    present = {path.name for path in folder.glob("*.lua")} if folder.is_dir() else set()
    stale = [
        name
        for name, text in sorted(wanted.items())
        if name not in present or (folder / name).read_text(encoding="utf-8") != text
    ]
    return stale + sorted(present - wanted.keys())


def write(folder: Path = BUILT_DIR) -> None:
    folder.mkdir(exist_ok=True)
    wanted = built_scripts()
    for path in folder.glob("*.lua"):
        if path.name not in wanted:
            path.unlink()
    for name, text in wanted.items():
        target = folder / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when a built script differs from what its sources make",
    )
    options = parser.parse_args(argv)
    if not options.check:
        write()
        return 0
    stale = differences()
    if stale:
        print(
            f"{BUILT_DIR} is out of date with its sources ({', '.join(stale)}): "
            "run `make scripts` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
