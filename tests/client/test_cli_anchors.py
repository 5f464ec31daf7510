"""Billing anchors from the shell: `plan set --billing-anchor/--billing-interval`,
and `billing_anchor`/`billing_interval` in a plan catalog (`plan apply`, `plan export`).

The suite's clock stands at 2026-03-15 12:00 UTC (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pagemeter.v1 import admin_pb2, plan_pb2
from pagemeter_client import cli
from pagemeter_server.ops.embedded import free_port
from tests.client.test_cli import Cli, row
from tests.client.test_cli_catalog import audit_size, versions, write
from tests.conftest import RunningServer

PLAN_ARGS = ["--name", "Business", "--timezone", "UTC", "--metric", "pages:quota=2000"]

CATALOG = """\
templates:
  annual:
    name: Annual
    timezone: Europe/Berlin
    billing_anchor: 2026-01-31T10:00:00+01:00
    billing_interval: BILLING_INTERVAL_YEAR
    metrics:
      - {metric: pages, contract_quota: 24000}
  monthly:
    name: Monthly
    billing_anchor: "2026-02-10T00:00:00Z"
    metrics:
      - {metric: pages, contract_quota: 2000}
  calendar:
    name: Calendar
    metrics:
      - {metric: pages, contract_quota: 50}
organizations:
  acme: annual
  globex: monthly
  initech: calendar
"""


@pytest.fixture
def pagemeter(
    pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str], plans_migrated: None
) -> Cli:
    """The CLI against a server whose plans are migrated: anchors need the plan
    document of schema 2, as windows do."""
    return Cli(pagemeter_server.target, capsys)


async def stored_plan(server: RunningServer, org: str) -> plan_pb2.Plan:
    return (await server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id=org))).plan


async def test_plan_set_with_an_anchor_reads_back(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    """An anchor given with an offset is stored as its instant and printed in UTC,
    with its interval, by `plan set`, `plan get` and `--json`; usage then counts
    from the anchor's day."""
    run = await pagemeter(
        "plan", "set", "acme", *PLAN_ARGS,
        "--billing-anchor", "2026-01-31T11:00:00+01:00", "--billing-interval", "month",
    )  # fmt: skip
    assert run.code == 0, run.err
    assert row(run.out, "billing anchor:") == ["2026-01-31T10:00:00Z"]
    assert row(run.out, "billing interval:") == ["month"]
    plan = await stored_plan(pagemeter_server, "acme")
    assert plan.billing_anchor.ToJsonString() == "2026-01-31T10:00:00Z"
    assert plan.billing_interval == plan_pb2.BILLING_INTERVAL_MONTH

    got = await pagemeter("plan", "get", "acme")
    assert got.code == 0, got.err
    assert row(got.out, "billing anchor:") == ["2026-01-31T10:00:00Z"]
    assert row(got.out, "billing interval:") == ["month"]
    as_json = (await pagemeter("plan", "get", "acme", "--json")).json()["plan"]
    assert as_json["billing_anchor"] == "2026-01-31T10:00:00Z"
    assert as_json["billing_interval"] == "BILLING_INTERVAL_MONTH"

    # Jan 31 clamps to Feb 28: on Mar 15 the period in progress began Feb 28, 10:00.
    usage = await pagemeter("usage", "acme", "--json")
    assert usage.code == 0, usage.err
    assert usage.json()["period_id"] == "2026-02-28"
    text = await pagemeter("usage", "acme")
    assert row(text.out, "billing period:") == ["2026-02-28"]
    assert "previous period 2026-01-31: jobs" in text.out


