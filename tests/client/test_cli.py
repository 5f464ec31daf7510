"""The `pagemeter` CLI against a real pagemeter server and Redis.

`cli.main([...])` runs in a thread (the server lives on the test's event loop) and
its output is captured with capsys; the installed console script runs as a real
subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from pagemeter_client import AsyncPagemeterClient, cli
from pagemeter_server.ops.embedded import free_port
from tests.conftest import RunningServer, eagle_plan

# Starts processes or a topology of its own: the system tier (not in make test-fast).
SYSTEM = pytest.mark.system

EAGLE_PLAN_ARGS = [
    "--name",
    "Business",
    "--timezone",
    "UTC",
    "--metric",
    "pages:quota=2000,hard_limit=2500,overage=yes,price=0.03,overage_price=0.028",
    "--metric",
    "documents:quota=500,overage=no",
]


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        """The output parsed as JSON (any JSON value: the command's document)."""
        return json.loads(self.out)


class Cli:
    """Runs `pagemeter --target <test server> ...` in a thread and captures its output."""

    def __init__(self, target: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.target = target
        self.capsys = capsys

    async def __call__(self, *argv: str) -> Run:
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["--target", self.target, *argv])
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)


@pytest.fixture
def pagemeter(pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(pagemeter_server.target, capsys)


def usage_metric(run: Run, metric: str) -> dict[str, object]:
    metrics = run.json()["metrics"]
    assert isinstance(metrics, list)
    found: dict[str, object] = next(m for m in metrics if m["metric"] == metric)
    return found


def row(text: str, label: str) -> list[str]:
    """The cells after `label` on the table line that starts with it."""
    line = next(line for line in text.splitlines() if line.startswith(label))
    return line.removeprefix(label).split()


async def test_eagle_doc_example(pagemeter: Cli) -> None:
    """Plan 2000 included + overage 0.028 + hard limit; 2100 pages recorded: overUsage 100, overUsageCost 2.8."""
    plan = await pagemeter("plan", "set", "acme", *EAGLE_PLAN_ARGS)
    assert plan.code == 0, plan.err
    assert row(plan.out, "pages") == ["monthly", "2000", "2500", "yes", "0.03", "0.028"]

    check = await pagemeter("check", "acme", "pages=2100", "--hold", "--request-id", "job-1")
    assert check.code == 0, check.err
    assert row(check.out, "reason:") == ["OVERAGE"]
    assert row(check.out, "overage units") == ["100"]

    record = await pagemeter("record", "acme", "job-1", "pages=2100")
    assert record.code == 0, record.err
    assert row(record.out, "status:") == ["COMPLETED"]

    usage = await pagemeter("usage", "acme", "--json")
    assert usage.code == 0, usage.err
    pages = usage_metric(usage, "pages")
    assert pages["committed"] == "2100"  # quotaUsed (protobuf JSON writes int64 as a string)
    assert pages["contract_quota"] == "2000"  # contractQuota
    assert pages["overage_units"] == "100"  # overUsage = quotaUsed - contractQuota
    assert pages["overage_price_per_unit"] == "0.028"  # pricePerPageOverUsage
    assert pages["overage_cost"] == "2.8"  # overUsageCost = 100 x 0.028
    assert pages["overage_allowed"] is True and pages["hard_limit"] == "2500"
    assert usage.json()["period_id"] == "2026-03"

    table = await pagemeter("usage", "acme")
    assert row(table.out, "committed (quotaUsed)") == ["0", "2100"]  # documents, pages
    assert row(table.out, "contract quota (contractQuota)") == ["500", "2000"]
    assert row(table.out, "overage units (overUsage)") == ["0", "100"]
    assert row(table.out, "overage cost (overUsageCost)") == ["0", "USD", "2.8", "USD"]
    assert row(table.out, "usage %") == ["0.0%", "105.0%"]
    assert row(table.out, "plan:") == ["Business"]
    assert "jobs: 1 succeeded, 0 failed, 1 total" in table.out


async def test_denied_check_exits_3_and_prints_the_decision(pagemeter: Cli) -> None:
    """A check past the hard limit is not an error: the decision is printed and the exit code is 3."""
    await pagemeter("plan", "set", "acme", *EAGLE_PLAN_ARGS)
    await pagemeter("record", "acme", "job-1", "pages=2100")

    denied = await pagemeter("check", "acme", "pages=401")
    assert denied.code == 3 and denied.err == ""
    assert row(denied.out, "allowed:") == ["no"]
    assert row(denied.out, "reason:") == ["HARD_LIMIT_EXCEEDED"]
    assert row(denied.out, "max admissible") == ["400"]

    as_json = await pagemeter("check", "acme", "pages=401", "--json")
    assert as_json.code == 3
    assert as_json.json()["allowed"] is False
    assert as_json.json()["reason"] == "DECISION_REASON_HARD_LIMIT_EXCEEDED"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("pages:quota=lots", "quota must be a whole number >= 0 (got 'lots')"),
        ("pages:overage=maybe", "overage must be yes, no, true or false (got 'maybe')"),
        ("pages:price=0,03", "'03' is not key=value"),
        ("pages:price=1e3", "price must be a decimal number such as 0.028"),
        ("pages:colour=red", "unknown key 'colour'"),
        ("pages:quota=1,quota=2", "quota is given twice"),
        ("pages:period=weekly", "period must be monthly or none (got 'weekly')"),
        ("Pages:quota=1", "metric name 'Pages' must start with a lowercase letter"),
        ("pages:day=10/hard", "day must be N, N/soft or N/shadow (got '10/hard')"),
        ("pages:minute=-1", "minute must be"),
    ],
)
def test_bad_metric_spec_exits_2_without_calling_the_server(
    spec: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed --metric SPEC is refused with exit code 2 and a message naming the problem."""
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: any call would fail differently
    code = cli.main(["--target", nowhere, "plan", "set", "acme", "--name", "X", "--metric", spec])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert f"argument --metric: bad SPEC {spec!r}: {problem}" in captured.err
    assert "SPEC is NAME[:key=value,...]" in captured.err


async def test_plan_get_json_and_from_json(pagemeter: Cli, tmp_path: Path) -> None:
    """plan set --from-json stores a protobuf-JSON plan (flags override it); plan get --json reads it back."""
    source = tmp_path / "plan.json"
    source.write_text(json_format.MessageToJson(eagle_plan(api_rate_limit=10)))
    stored = await pagemeter(
        "plan", "set", "acme", "--from-json", str(source), "--name", "Enterprise", "--json"
    )
    assert stored.code == 0, stored.err
    got = await pagemeter("plan", "get", "acme", "--json")
    plan = got.json()["plan"]
    assert isinstance(plan, dict)
    assert plan["name"] == "Enterprise" and plan["api_rate_limit"] == 10 and plan["version"] == "1"
    assert [m["metric"] for m in plan["metrics"]] == ["documents", "pages"]  # sorted by the server
    assert plan["metrics"][1]["overage_price_per_unit"] == "0.028"

    table = await pagemeter("plan", "get", "acme")
    assert row(table.out, "api rate limit:") == ["10", "req/s"]

    other = await pagemeter("plan", "set", "globex", "--from-json", str(source))
    assert other.code == 2 and "is the plan of 'acme', not 'globex'" in other.err


async def test_grpc_errors_print_code_and_details_and_exit_1(pagemeter: Cli) -> None:
    """A refused call prints `error: CODE: message` and its field violations on stderr, exit code 1."""
    await pagemeter("plan", "set", "acme", *EAGLE_PLAN_ARGS)
    lone_year = await pagemeter("usage", "acme", "--year", "2026")
    assert lone_year.code == 1 and lone_year.out == ""
    first, *details = lone_year.err.splitlines()
    assert first.startswith("error: INVALID_ARGUMENT: ")
    assert details == [
        "  year: year and month must be sent together (or both omitted for the current month)"
    ]

    missing = await pagemeter("plan", "get", "nobody")
    assert missing.code == 1
    assert missing.err.startswith("error: NOT_FOUND: organization 'nobody' has no plan")

    await pagemeter("record", "acme", "job-1", "pages=5")
    reused = await pagemeter("record", "acme", "job-1", "pages=6")
    assert reused.code == 1 and reused.err.startswith("error: ALREADY_EXISTS: ")
    assert "  reason: REQUEST_ID_REUSED (domain pagemeter)" in reused.err


async def test_hold_release_failed_record_and_credits(pagemeter: Cli) -> None:
    """check --hold makes up a request id, release frees it, record --failed counts a failed job, credits add up."""
    await pagemeter("plan", "set", "acme", *EAGLE_PLAN_ARGS)
    held = await pagemeter("check", "acme", "pages=10", "documents=1", "--hold", "--json")
    request_id = held.json()["request_id"]
    assert isinstance(request_id, str) and len(request_id) == 32
    assert held.json()["held"] is True

    released = await pagemeter("release", "acme", request_id)
    assert released.code == 0 and row(released.out, "outcome:") == ["RELEASED"]
    assert row(released.out, "released pages:") == ["10"]

    failed = await pagemeter(
        "record", "acme", "job-2", "pages=3", "--failed", "--document-type", "invoice"
    )
    assert failed.code == 0 and row(failed.out, "status:") == ["FAILED"]

    granted = await pagemeter("credits", "grant", "acme", "pages", "500", "--grant-id", "g-1")
    assert granted.code == 0 and row(granted.out, "balance:") == ["500"]
    again = await pagemeter("credits", "grant", "acme", "pages", "500", "--grant-id", "g-1")
    assert row(again.out, "duplicate:") == ["yes"] and row(again.out, "balance:") == ["500"]

    usage = await pagemeter("usage", "acme", "--json")
    assert usage.json()["jobs"] == {"succeeded": "0", "failed": "1", "total": "1"}
    assert usage_metric(usage, "pages")["prepaid_balance"] == "500"
    assert usage_metric(usage, "pages")["held"] == "0"


async def test_record_times_and_their_validation(pagemeter: Cli) -> None:
    """--completed-at takes ISO 8601 with an offset; a time without one is refused with exit code 2."""
    await pagemeter("plan", "set", "acme", *EAGLE_PLAN_ARGS)
    done = await pagemeter(
        "record",
        "acme",
        "job-1",
        "pages=4",
        "--completed-at",
        "2026-03-15T13:00:00+02:00",
        "--json",
    )
    assert done.code == 0, done.err
    assert done.json()["completed_at"] == "2026-03-15T11:00:00Z"

    naive = await pagemeter(
        "record", "acme", "job-2", "pages=4", "--completed-at", "2026-03-15T11:00"
    )
    assert naive.code == 2 and "has no UTC offset" in naive.err

    twice = await pagemeter("record", "acme", "job-3", "pages=4", "pages=5")
    assert twice.code == 2 and "metric 'pages' is given twice" in twice.err

    not_units = await pagemeter("check", "acme", "pages:4")
    assert not_units.code == 2 and "'pages:4' is not METRIC=UNITS" in not_units.err


@SYSTEM
async def test_console_script_reads_target_from_environment(
    pagemeter_server: RunningServer,
) -> None:
    """The installed `pagemeter` script runs as a process, takes PAGEMETER_TARGET, and exits with the codes."""
    async with AsyncPagemeterClient(pagemeter_server.target) as sdk:
        await sdk.set_plan(eagle_plan())
    script = str(Path(sys.executable).with_name("pagemeter"))
    env = {**os.environ, "PAGEMETER_TARGET": pagemeter_server.target}

    async def run(*argv: str) -> Run:
        process = await asyncio.create_subprocess_exec(
            script, *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return Run(process.returncode, out.decode(), err.decode())

    usage = await run("usage", "acme", "--json")
    assert usage.code == 0, usage.err
    assert usage.json()["subscription"] == {
        "plan_name": "Business",
        "api_rate_limit": 0,
        "processing_priority": "",
        "support_level": "",
        "currency": "USD",
    }
    bad = await run("plan", "set", "acme", "--name", "X", "--metric", "pages:quota=-1")
    assert bad.code == 2 and "quota must be a whole number >= 0 (got '-1')" in bad.err
    denied = await run("check", "acme", "documents=501")
    assert denied.code == 3 and "QUOTA_EXCEEDED" in denied.out


@pytest.mark.usefixtures("plans_migrated")
async def test_windows_are_set_shown_and_decided_from_the_command_line(pagemeter: Cli) -> None:
    """`--metric pages:day=5,minute=2/soft` sets a hard daily and a soft per-minute window; plan show lists them, a check past the day names the window, and a record shows each window's use."""
    plan = await pagemeter(
        "plan", "set", "acme", "--name", "W", "--metric", "pages:day=5,minute=2/soft"
    )
    assert plan.code == 0, plan.err
    assert "2/minute (soft), 5/day" in plan.out
    record = await pagemeter("record", "acme", "job-1", "pages=4")
    assert record.code == 0, record.err
    assert "4/2 per minute soft, passed" in record.out and "4/5 per day, resets" in record.out
    check = await pagemeter("check", "acme", "pages=2")
    assert check.code == 3, "a denied check exits 3"
    assert row(check.out, "reason:") == ["WINDOW_LIMIT_EXCEEDED"]
    assert row(check.out, "denied by window") == ["day"]
    assert "retry after:" in check.out


@pytest.mark.usefixtures("plans_migrated")
async def test_shadow_limits_from_the_command_line(pagemeter: Cli) -> None:
    """`hour=2/shadow` and `shadow_hard_limit=3` are shown with the plan; a check past them is admitted and says what they would deny."""
    plan = await pagemeter(
        "plan", "set", "acme", "--name", "S", "--metric", "pages:shadow_hard_limit=3,hour=2/shadow"
    )
    assert plan.code == 0, plan.err
    assert "2/hour (shadow)" in plan.out
    assert row(plan.out, "pages")[-3:] == ["3", "2/hour", "(shadow)"]
    check = await pagemeter("check", "acme", "pages=4")
    assert check.code == 0, check.err
    assert row(check.out, "shadow limits:") == ["would", "deny"]
    assert row(check.out, "shadow would deny") == ["HARD_LIMIT_EXCEEDED"]
    assert "0/2 per hour shadow, passed" in check.out


@pytest.mark.usefixtures("plans_migrated")
async def test_a_spend_cap_from_the_command_line(pagemeter: Cli) -> None:
    """`overage_spend_cap=5` is shown with the plan; past it a check is denied with SPEND_CAP_REACHED and a record says over spend cap."""
    plan = await pagemeter(
        "plan",
        "set",
        "acme",
        "--name",
        "C",
        "--metric",
        "pages:quota=0,overage=yes,overage_price=1,overage_spend_cap=5",
    )
    assert plan.code == 0, plan.err
    assert row(plan.out, "pages")[-1] == "5"
    check = await pagemeter("check", "acme", "pages=6")
    assert check.code == 3
    assert row(check.out, "reason:") == ["SPEND_CAP_REACHED"]
    assert row(check.out, "max admissible") == ["5"]
    record = await pagemeter("record", "acme", "job-1", "pages=6")
    assert record.code == 0, record.err
    assert row(record.out, "over spend cap") == ["yes"]
