"""Plans as code: `pagemeter plan apply FILE.yaml` and `pagemeter plan export`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pagemeter.v1 import admin_pb2
from tests.client.test_cli import Cli
from tests.conftest import RunningServer, eagle_plan

CATALOG = """\
templates:
  business:
    name: Business
    timezone: Europe/Berlin
    metrics:
      - metric: pages
        contract_quota: 2000
        overage_allowed: true
        overage_price_per_unit: "0.0280"
        windows:
          - {window: WINDOW_DAY, limit: 200}
  trial:
    name: Trial
    metrics:
      - {metric: pages, contract_quota: 50, hard_limit: 50, rollover_percent: 25, rollover_cap: 10}
organizations:
  acme: business
  globex: trial
"""


@pytest.fixture
def pagemeter(
    pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str], plans_migrated: None
) -> Cli:
    return Cli(pagemeter_server.target, capsys)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "plans.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


async def versions(server: RunningServer) -> dict[str, int]:
    plans = (await server.admin.ListPlans(admin_pb2.ListPlansRequest())).plans
    return {plan.org_id: plan.version for plan in plans}


async def audit_size(server: RunningServer, org: str) -> int:
    request = admin_pb2.ListAuditEventsRequest(org_id=org, page_size=1000)
    return len((await server.admin.ListAuditEvents(request)).events)


async def test_a_dry_run_shows_the_changes_and_makes_none(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """--dry-run prints each organization's diff and sets nothing."""
    run = await pagemeter("plan", "apply", write(tmp_path, CATALOG), "--dry-run")
    assert run.code == 0, run.err
    assert "acme: would change to 'business'" in run.out
    assert '+  overage_price_per_unit: "0.028"' in run.out, "the diff shows the stored form"
    assert "2 of 2 organizations to change" in run.out
    assert await versions(pagemeter_server) == {}


async def test_a_catalog_applied_twice_changes_nothing_the_second_time(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """The first apply sets each organization's plan (version 1, one audit entry each); the second finds nothing to do: no new version, no audit entry."""
    catalog = write(tmp_path, CATALOG)
    first = await pagemeter("plan", "apply", catalog)
    assert first.code == 0, first.err
    assert "2 of 2 organizations changed" in first.out
    assert await versions(pagemeter_server) == {"acme": 1, "globex": 1}
    plan = (await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme"))).plan
    assert plan.timezone == "Europe/Berlin" and plan.metrics[0].windows[0].limit == 200
    trial = (await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="globex"))).plan
    assert (trial.metrics[0].rollover_percent, trial.metrics[0].rollover_cap) == (25, 10)
    audits = await audit_size(pagemeter_server, "acme")
    second = await pagemeter("plan", "apply", catalog)
    assert second.code == 0, second.err
    assert "acme: unchanged (business)" in second.out
    assert "0 of 2 organizations changed" in second.out
    assert await versions(pagemeter_server) == {"acme": 1, "globex": 1}
    assert await audit_size(pagemeter_server, "acme") == audits


async def test_a_changed_template_changes_only_its_organizations(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """Editing one template moves only the organizations that use it to a new version."""
    await pagemeter("plan", "apply", write(tmp_path, CATALOG))
    edited = CATALOG.replace(
        "contract_quota: 50, hard_limit: 50", "contract_quota: 60, hard_limit: 60"
    )
    run = await pagemeter("plan", "apply", write(tmp_path, edited))
    assert run.code == 0, run.err
    assert "-  contract_quota: 50" in run.out and "+  contract_quota: 60" in run.out
    assert await versions(pagemeter_server) == {"acme": 1, "globex": 2}


async def test_export_writes_a_catalog_that_applies_as_a_no_op(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """`plan export` of the current state, applied again, changes nothing."""
    await pagemeter("plan", "apply", write(tmp_path, CATALOG))
    exported = tmp_path / "exported.yaml"
    run = await pagemeter("plan", "export", "--output", str(exported))
    assert run.code == 0, run.err
    text = exported.read_text()
    assert "organizations:\n  acme: acme\n  globex: globex\n" in text
    assert "contract_quota: 2000\n" in text, "64-bit numbers are written as numbers"
    again = await pagemeter("plan", "apply", str(exported))
    assert again.code == 0, again.err
    assert "0 of 2 organizations changed" in again.out
    assert await versions(pagemeter_server) == {"acme": 1, "globex": 1}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("templates:\n  a: [unclosed\n", "plans.yaml:3: not YAML"),
        (
            "templates:\n  a:\n    name: A\n    metrics:\n      - metric: pages\n        quota: 5\n",
            "plans.yaml:6: MetricLimits.quota: unknown field",
        ),
        (
            "templates:\n  a:\n    org_id: acme\n",
            "plans.yaml:3: Plan.org_id: set by the server or by `organizations`",
        ),
        (
            "templates:\n  a: {name: A}\norganizations:\n  acme: b\n",
            "plans.yaml:4: organization 'acme' names no template of this file",
        ),
        ("plans:\n  a: {}\n", "plans.yaml:1: unknown section 'plans'"),
        (
            "templates:\n  a:\n    name: A\n    metrics:\n      - metric: pages\n"
            "        windows:\n          - {window: WINDOW_DAY, limit: -5}\n"
            "organizations:\n  acme: a\n",
            "plans.yaml:7: template 'a' (for 'acme'): plan.metrics[0].windows[0].limit",
        ),
    ],
    ids=["not-yaml", "unknown-field", "org-in-template", "unknown-template", "section", "server"],
)
async def test_a_bad_catalog_is_refused_with_its_file_and_line(
    pagemeter: Cli,
    pagemeter_server: RunningServer,
    tmp_path: Path,
    text: str,
    problem: str,
) -> None:
    """A catalog with a fault exits 2 naming the file, the line and the field, and sets nothing."""
    run = await pagemeter("plan", "apply", write(tmp_path, text))
    assert run.code == 2
    assert problem in run.err, run.err
    assert await versions(pagemeter_server) == {}


async def test_a_reader_that_goes_away_ends_the_command_quietly(
    pagemeter_server: RunningServer,
) -> None:
    """`pagemeter plan export | true`: when the reader has closed the pipe, the CLI
    exits 141 (as for SIGPIPE) without a traceback."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))

    def export_into_a_closed_pipe() -> tuple[int, str]:
        reader = subprocess.Popen(["true"], stdin=subprocess.PIPE)
        assert reader.stdin is not None
        reader.wait(10)  # gone before anything is written
        writer = subprocess.run(
            [
                str(Path(sys.executable).parent / "pagemeter"),
                "--target",
                pagemeter_server.target,
                "plan",
                "export",
            ],
            stdout=reader.stdin,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=60,
        )
        reader.stdin.close()
        return writer.returncode, writer.stderr

    code, stderr = await asyncio.to_thread(export_into_a_closed_pipe)
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr
    assert code == 141, stderr