async def test_a_yearly_anchor_and_the_default_interval(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    """`--billing-interval year` stores a yearly period; an anchor alone is monthly
    (the server answers BILLING_INTERVAL_MONTH); a plan set without one has none
    and prints no anchor lines."""
    yearly = await pagemeter(
        "plan", "set", "acme", *PLAN_ARGS,
        "--billing-anchor", "2025-06-01T00:00:00Z", "--billing-interval", "YEAR",
    )  # fmt: skip
    assert yearly.code == 0, yearly.err
    assert row(yearly.out, "billing interval:") == ["year"]
    assert row(yearly.out, "pages")[0] == "yearly", "the metric's period is the plan's"
    assert (await stored_plan(pagemeter_server, "acme")).billing_interval == (
        plan_pb2.BILLING_INTERVAL_YEAR
    )

    alone = await pagemeter(
        "plan", "set", "globex", *PLAN_ARGS, "--billing-anchor", "2026-02-10T08:30:00Z"
    )
    assert alone.code == 0, alone.err
    assert row(alone.out, "billing interval:") == ["month"]
    assert row(alone.out, "pages")[0] == "monthly"

    plain = await pagemeter("plan", "set", "initech", *PLAN_ARGS)
    assert plain.code == 0, plain.err
    assert "billing anchor" not in plain.out and "billing interval" not in plain.out
    assert not (await stored_plan(pagemeter_server, "initech")).HasField("billing_anchor")


async def test_flags_override_the_anchor_of_a_json_plan(pagemeter: Cli, tmp_path: Path) -> None:
    """--from-json carries billing_anchor like any field; the flags given too win."""
    source = tmp_path / "plan.json"
    source.write_text(
        '{"name": "Business", "billingAnchor": "2026-01-05T00:00:00Z",'
        ' "billingInterval": "BILLING_INTERVAL_YEAR", "metrics": [{"metric": "pages"}]}'
    )
    run = await pagemeter(
        "plan", "set", "acme", "--from-json", str(source),
        "--billing-anchor", "2026-01-06T00:00:00Z",
    )  # fmt: skip
    assert run.code == 0, run.err
    assert row(run.out, "billing anchor:") == ["2026-01-06T00:00:00Z"]
    assert row(run.out, "billing interval:") == ["year"]


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--billing-anchor", "2026-01-31", "billing_anchor must be an RFC 3339 time"),
        ("--billing-anchor", "2026-01-31T10:00:00", "billing_anchor must be an RFC 3339 time"),
        ("--billing-anchor", "2026-01-31 10:00:00Z", "billing_anchor must be an RFC 3339 time"),
        ("--billing-anchor", "2026-02-30T10:00:00Z", "billing_anchor must be an RFC 3339 time"),
        ("--billing-anchor", "2026-01-31T10:00:00+1:00", "billing_anchor must be an RFC 3339"),
        ("--billing-anchor", "next tuesday", "(got 'next tuesday')"),
        ("--billing-interval", "weekly", "billing_interval must be month or year (got 'weekly')"),
        ("--billing-interval", "BILLING_INTERVAL_YEAR", "billing_interval must be month or year"),
    ],
)
def test_a_bad_anchor_or_interval_exits_2_without_calling_the_server(
    flag: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed anchor or interval is refused as a malformed SPEC is: exit code 2,
    the option and the plan field named, nothing sent."""
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: any call would fail differently
    argv = ["--target", nowhere, "plan", "set", "acme", *PLAN_ARGS, flag, value]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert f"argument {flag}: " in captured.err and problem in captured.err, captured.err


async def test_what_only_the_server_knows_is_refused_by_it(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    """An interval without an anchor, or an anchor outside 2000-2100, is the server's
    to refuse: exit code 1 and the field it names; nothing is stored."""
    lone = await pagemeter("plan", "set", "acme", *PLAN_ARGS, "--billing-interval", "year")
    assert lone.code == 1
    assert lone.err.startswith("error: INVALID_ARGUMENT: ")
    assert "  plan.billing_interval: billing_interval needs billing_anchor" in lone.err
    early = await pagemeter(
        "plan", "set", "acme", *PLAN_ARGS, "--billing-anchor", "1999-12-31T00:00:00Z"
    )
    assert early.code == 1 and "  plan.billing_anchor: " in early.err, early.err
    assert await versions(pagemeter_server) == {}


async def test_a_catalog_with_anchors_applied_twice_changes_nothing_the_second_time(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """Templates set anchors (an unquoted YAML time stays RFC 3339 text); the diff
    shows them in UTC; a second apply sets nothing, bumps no version, audits nothing."""
    catalog = write(tmp_path, CATALOG)
    first = await pagemeter("plan", "apply", catalog)
    assert first.code == 0, first.err
    assert "  +billing_anchor {\n  +  2026-01-31T09:00:00Z\n  +}\n" in first.out, first.out
    assert "  +billing_interval: BILLING_INTERVAL_YEAR\n" in first.out
    assert "3 of 3 organizations changed" in first.out
    acme = await stored_plan(pagemeter_server, "acme")
    assert acme.billing_anchor.ToJsonString() == "2026-01-31T09:00:00Z"
    assert acme.billing_interval == plan_pb2.BILLING_INTERVAL_YEAR
    globex = await stored_plan(pagemeter_server, "globex")
    assert globex.billing_interval == plan_pb2.BILLING_INTERVAL_MONTH
    assert not (await stored_plan(pagemeter_server, "initech")).HasField("billing_anchor")
    audits = await audit_size(pagemeter_server, "acme")

    second = await pagemeter("plan", "apply", catalog)
    assert second.code == 0, second.err
    assert "acme: unchanged (annual)" in second.out
    assert "0 of 3 organizations changed" in second.out
    assert await versions(pagemeter_server) == {"acme": 1, "globex": 1, "initech": 1}
    assert await audit_size(pagemeter_server, "acme") == audits


async def test_a_changed_anchor_is_applied_once(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """Moving a template's anchor changes its organization once (the server applies
    it from the end of the period in progress and shows the new anchor); applying
    the same catalog again finds nothing to do. Dropping the anchor likewise."""
    await pagemeter("plan", "apply", write(tmp_path, CATALOG))
    moved = CATALOG.replace('"2026-02-10T00:00:00Z"', "2026-02-20T00:00:00Z")
    for text, version in (
        (moved, 2),
        (moved.replace("    billing_anchor: 2026-02-20T00:00:00Z\n", ""), 3),
    ):
        catalog = write(tmp_path, text)
        run = await pagemeter("plan", "apply", catalog)
        assert run.code == 0, run.err
        assert "1 of 3 organizations changed" in run.out and "globex: changes" in run.out
        again = await pagemeter("plan", "apply", catalog)
        assert "0 of 3 organizations changed" in again.out, again.out
        assert (await versions(pagemeter_server))["globex"] == version
    assert not (await stored_plan(pagemeter_server, "globex")).HasField("billing_anchor")


async def test_export_writes_anchors_and_applies_as_a_no_op(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    """`plan export` writes billing_anchor (RFC 3339, UTC) and billing_interval for
    the plans that have them; applying the export changes nothing."""
    await pagemeter("plan", "apply", write(tmp_path, CATALOG))
    await pagemeter(
        "plan", "set", "hooli", *PLAN_ARGS,
        "--billing-anchor", "2026-01-31T10:00:00.250Z", "--billing-interval", "month",
    )  # fmt: skip
    exported = tmp_path / "exported.yaml"
    run = await pagemeter("plan", "export", "--output", str(exported))
    assert run.code == 0, run.err
    text = exported.read_text()
    assert "  acme:\n" in text
    assert (
        "billing_anchor: '2026-01-31T09:00:00Z'\n    billing_interval: BILLING_INTERVAL_YEAR\n"
        in (text)
    )
    assert "billing_anchor: '2026-01-31T10:00:00.250Z'\n" in text, "milliseconds are kept"
    assert text.count("billing_anchor") == 3, "initech has none"
    before = await versions(pagemeter_server)
    again = await pagemeter("plan", "apply", str(exported))
    assert again.code == 0, again.err
    assert "0 of 4 organizations changed" in again.out
    assert await versions(pagemeter_server) == before


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            "billing_anchor: 2026-01-31",
            "plans.yaml:4: template 'a': plan.billing_anchor: must be an RFC 3339 time with a "
            "UTC offset, such as 2026-01-31T10:00:00Z or 2026-01-31T11:00:00+01:00 "
            "(got '2026-01-31')",
        ),
        (
            "billing_anchor: '2026-01-31T10:00:00'",
            "plans.yaml:4: template 'a': plan.billing_anchor: must be an RFC 3339 time",
        ),
        (
            "billing_anchor: {seconds: 5}",
            "plans.yaml:4: template 'a': plan.billing_anchor: must be an RFC 3339 time",
        ),
        (
            "billing_interval: year",
            "plans.yaml:4: template 'a': plan.billing_interval: must be BILLING_INTERVAL_MONTH "
            "or BILLING_INTERVAL_YEAR (got 'year')",
        ),
        (
            "billing_interval: BILLING_INTERVAL_YEAR",
            "plans.yaml:4: template 'a' (for 'acme'): plan.billing_interval: billing_interval "
            "needs billing_anchor",
        ),
        (
            "billing_anchor: 1999-01-01T00:00:00Z",
            "plans.yaml:4: template 'a' (for 'acme'): plan.billing_anchor: billing_anchor must "
            "be a valid time from 2000-01-01",
        ),
    ],
    ids=["date-only", "no-offset", "mapping", "short-interval", "interval-alone", "too-early"],
)
async def test_a_bad_anchor_in_a_catalog_is_refused_with_its_file_line_and_field(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path, value: str, problem: str
) -> None:
    """Values protobuf JSON cannot read and plans the server refuses are reported at
    the line of the value, with its field; exit code 2, nothing set."""
    text = f"templates:\n  a:\n    name: A\n    {value}\n    metrics:\n      - metric: pages\n"
    run = await pagemeter("plan", "apply", write(tmp_path, text + "organizations:\n  acme: a\n"))
    assert run.code == 2
    assert problem in run.err, run.err
    assert await versions(pagemeter_server) == {}
