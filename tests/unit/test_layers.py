"""The layer contract of `make lint` catches an upward import (decision 28).

import-linter runs on a copy of the packages with one import added that breaks
a layer rule; it must fail and name the import. The unchanged copy passes, so
the failure is the added import's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_copy(
    tmp_path: Path, additions: list[tuple[str, str]] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the project's import contracts on a copy of the packages, each `line` of
    `additions` appended to its `module` (a path below server/ or client/)."""
    for folder, package in (("server", "pagemeter_server"), ("client", "pagemeter_client")):
        shutil.copytree(ROOT / folder / package, tmp_path / folder / package)
    for module, line in additions or []:
        with (tmp_path / module).open("a", encoding="utf-8") as source:
            source.write(f"\n{line}\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tmp_path / "server"), str(tmp_path / "client"), str(ROOT / "client")]
        ),
    }
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_packages_as_they_are_keep_every_contract(tmp_path: Path) -> None:
    """The unchanged copy passes: the failures below come from the added imports."""
    result = lint_copy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# (module, added line, what import-linter must say about it)
UPWARD_IMPORTS = [
    (
        "server/pagemeter_server/domain/periods.py",
        "from pagemeter_server.api import quota",
        "pagemeter_server.domain is not allowed to import pagemeter_server.api",
    ),
    (
        "server/pagemeter_server/store/keys.py",
        "from pagemeter_server.ops import metrics",
        "pagemeter_server.store is not allowed to import pagemeter_server.ops",
    ),
    (
        "server/pagemeter_server/ops/logs.py",
        "from pagemeter_server.api import auth",
        "pagemeter_server.ops is not allowed to import pagemeter_server.api",
    ),
    (
        "server/pagemeter_server/domain/plans.py",
        "import redis",
        "pagemeter_server.domain is not allowed to import redis",
    ),
    (
        "server/pagemeter_server/store/keys.py",
        "import grpc",
        "pagemeter_server.store is not allowed to import grpc",
    ),
    (
        "server/pagemeter_server/api/convert.py",
        "from pagemeter_server import app",
        "pagemeter_server.api is not allowed to import pagemeter_server.app",
    ),
    (
        "server/pagemeter_server/settings.py",
        "from pagemeter_server.domain import periods",
        "pagemeter_server.settings is not allowed to import pagemeter_server.domain",
    ),
    (
        "client/pagemeter_client/outbox.py",
        "import pagemeter_server.settings",
        "pagemeter_client is not allowed to import pagemeter_server",
    ),
]


def test_each_import_against_the_layers_fails_lint(tmp_path: Path) -> None:
    """A lower layer importing a higher one (or gRPC/Redis where they do not belong) breaks
    lint: with all eight added to one copy (one import-linter run, not eight), each is
    named in the report."""
    result = lint_copy(tmp_path, [(module, line) for module, line, _ in UPWARD_IMPORTS])
    assert result.returncode != 0
    report = " ".join(result.stdout.split())
    missed = [complaint for _, _, complaint in UPWARD_IMPORTS if complaint not in report]
    assert not missed, f"not reported: {missed}\n{result.stdout}"
