"""Notification thresholds from the shell: `plan set`'s SPEC keys alerts, hard_alerts,
credits_below and grant_expiring; the plan table's alerts column; and `alerts:` in a
plan catalog, applied, exported and applied again without a change."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pagemeter.v1 import admin_pb2
from tests.client.test_cli import Cli, row
from tests.conftest import RunningServer


@pytest.fixture
def pagemeter(
    pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str], plans_migrated: None
) -> Cli:
    return Cli(pagemeter_server.target, capsys)


async def stored_alerts(server: RunningServer, org: str, metric: str) -> dict[str, object]:
    plan = (await server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id=org))).plan
    limits = next(m for m in plan.metrics if m.metric == metric)
    if not limits.HasField("alerts"):
        return {}
    alerts = limits.alerts
    return {
        "quota": list(alerts.quota_percents),
        "hard": list(alerts.hard_limit_percents),
        "credits_below": alerts.credits_below if alerts.HasField("credits_below") else None,
        "expiring": alerts.grant_expiring_within.seconds
        if alerts.HasField("grant_expiring_within")
        else None,
    }


async def test_threshold_keys_set_the_alerts_and_the_table_shows_them(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    run = await pagemeter(
        "plan",
        "set",
        "acme",
        "--name",
        "Business",
        "--metric",
        "pages:quota=2000,hard_limit=2500,alerts=50/80/100,hard_alerts=90/100,"
        "credits_below=100,grant_expiring=7d",
        "--metric",
        "documents:quota=500,alerts=none",
        "--metric",
        "credits:quota=10",
    )
    assert run.code == 0, run.err
    assert await stored_alerts(pagemeter_server, "acme", "pages") == {
        "quota": [50, 80, 100],
        "hard": [90, 100],
        "credits_below": 100,
        "expiring": 7 * 86_400,
    }
    # A key changes only what it names: the other percents stay the defaults.
    assert await stored_alerts(pagemeter_server, "acme", "documents") == {
        "quota": [],
        "hard": [80, 100],
        "credits_below": None,
        "expiring": None,
    }
    assert await stored_alerts(pagemeter_server, "acme", "credits") == {}

    shown = await pagemeter("plan", "get", "acme")
    header = next(line for line in shown.out.splitlines() if line.startswith("metric"))
    assert header.rstrip().endswith("alerts")
    pages = " ".join(row(shown.out, "pages"))
    assert pages.endswith(
        "quota 50/80/100%, hard limit 90/100%, credits below 100, grant expiring within 7d"
    )
    assert " ".join(row(shown.out, "documents")).endswith("quota none, hard limit 80/100%")
    assert row(shown.out, "credits")[-1] == "default"

    as_json = await pagemeter("plan", "get", "acme", "--json")
    metrics = {m["metric"]: m for m in as_json.json()["plan"]["metrics"]}
    assert metrics["pages"]["alerts"]["grant_expiring_within"] == "604800s"
    assert metrics["pages"]["alerts"]["credits_below"] == "100"


async def test_a_plan_without_threshold_keys_has_no_alerts_column(pagemeter: Cli) -> None:
    run = await pagemeter("plan", "set", "acme", "--name", "Basic", "--metric", "pages:quota=10")
    assert run.code == 0, run.err
    assert "alerts" not in run.out
    assert "alerts" not in (await pagemeter("plan", "get", "acme", "--json")).out


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("alerts=0", "alerts must be up to 10 percents from 1 to 1000"),
        ("alerts=80/lots", "alerts must be"),
        ("alerts=1001", "from 1 to 1000"),
        ("alerts=" + "/".join(str(n) for n in range(1, 12)), "up to 10 percents"),
        ("hard_alerts=101", "hard_alerts must be up to 10 percents from 1 to 100"),
        ("hard_alerts=", "is not key=value"),
        ("credits_below=-1", "credits_below must be a whole number"),
        ("grant_expiring=7", "grant_expiring must be a time from 1s to 366d"),
        ("grant_expiring=2w", "s, m, h or d"),
        ("grant_expiring=0d", "from 1s to 366d"),
        ("grant_expiring=367d", "from 1s to 366d"),
        ("alerts=80,alerts=90", "alerts is given twice"),
    ],
)
async def test_a_bad_threshold_is_refused_before_anything_is_sent(
    pagemeter: Cli, pagemeter_server: RunningServer, spec: str, problem: str
) -> None:
    run = await pagemeter("plan", "set", "acme", "--name", "X", "--metric", f"pages:{spec}")
    assert run.code == 2
    assert problem in run.err, run.err
    plans = await pagemeter_server.admin.ListPlans(admin_pb2.ListPlansRequest())
    assert not plans.plans


CATALOG = """\
templates:
  watched:
    name: Watched
    metrics:
      - metric: pages
        contract_quota: 2000
        alerts:
          quota_percents: [100, 50, 80]
          hard_limit_percents: []
          credits_below: 250
          grant_expiring_within: 259200s
      - {metric: documents, contract_quota: 10}
