"""The committed Lua scripts Redis runs (store/lua/built) match what `make scripts` writes from their sources."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import redis

from pagemeter.v1 import quota_pb2
from pagemeter_server.domain.decisions import MetricCheck, MetricRecord
from pagemeter_server.store import build_scripts
from pagemeter_server.store.replies import (
    CHECK_COLUMNS,
    RECORD_COLUMNS,
    metric_check,
    metric_record,
    split_rows,
)
from pagemeter_server.store.scripts import BATCH_SCRIPTS, SCRIPTS, script_text

BUILT = Path(build_scripts.__file__).resolve().parent / "lua" / "built"
# Where Redis reports a line of a script: "user_script:<line>:".
SCRIPT_LINE = re.compile(r"user_script:(\d+):")


def test_built_scripts_match_their_sources() -> None:
    """Every file of store/lua/built is byte for byte what build_scripts makes, and there is none more."""
    stale = build_scripts.differences()
    assert not stale, f"run `make scripts` and commit the result (differ: {stale})"
    names = {path.stem for path in BUILT.glob("*.lua")}
    assert names == {*SCRIPTS, *(f"{name}_batch" for name in BATCH_SCRIPTS)}


def test_drift_check_fails_on_an_edited_built_script(tmp_path: Path) -> None:
    """The --check comparison is not vacuous: an edited, a missing and a left-over file are each reported."""
    build_scripts.write(tmp_path)
    assert build_scripts.differences(tmp_path) == []
    (tmp_path / "check.lua").write_text(script_text("check") + "-- edited\n")
    (tmp_path / "grant.lua").unlink()
    (tmp_path / "old.lua").write_text("return 1\n")
    assert build_scripts.differences(tmp_path) == ["check.lua", "grant.lua", "old.lua"]


def test_make_lint_runs_the_drift_check(repo_root: Path) -> None:
    """`make lint` runs build_scripts --check, and `make scripts` runs build_scripts."""
    makefile = (repo_root / "Makefile").read_text()
    lint = makefile[makefile.index("\nlint:") :].split("\n\n")[0]
    assert "-m pagemeter_server.store.build_scripts --check" in lint
    scripts = makefile[makefile.index("\nscripts:") :].split("\n\n")[0]
    assert "-m pagemeter_server.store.build_scripts" in scripts
    checked = subprocess.run(
        [sys.executable, "-m", "pagemeter_server.store.build_scripts", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_built_scripts_say_what_they_are_and_where_they_come_from() -> None:
    """Each built script opens with its header (KEYS, ARGV, returns), then the do-not-edit line naming its source."""
    for path in sorted(BUILT.glob("*.lua")):
        source = path.stem.removesuffix("_batch")
        text = path.read_text()
        header = text[: text.index("\n\n")]
        assert header.startswith(f"-- {path.name}") or header.startswith(f"-- {path.stem}:")
        assert "KEYS" in header and "ARGV[1]" in header and "Returns" in header, path.name
        assert (
            f"-- Generated from server/pagemeter_server/store/lua/{source}.lua by `make scripts`; "
            "do not edit." in header
        ), path.name


def test_reason_codes_in_lua_come_from_the_proto_enum() -> None:
    """Every DecisionReason value is a REASON_* constant of the scripts, and check.lua names no reason by number."""
    built = script_text("check")
    for value in quota_pb2.DecisionReason.DESCRIPTOR.values:
        short = value.name.removeprefix("DECISION_REASON_")
        assert f"\nlocal REASON_{short} = {value.number}\n" in built
    source = (BUILT.parent / "check.lua").read_text()
    assert re.findall(r"reason\s*=\s*'?\d", source) == []


def test_row_columns_are_the_answers_fields() -> None:
    """The declared row columns are exactly the fields of MetricCheck and MetricRecord, in their order."""
    assert [c.name for c in CHECK_COLUMNS] == [f.name for f in dataclasses.fields(MetricCheck)]
    assert [c.name for c in RECORD_COLUMNS] == [f.name for f in dataclasses.fields(MetricRecord)]


def test_rows_stored_before_the_planned_column_read_as_planned() -> None:
    """A record row of 13 columns (stored before `planned` existed) reads as planned; a short check row is an error."""
    (old,) = split_rows("pages,5,5,0,0,5,100,,0,0,0,M,0.03")
    assert metric_record(old).planned
    assert not metric_record([*old, "0"]).planned
    with pytest.raises(ValueError, match="lifetime"):
        metric_check(split_rows("pages,1,1,1,0,0,,,0,,,1,0,0,0,0")[0])


def test_package_data_ships_the_built_scripts(repo_root: Path) -> None:
    """pyproject's package data takes every built script (and the sources) into the wheel."""
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["pagemeter_server"]
    package = BUILT.parent.parent.parent
    for path in sorted(BUILT.parent.rglob("*.lua")):
        relative = PurePosixPath(path.relative_to(package).as_posix())
        assert any(
            len(relative.parts) == len(PurePosixPath(p).parts) and relative.match(p)
            for p in patterns
        ), relative


def error_line(message: str) -> int:
    found = SCRIPT_LINE.search(message)
    assert found, message
    return int(found.group(1))


def test_a_script_errors_line_is_a_line_of_its_built_file(redis_sync: redis.Redis) -> None:
    """A Lua error raised by check.lua reports the line of store/lua/built/check.lua that raised it."""
    keys = [f"pm:{{lines}}:k{i}" for i in range(10)]
    with pytest.raises(redis.ResponseError) as raised:
        redis_sync.eval(script_text("check"), len(keys), *keys, *["0"] * 10, "5")
    line = error_line(str(raised.value))
    built = (BUILT / "check.lua").read_text().splitlines()
    assert "check.lua: wrong number of KEYS or ARGV" in built[line - 1]


def test_a_batch_items_error_line_is_a_line_of_its_built_file(redis_sync: redis.Redis) -> None:
    """An item's error in check_batch reports the line of store/lua/built/check_batch.lua that raised it."""
    keys = [f"pm:{{lines}}:k{i}" for i in range(10)]
    args = ["1", "10", "11", *["0"] * 10, "5"]
    (reply,) = redis_sync.eval(script_text("check_batch"), len(keys), *keys, *args)
    assert reply[0] == "ERR"
    line = error_line(reply[1])
    built = (BUILT / "check_batch.lua").read_text().splitlines()
    assert "check.lua: wrong number of KEYS or ARGV" in built[line - 1]
