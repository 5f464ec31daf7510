"""The committed generated code matches the protos, and the protos pass buf's STANDARD lint."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BIN_DIR = Path(sys.executable).parent
GENERATED_PACKAGE = Path("pagemeter") / "v1"
# Files in client/pagemeter/v1 that protoc does not write.
HAND_WRITTEN = {"__init__.py"}

# buf's STANDARD rules exactly, whatever buf.yaml says (PRODUCT.md's requirement).
STANDARD_LINT_CONFIG = json.dumps(
    {"version": "v2", "modules": [{"path": "protos"}], "lint": {"use": ["STANDARD"]}}
)


def proto_recipe(repo_root: Path) -> list[str]:
    """The command of the Makefile's `proto` target, as tokens (make variables unexpanded)."""
    lines = (repo_root / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^proto\s*:", line))
    recipe: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    command = " ".join(part.removesuffix("\\").strip() for part in recipe)
    assert command, "the Makefile's proto target has no recipe"
    return shlex.split(command)


def expand(token: str, values: dict[str, str]) -> list[str]:
    """Expand the make variables of one token; a token that is only $(PROTO_SRC) becomes many."""
    if token == "$(PROTO_SRC)":
        return values["PROTO_SRC"].split()

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            pytest.fail(f"the Makefile's proto recipe uses $({name}); teach this test about it")
        return values[name]

    return [re.sub(r"\$\((\w+)\)", replace, token)]


def regenerate(repo_root: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run the Makefile's proto command with the generated code going to out_dir."""
    sources = sorted(
        str(p.relative_to(repo_root)) for p in (repo_root / "protos/pagemeter/v1").glob("*.proto")
    )
    assert sources, "no .proto files under protos/pagemeter/v1"
    values = {"BIN": str(BIN_DIR), "GEN_DIR": str(out_dir), "PROTO_SRC": " ".join(sources)}
    command = [part for token in proto_recipe(repo_root) for part in expand(token, values)]
    return subprocess.run(
        command, cwd=repo_root, capture_output=True, text=True, timeout=60, check=False
    )


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.name not in HAND_WRITTEN
    }


def buf(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    executable = BIN_DIR / "buf"
    assert os.access(executable, os.X_OK), f"no buf binary at {executable}: run `make install`"
    return subprocess.run(
        [str(executable), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "BUF_CACHE_DIR": str(cache)},
    )


def test_proto_recipe_is_protoc_with_python_grpc_and_mypy_outputs(repo_root: Path) -> None:
    """The Makefile's proto target runs grpc_tools.protoc from protos/ with the python, grpc and both mypy outputs."""
    recipe = proto_recipe(repo_root)
    assert recipe[:3] == ["$(BIN)/python", "-m", "grpc_tools.protoc"]
    assert "-Iprotos" in recipe
    for option in ("--python_out", "--grpc_python_out", "--mypy_out", "--mypy_grpc_out"):
        assert f"{option}=$(GEN_DIR)" in recipe, option


def test_committed_generated_code_matches_protos(repo_root: Path, tmp_path: Path) -> None:
    """Regenerating from protos/ gives exactly the committed files of client/pagemeter/v1, byte for byte."""
    result = regenerate(repo_root, tmp_path)
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"
    fresh = generated_files(tmp_path / GENERATED_PACKAGE)
    committed = generated_files(repo_root / "client" / GENERATED_PACKAGE)
    assert fresh, "protoc wrote nothing"
    missing = sorted(fresh.keys() - committed.keys())
    stale = sorted(committed.keys() - fresh.keys())
    changed = sorted(
        name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name]
    )
    assert not (missing or stale or changed), (
        "client/pagemeter/v1 is out of date with protos/: run `make proto` and commit the result "
        f"(not committed: {missing}, no longer generated: {stale}, differ: {changed})"
    )


def test_buf_lint_passes_with_repository_config(repo_root: Path, tmp_path: Path) -> None:
    """`buf lint` with the repository's buf.yaml (as `make lint` runs it) reports nothing."""
    result = buf(["lint"], repo_root, tmp_path)
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"


def test_buf_lint_passes_standard_rules(repo_root: Path, tmp_path: Path) -> None:
    """The protos pass buf's STANDARD lint rules with no exceptions, independent of edits to buf.yaml."""
    # Only pagemeter's own files: google/api (copied by `make proto`) is Google's.
    result = buf(
        ["lint", "--config", STANDARD_LINT_CONFIG, "--path", "protos/pagemeter"],
        repo_root,
        tmp_path / "cache",
    )
    assert result.returncode == 0, f"buf lint (STANDARD) failed:\n{result.stdout}{result.stderr}"


def test_standard_lint_check_catches_violations(tmp_path: Path) -> None:
    """The STANDARD lint run above is not vacuous: it rejects a proto with a bad enum zero value and RPC types."""
    package = tmp_path / "protos" / "pagemeter" / "v1"
    package.mkdir(parents=True)
    (package / "bad.proto").write_text(
        'syntax = "proto3";\n'
        "package pagemeter.v1;\n"
        "enum Colour { RED = 0; }\n"
        "message Thing {}\n"
        "service ThingService { rpc Get(Thing) returns (Thing); }\n"
    )
    result = buf(["lint", "--config", STANDARD_LINT_CONFIG], tmp_path, tmp_path / "cache")
    assert result.returncode != 0
    assert "_UNSPECIFIED" in result.stdout and "GetRequest" in result.stdout, result.stdout


RELEASED_CONTRACT = Path("protos") / "released" / "pagemeter-v1.json"


def buf_breaking(repo_root: Path, tmp_path: Path, edit: tuple[str, str] | None) -> int:
    """`buf breaking` against the released contract, on a copy of the protos with `edit`
    (old text, new text in quota.proto) applied."""
    copy = tmp_path / "protos"
    subprocess.run(["cp", "-r", str(repo_root / "protos"), str(copy)], check=True)
    (tmp_path / "buf.yaml").write_text((repo_root / "buf.yaml").read_text())
    if edit:
        quota = copy / "pagemeter" / "v1" / "quota.proto"
        text = quota.read_text()
        assert edit[0] in text
        quota.write_text(text.replace(edit[0], edit[1], 1))
    against = repo_root / RELEASED_CONTRACT
    result = subprocess.run(
        [str(BIN_DIR / "buf"), "breaking", "--against", str(against)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode


@pytest.mark.parametrize(
    ("edit", "breaks"),
    [
        (None, False),
        (("  bool allowed = 2;", "  int32 allowed = 2;"), True),  # a field's type
        (("  string overage_price_per_unit = 16;\n", ""), True),  # a field removed
        (("  DECISION_REASON_FAIL_OPEN = 9;", "  DECISION_REASON_OPEN = 9;"), True),
    ],
    ids=["as-is", "type-changed", "field-removed", "enum-renamed"],
)
def test_a_contract_change_that_breaks_clients_fails_lint(
    tmp_path: Path, edit: tuple[str, str] | None, breaks: bool
) -> None:
    """make lint's `buf breaking` passes the contract as it is and refuses changes that would break clients of the released one."""
    repo_root = Path(__file__).resolve().parents[2]
    assert (buf_breaking(repo_root, tmp_path, edit) != 0) == breaks
