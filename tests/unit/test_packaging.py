"""pyproject.toml builds with the pinned build backend without deprecated forms."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

# Build the metadata as `pip install -e .` does, with every setuptools warning an error.
BUILD_METADATA = """
import sys, tempfile, warnings
warnings.simplefilter("error")
from setuptools import build_meta
print(build_meta.prepare_metadata_for_build_wheel(tempfile.mkdtemp()))
"""


def test_metadata_builds_without_setuptools_deprecations() -> None:
    """setuptools builds the package metadata with warnings as errors (no license table, which setuptools stops accepting in February 2027) and writes the SPDX License-Expression."""
    built = subprocess.run(
        [sys.executable, "-c", BUILD_METADATA],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr[-3000:]


def test_build_backend_is_pinned_to_versions_with_spdx_licenses() -> None:
    """[build-system] asks for setuptools >= 77 (SPDX license expressions) below a tested major version, and the license is an SPDX expression string."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (backend,) = [Requirement(r) for r in project["build-system"]["requires"]]
    assert backend.name == "setuptools"
    assert not backend.specifier.contains(Version("76.1.0"))
    assert backend.specifier.contains(Version("77.0.3"))
    assert any(spec.operator == "<" for spec in backend.specifier), backend
    assert project["project"]["license"] == "LicenseRef-Proprietary"


BUILD_WHEEL = """
import sys
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1]))
"""


def test_the_wheel_carries_the_files_the_server_reads(tmp_path: Path) -> None:
    """A built (not editable) install has the Lua scripts and the OpenAPI document the
    HTTP/JSON API serves: without them an installed server could not start."""
    import zipfile

    built = subprocess.run(
        [sys.executable, "-c", BUILD_WHEEL, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = tmp_path / built.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pagemeter_server/gateway/openapi.json" in names
    assert "pagemeter_server/store/lua/built/record.lua" in names
    assert "pagemeter/v1/quota_pb2.py" in names
