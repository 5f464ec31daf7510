"""Generate pagemeter's blocking client from its async source.

    python tools/unasync.py          # write client/pagemeter_client/_sync/ (`make unasync`)
    python tools/unasync.py --check  # fail if _sync/ is not what _async/ generates (`make lint`)

Every module of client/pagemeter_client/_async/ (but __init__.py, written by
hand on both sides) becomes the module of the same name in _sync/ by a few
word-level rewrites (async def -> def, await dropped, AsyncX -> X, x_async ->
x_sync, ...), then ruff sorts its imports and formats it. Where the two clients
really differ (tasks or threads, a lazy or an eager channel) the async source
calls a pair from pagemeter_client._concurrency or pagemeter_client._channel, so
no module needs a hand-written blocking twin.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client" / "pagemeter_client" / "_async"
TARGET = ROOT / "client" / "pagemeter_client" / "_sync"

# (pattern, replacement), applied in this order to the whole text of a module.
REWRITES: list[tuple[str, str]] = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\b__aiter__\b", "__iter__"),
    (r"\b__anext__\b", "__next__"),
    (r"\basynccontextmanager\b", "contextmanager"),
    (r"\bgrpc\.aio\.AioRpcError\b", "grpc.RpcError"),
    (r"`grpc\.aio`", "`grpc`"),
    # QuotaServiceAsyncStub -> QuotaServiceStub (the generated gRPC stubs)
    (r"\b(\w+)AsyncStub\b", r"\1Stub"),
    # AsyncPagemeterClient -> PagemeterClient, AsyncIterator -> Iterator, ...
    (r"\bAsync([A-Z]\w*)", r"\1"),
    # replay_async -> replay_sync, and the package: pagemeter_client._async -> ._sync
    (r"(\w*)_async\b", r"\1_sync"),
    # An async generator cannot `yield from`; a blocking one can (and ruff wants it to).
    (r"^( *)for (\w+) in (.+):\n\1    yield \2\n", r"\1yield from \3\n"),
]
COMPILED = [(re.compile(pattern, re.MULTILINE), replacement) for pattern, replacement in REWRITES]


def header(source: Path) -> str:
    where = source.relative_to(ROOT).as_posix()
    return f"# Generated from {where} by `make unasync`; do not edit.\n"


def rewrite(text: str) -> str:
    for pattern, replacement in COMPILED:
        text = pattern.sub(replacement, text)
    return text


def ruff(arguments: list[str], text: str, filename: Path) -> str:
    """`text` passed through ruff (the project's settings, as if it were `filename`)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *arguments, "--stdin-filename", str(filename), "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"ruff {' '.join(arguments)} failed on {filename}:\n{done.stderr}")
    return done.stdout


def generate(source: Path) -> str:
    target = TARGET / source.name
    text = header(source) + rewrite(source.read_text(encoding="utf-8"))
    text = ruff(["check", "--quiet", "--fix-only", "--select", "I,F401"], text, target)
    return ruff(["format", "--quiet"], text, target)


def modules(folder: Path) -> set[Path]:
    """The generated modules' places: every module but the hand-written __init__.py."""
    return {path for path in folder.glob("*.py") if path.name != "__init__.py"}


def expected() -> dict[Path, str]:
    return {TARGET / source.name: generate(source) for source in sorted(modules(SOURCE))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if _sync/ differs from what _async/ generates"
    )
    arguments = parser.parse_args(argv)
    wanted = expected()
    present = modules(TARGET)
    if arguments.check:
        stale = sorted(present - set(wanted))
        drift = [path for path, text in wanted.items() if _read(path) != text]
        for path in drift:
            sys.stdout.writelines(
                difflib.unified_diff(
                    _read(path).splitlines(keepends=True),
                    wanted[path].splitlines(keepends=True),
                    fromfile=f"{path.relative_to(ROOT)} (on disk)",
                    tofile=f"{path.relative_to(ROOT)} (generated)",
                )
            )
        for path in stale:
            print(f"{path.relative_to(ROOT)}: no module of _async/ generates it")
        if drift or stale:
            print("the blocking client is out of date: run `make unasync`", file=sys.stderr)
            return 1
        return 0
    TARGET.mkdir(exist_ok=True)
    for path in present - set(wanted):
        path.unlink()
    for path, text in wanted.items():
        if _read(path) != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


if __name__ == "__main__":
    sys.exit(main())
