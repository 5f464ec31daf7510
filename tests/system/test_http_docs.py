"""docs/http.md's examples are commands: each runs, as written, against a real
`pagemeter-server` started as `make run` starts it, and answers what the page shows."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pagemeter_server.ops.embedded import free_port
from server_process import ServerProcess

DOC = Path(__file__).resolve().parents[2] / "docs" / "http.md"
DOC_BASE = "http://127.0.0.1:8080"
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def examples() -> list[tuple[str, str | None, str | None]]:
    """(command, expected kind, expected text) for each sh block, in page order."""
    blocks = _BLOCK.findall(DOC.read_text())
    found = []
    for index, (kind, text) in enumerate(blocks):
        if kind != "sh":
            continue
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if following is not None and following[0] in ("json", "text"):
            found.append((text, following[0], following[1]))
        else:
            found.append((text, None, None))
    return found


def contains(actual: Any, expected: Any) -> bool:
    """Whether `actual` has everything `expected` shows (objects may have more keys;
    lists match element by element, in order, from the start)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and contains(actual[key], value) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) >= len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=False))
        )
    return bool(actual == expected)


@pytest.fixture
def made_run(tmp_path: Path) -> Iterator[str]:
    """`make run`'s server (open access, embedded store, webhooks dispatched) on free
    ports; its HTTP base URL."""
    http = f"127.0.0.1:{free_port()}"
    server = ServerProcess.pagemeter(
        [
            "--dev-open-access",
            "--webhook-dispatch",
            "--http-listen",
            http,
            "--data-dir",
            str(tmp_path / "data"),
        ],
        tmp_path / "server.log",
    )
    server.start()
    try:
        server.wait_until_serving()
        yield f"http://{http}"
    finally:
        assert server.stop() == 0, server.log_tail()


def test_the_page_has_examples() -> None:
    """The page shows runnable examples, each with the answer it expects."""
    found = examples()
    assert len(found) >= 8
    assert all(kind is not None for _, kind, _ in found)


def test_every_example_runs_and_answers_what_the_page_shows(made_run: str) -> None:
    """Run in page order in one shell (later examples use the key an earlier one
    created), each example prints JSON containing what the page shows (or the text)."""
    found = examples()
    script = "set -eu\n" + "".join(
        f"printf '\\n@@example {number}@@\\n'\n{command.replace(DOC_BASE, made_run)}\n"
        for number, (command, _, _) in enumerate(found)
    )
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    outputs = re.split(r"\n@@example \d+@@\n", result.stdout)[1:]
    assert len(outputs) == len(found), result.stdout
    for (command, kind, expected), output in zip(found, outputs, strict=True):
        if kind == "json":
            assert expected is not None
            assert contains(json.loads(output), json.loads(expected)), (command, output)
        elif kind == "text":
            assert output.strip() == (expected or "").strip(), (command, output)


README = DOC.parents[1] / "README.md"


def readme_curl_block() -> str:
    """The README's block of curl commands (the quickstart against `make run`)."""
    blocks = [text for kind, text in _BLOCK.findall(README.read_text()) if kind == "sh"]
    curls = [text for text in blocks if text.lstrip().startswith("curl")]
    assert len(curls) == 1, "the README should show one block of curl commands"
    return str(curls[0])


def test_the_readme_curl_quickstart_works(made_run: str) -> None:
    """The README's curl commands, as written, set a plan, check, record 12 pages and
    read them back."""
    script = "set -eu\n" + readme_curl_block().replace(DOC_BASE, made_run)
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    usage = json.loads(_last_json(result.stdout))
    pages = next(m for m in usage["metrics"] if m["metric"] == "pages")
    assert pages["committed"] == "12"


def _last_json(output: str) -> str:
    """The last of several JSON documents printed back to back (curl adds no newline)."""
    decoder = json.JSONDecoder()
    position, last = 0, ""
    while position < len(output):
        while position < len(output) and output[position].isspace():
            position += 1
        if position >= len(output):
            break
        _, end = decoder.raw_decode(output, position)
        last, position = output[position:end], end
    return last