organizations:
  acme: watched
"""


async def test_alerts_in_a_catalog_round_trip(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """`alerts:` is read by ParseDict, stored, exported and applied again as a no-op."""
    catalog = tmp_path / "plans.yaml"
    catalog.write_text(CATALOG)
    dry = await pagemeter("plan", "apply", str(catalog), "--dry-run")
    assert dry.code == 0, dry.err
    assert "259200s" in dry.out, "the diff shows a duration as protobuf JSON writes it"
    first = await pagemeter("plan", "apply", str(catalog))
    assert first.code == 0, first.err
    assert await stored_alerts(pagemeter_server, "acme", "pages") == {
        "quota": [50, 80, 100],
        "hard": [],
        "credits_below": 250,
        "expiring": 3 * 86_400,
    }
    assert await stored_alerts(pagemeter_server, "acme", "documents") == {}
    again = await pagemeter("plan", "apply", str(catalog))
    assert "acme: unchanged (watched)" in again.out, again.out

    exported = tmp_path / "exported.yaml"
    run = await pagemeter("plan", "export", "--output", str(exported))
    assert run.code == 0, run.err
    text = exported.read_text()
    assert "grant_expiring_within: 259200s" in text
    assert "credits_below: 250\n" in text
    applied = await pagemeter("plan", "apply", str(exported))
    assert applied.code == 0, applied.err
    assert "0 of 1 organizations changed" in applied.out
    plan = (await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme"))).plan
    assert plan.version == 1


async def test_a_bad_duration_in_a_catalog_is_refused_at_its_line(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    catalog = tmp_path / "plans.yaml"
    catalog.write_text(CATALOG.replace("259200s", "3d"))
    run = await pagemeter("plan", "apply", str(catalog))
    assert run.code == 2
    assert (
        "plans.yaml:11: template 'watched': plan.metrics[0].alerts.grant_expiring_within: "
        "must be a number of seconds and 's', such as 604800s (7 days) (got '3d')"
    ) in run.err, run.err
    assert not (await pagemeter_server.admin.ListPlans(admin_pb2.ListPlansRequest())).plans


async def test_the_server_judges_thresholds_the_keys_cannot_express(
    pagemeter: Cli, tmp_path: Path
) -> None:
    """A catalog may write what the SPEC keys refuse; the server names the field."""
    catalog = tmp_path / "plans.yaml"
    catalog.write_text(
        textwrap.dedent(
            """\
            templates:
              a:
                name: A
                metrics:
                  - metric: pages
                    alerts: {hard_limit_percents: [150]}
            organizations:
              acme: a
            """
        )
    )
    run = await pagemeter("plan", "apply", str(catalog))
    assert run.code == 2
    assert "plan.metrics[0].alerts.hard_limit_percents" in run.err, run.err
