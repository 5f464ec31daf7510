"""The `pagemeter` CLI with credentials and TLS, against real servers that enforce them.

`cli.main([...])` runs in a thread (the servers live on the test's event loop)
with its output captured; every run also checks that the token it was given,
by flag or by environment, appears nowhere in what it printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pagemeter_client import AsyncPagemeterClient, cli
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from tests.client.test_client_auth import (
    ADMIN_TOKEN,
    SERVICE_TOKEN,
    WRONG_TOKEN,
    Pki,
    make_pki,
    secured_server,
)
from tests.conftest import eagle_plan

# Starts processes or a topology of its own: the system tier (not in make test-fast).
SYSTEM = pytest.mark.system

CLIENT_ENV = (
    "PAGEMETER_TARGET",
    "PAGEMETER_TOKEN",
    "PAGEMETER_TLS",
    "PAGEMETER_TLS_CA",
    "PAGEMETER_TLS_CLIENT_CERT",
    "PAGEMETER_TLS_CLIENT_KEY",
    "PAGEMETER_TLS_SERVER_NAME",
)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        """The output parsed as JSON (any JSON value: the command's document)."""
        return json.loads(self.out)


def row(text: str, label: str) -> list[str]:
    """The cells after `label` on the line that starts with it."""
    line = next(line for line in text.splitlines() if line.startswith(label))
    return line.removeprefix(label).split()


class Cli:
    """Runs `pagemeter --target <server> ...` in a thread; checks the token is never printed."""

    def __init__(self, target: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.target = target
        self.capsys = capsys

    async def __call__(self, *argv: str) -> Run:
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["--target", self.target, *argv])
        captured = self.capsys.readouterr()
        run = Run(code, captured.out, captured.err)
        tokens = {os.environ.get("PAGEMETER_TOKEN", "")}
        tokens.update(argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--token")
        for token in tokens - {""}:
            assert token not in run.out and token not in run.err, f"token printed by {argv}"
        return run


def unreached(run: Run) -> bool:
    """The call failed without reaching the server (retried until the deadline or not), with the hint."""
    first, *rest = run.err.splitlines()
    return (
        run.code == 1
        and first.startswith(("error: UNAVAILABLE: ", "error: DEADLINE_EXCEEDED: "))
        and rest[-1].startswith("  hint: is the server at 127.0.0.1:")
    )


@pytest.fixture(autouse=True)
def client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PAGEMETER_* client settings from the developer's shell."""
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def plain(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
) -> AsyncIterator[Cli]:
    """The CLI pointed at a plaintext server that enforces tokens."""
    async with secured_server(settings.redis_url, redis_client, clock) as target:
        yield Cli(target, capsys)


@pytest.fixture
async def tls(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
    pki: Pki,
) -> AsyncIterator[Cli]:
    """The CLI pointed at a TLS server (certificate for 127.0.0.1) that enforces tokens."""
    async with secured_server(settings.redis_url, redis_client, clock, pki=pki) as target:
        yield Cli(target, capsys)


@pytest.fixture
async def mtls(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
    pki: Pki,
) -> AsyncIterator[Cli]:
    """The CLI pointed at a mutual-TLS server that enforces tokens."""
    async with secured_server(
        settings.redis_url, redis_client, clock, pki=pki, mutual=True
    ) as target:
        yield Cli(target, capsys)


async def set_plan(target: str, **tls: object) -> None:
    async with AsyncPagemeterClient(target, token=ADMIN_TOKEN, **tls) as admin:  # type: ignore[arg-type]
        await admin.set_plan(eagle_plan())


# -- credentials ------------------------------------------------------------------------------


async def test_token_from_environment_or_flag_over_tls(
    tls: Cli, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --tls-ca the CLI talks TLS, and takes its token from PAGEMETER_TOKEN or --token."""
    ca = ["--tls-ca", str(pki.ca_file)]
    by_flag = await tls("credits", "grant", "acme", "pages", "5", "--grant-id", "g1", *ca)
    assert by_flag.code == 1 and "UNAUTHENTICATED" in by_flag.err  # no token yet
    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    await set_plan(tls.target, tls=True, root_certificates=pki.ca_pem)
    granted = await tls("credits", "grant", "acme", "pages", "5", "--grant-id", "g1", *ca)
    assert granted.code == 0, granted.err
    assert row(granted.out, "balance:") == ["5"]
    monkeypatch.delenv("PAGEMETER_TOKEN")
    usage = await tls("--token", SERVICE_TOKEN, *ca, "usage", "acme", "--json")
    assert usage.code == 0, usage.err
    assert usage.json()["org_id"] == "acme"


async def test_missing_or_wrong_token_is_one_line_and_never_echoed(
    plain: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a token or with a wrong one, the CLI prints one UNAUTHENTICATED line naming PAGEMETER_TOKEN and exits 1, without printing the token."""
    missing = await plain("usage", "acme")
    assert missing.code == 1 and missing.out == ""
    (line,) = missing.err.splitlines()
    assert line.startswith("error: UNAUTHENTICATED: missing credentials")
    assert line.endswith("(set PAGEMETER_TOKEN, or --token, to a valid token or API key)")

    wrong = await plain("usage", "acme", "--token", WRONG_TOKEN)
    assert wrong.code == 1
    (line,) = wrong.err.splitlines()
    assert line.startswith("error: UNAUTHENTICATED: the credential is not valid")

    monkeypatch.setenv("PAGEMETER_TOKEN", WRONG_TOKEN)
    from_env = await plain("plan", "get", "acme")
    assert from_env.code == 1 and from_env.err == wrong.err


async def test_access_errors_are_one_line(
    plain: Cli,
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PERMISSION_DENIED (a service token changing a plan) and RESOURCE_EXHAUSTED (a key over its read limit) are one line each, exit 1."""
    monkeypatch.setenv("PAGEMETER_TOKEN", SERVICE_TOKEN)
    denied = await plain("plan", "set", "acme", "--name", "X", "--metric", "pages:quota=1")
    assert denied.code == 1
    assert denied.err.splitlines() == [
        "error: PERMISSION_DENIED: service credentials may not call SetPlan"
    ]

    async with secured_server(
        settings.redis_url, redis_client, clock, read_rate_limit=1, read_burst=1
    ) as target:
        async with AsyncPagemeterClient(target, token=ADMIN_TOKEN) as admin:
            key = await admin.create_api_key("acme")
        monkeypatch.setenv("PAGEMETER_TOKEN", key.secret)
        limited = Cli(target, capsys)
        first = await limited("usage")
        assert first.code == 0, first.err
        flooded = await limited("usage")
    assert flooded.code == 1
    (line,) = flooded.err.splitlines()
    assert line.startswith("error: RESOURCE_EXHAUSTED: too many reads with this API key; retry in")


async def test_bad_token_and_help_never_show_the_token(
    plain: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that cannot be sent is refused with exit 2 without echoing it, and --help does not show the one in PAGEMETER_TOKEN."""
    spaced = f"{ADMIN_TOKEN} extra"
    bad = await plain("--token", spaced, "usage", "acme")
    assert bad.code == 2 and bad.out == ""
    assert "token must be a non-empty string of printable ASCII" in bad.err
    assert ADMIN_TOKEN not in bad.err

    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    for argv in (["--help"], ["usage", "--help"], ["keys", "create", "--help"]):
        shown = await plain(*argv)
        assert shown.code == 0 and "PAGEMETER_TOKEN" in shown.out


# -- TLS ------------------------------------------------------------------------------------------


async def test_tls_options_and_their_environment(
    tls: Cli, pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The TLS server is reached with --tls-ca or PAGEMETER_TLS_CA; plaintext, the system's CAs, a missing file or a wrong server name fail."""
    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    await set_plan(tls.target, tls=True, root_certificates=pki.ca_pem)

    plaintext = await tls("usage", "acme", "--timeout", "0.3")
    assert unreached(plaintext)
    system_roots = await tls("usage", "acme", "--tls", "--timeout", "0.3")
    assert unreached(system_roots)

    by_flag = await tls("usage", "acme", "--tls-ca", str(pki.ca_file))
    assert by_flag.code == 0, by_flag.err
    assert row(by_flag.out, "organization:") == ["acme"]

    monkeypatch.setenv("PAGEMETER_TLS_CA", str(pki.ca_file))
    by_env = await tls("usage", "acme")
    assert by_env.code == 0, by_env.err
    wrong_name = await tls(
        "usage", "acme", "--tls-server-name", "elsewhere.test", "--timeout", "0.3"
    )
    assert unreached(wrong_name)
    right_name = await tls("usage", "acme", "--tls-server-name", "localhost")
    assert right_name.code == 0, right_name.err

    missing = await tls("usage", "acme", "--tls-ca", str(tmp_path / "nope.pem"))
    assert missing.code == 2
    assert missing.err.startswith(f"pagemeter: error: cannot read the --tls-ca file {tmp_path}")


async def test_mutual_tls_with_client_certificate_options(
    mtls: Cli, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With mutual TLS the CLI needs --tls-cert and --tls-key (or PAGEMETER_TLS_CLIENT_CERT/KEY); one without the other exits 2."""
    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("PAGEMETER_TLS_CA", str(pki.ca_file))
    without = await mtls("usage", "acme", "--timeout", "0.3")
    assert unreached(without)

    client = ["--tls-cert", str(pki.client_cert_file), "--tls-key", str(pki.client_key_file)]
    with_flags = await mtls("usage", "acme", *client)
    assert with_flags.code == 0, with_flags.err

    half = await mtls("usage", "acme", "--tls-cert", str(pki.client_cert_file))
    assert half.code == 2 and "--tls-cert and --tls-key go together" in half.err

    monkeypatch.setenv("PAGEMETER_TLS_CLIENT_CERT", str(pki.client_cert_file))
    monkeypatch.setenv("PAGEMETER_TLS_CLIENT_KEY", str(pki.client_key_file))
    with_env = await mtls("usage", "acme", "--json")
    assert with_env.code == 0, with_env.err
    assert with_env.json()["org_id"] == "acme"


# -- keys, tenant reads, corrections and the audit trail -----------------------------------------


async def test_keys_create_list_revoke_and_tenant_reads(
    tls: Cli, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keys create shows the secret once with a warning, the key reads its org with ORG left out, keys list shows it, and keys revoke stops it."""
    monkeypatch.setenv("PAGEMETER_TLS_CA", str(pki.ca_file))
    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    await set_plan(tls.target, tls=True, root_certificates=pki.ca_pem)
    await tls("record", "acme", "job-1", "pages=4", "--document-type", "invoice")

    created = await tls("keys", "create", "acme", "--name", "billing page")
    assert created.code == 0, created.err
    (secret,) = row(created.out, "secret:")
    assert secret.startswith("pmk_")
    assert row(created.out, "name:") == ["billing", "page"]
    assert created.out.rstrip().endswith(
        "This secret is shown once: pagemeter keeps only its digest and cannot show it again."
    )
    (key_id,) = row(created.out, "key id:")

    as_json = await tls("keys", "create", "acme", "--json")
    assert as_json.code == 0 and str(as_json.json()["secret"]).startswith("pmk_")
    assert "cannot show it again" in as_json.err

    listing = await tls("keys", "list", "acme")
    assert listing.code == 0, listing.err
    assert listing.out.splitlines()[0].split() == [
        "key", "id", "name", "created", "at", "last", "used", "at", "revoked", "at",
    ]  # fmt: skip
    assert row(listing.out, key_id)[:2] == ["billing", "page"]
    assert secret not in listing.out
    listed = await tls("keys", "list", "acme", "--json")
    keys = listed.json()["keys"]
    assert isinstance(keys, list) and len(keys) == 2

    monkeypatch.setenv("PAGEMETER_TOKEN", secret)
    usage = await tls("usage")
    assert usage.code == 0, usage.err
    assert row(usage.out, "organization:") == ["acme"]
    assert row(usage.out, "committed (quotaUsed)") == ["0", "4"]
    for argv in (["history", "--months", "2"], ["stats", "--json"], ["records", "--all"]):
        read = await tls(*argv)
        assert read.code == 0, (argv, read.err)
    records = await tls("records", "--json")
    assert [r["request_id"] for r in records.json()["records"]] == ["job-1"]
    named = await tls("usage", "acme")
    assert named.code == 2 and "leave ORG out" in named.err
    write = await tls("check", "acme", "pages=1")
    assert write.code == 1
    assert write.err.startswith("error: PERMISSION_DENIED: tenant credentials may not call")

    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    revoked = await tls("keys", "revoke", "acme", key_id)
    assert revoked.code == 0, revoked.err
    assert row(revoked.out, "revoked:")[:2] == ["yes,", "at"]
    assert row(revoked.out, "already revoked:") == ["no"]
    again = await tls("keys", "revoke", "acme", key_id, "--json")
    assert again.json()["already_revoked"] is True

    monkeypatch.setenv("PAGEMETER_TOKEN", secret)
    refused = await tls("usage")
    assert refused.code == 1
    (line,) = refused.err.splitlines()
    assert line.startswith("error: UNAUTHENTICATED: the API key is not valid")


async def test_reads_need_org_unless_the_token_is_a_tenant_key(
    plain: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """usage, history, stats and records without ORG exit 2 unless the token is a tenant API key; nothing is sent."""
    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    for command in ("usage", "history", "stats", "records"):
        run = await plain(command)
        assert run.code == 2 and run.out == ""
        assert "ORG is required; it may be left out only with a tenant API key" in run.err


async def test_adjust_corrects_usage_once_per_id(
    plain: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """adjust adds or removes (negative UNITS) committed units of a month once per --id, and needs --reason."""
    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    await set_plan(plain.target)
    added = await plain(
        "adjust", "acme", "pages", "12", "--reason", "missed job", "--id", "a1",
        "--year", "2026", "--month", "3",
    )  # fmt: skip
    assert added.code == 0, added.err
    assert row(added.out, "period:") == ["2026-03"]
    assert row(added.out, "committed before:") == ["0"]
    assert row(added.out, "committed after:") == ["12"]
    assert row(added.out, "duplicate:") == ["no"]

    removed = await plain("adjust", "acme", "pages", "-5", "--reason", "ticket 7", "--id", "a2")
    assert removed.code == 0, removed.err
    assert row(removed.out, "committed after:") == ["7"]
    again = await plain(
        "adjust", "acme", "pages", "-5", "--reason", "ticket 7", "--id", "a2", "--json"
    )
    assert again.json()["duplicate"] is True and again.json()["committed_after"] == "7"

    no_reason = await plain("adjust", "acme", "pages", "3", "--id", "a3")
    assert no_reason.code == 2 and "--reason" in no_reason.err
    not_a_number = await plain("adjust", "acme", "pages", "many", "--reason", "x", "--id", "a4")
    assert not_a_number.code == 2


async def test_audit_lists_changes_page_by_page(
    plain: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit prints the trail newest first with who did what, a next page token, and with --all every event."""
    monkeypatch.setenv("PAGEMETER_TOKEN", ADMIN_TOKEN)
    await set_plan(plain.target)
    await plain("credits", "grant", "acme", "pages", "50", "--grant-id", "g1", "--reason", "po 42")
    await plain("adjust", "acme", "pages", "3", "--reason", "missed job", "--id", "a1")
    await plain("keys", "create", "acme", "--name", "portal")

    table = await plain("audit", "acme")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split() == ["at", "actor", "action", "target", "reason", "event", "id"]
    assert [line.split()[1:3] for line in lines[1:]] == [
        ["admin:ops", "api_key.create"],
        ["admin:ops", "usage.adjust"],
        ["admin:ops", "credits.grant"],
        ["admin:ops", "plan.set"],
    ]
    assert "po 42" in lines[3] and "missed job" in lines[2]

    first = await plain("audit", "acme", "--page-size", "3")
    token = first.out.rsplit("next page token: ", 1)[1].strip()
    rest = await plain("audit", "acme", "--page-size", "3", "--page-token", token, "--json")
    assert [e["action"] for e in rest.json()["events"]] == ["plan.set"]
    assert rest.json()["next_page_token"] == ""

    everything = await plain("audit", "acme", "--all", "--page-size", "1", "--json")
    events = everything.json()["events"]
    assert isinstance(events, list) and len(events) == 4
    assert json.loads(events[1]["after"])["committed"] == "3"

    monkeypatch.setenv("PAGEMETER_TOKEN", SERVICE_TOKEN)
    denied = await plain("audit", "acme")
    assert denied.code == 1 and denied.err.startswith("error: PERMISSION_DENIED: ")


@SYSTEM
async def test_console_script_takes_token_and_tls_from_environment(tls: Cli, pki: Pki) -> None:
    """The installed `pagemeter` script, run as a process, reads PAGEMETER_TOKEN and PAGEMETER_TLS_CA and never prints the token."""
    await set_plan(tls.target, tls=True, root_certificates=pki.ca_pem)
    script = str(Path(sys.executable).with_name("pagemeter"))
    env = {
        **os.environ,
        "PAGEMETER_TARGET": tls.target,
        "PAGEMETER_TOKEN": ADMIN_TOKEN,
        "PAGEMETER_TLS_CA": str(pki.ca_file),
    }

    async def run(*argv: str, **extra: str) -> Run:
        process = await asyncio.create_subprocess_exec(
            script,
            *argv,
            env={**env, **extra},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        result = Run(process.returncode, out.decode(), err.decode())
        assert ADMIN_TOKEN not in result.out + result.err
        return result

    usage = await run("usage", "acme", "--json")
    assert usage.code == 0, usage.err
    assert usage.json()["org_id"] == "acme"
    listed = await run("keys", "list", "acme")
    assert listed.code == 0 and listed.out.strip() == "no API keys"
    wrong = await run("usage", "acme", PAGEMETER_TOKEN=WRONG_TOKEN)
    assert wrong.code == 1 and WRONG_TOKEN not in wrong.err
    assert wrong.err.startswith("error: UNAUTHENTICATED: ")
