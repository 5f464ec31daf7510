"""The Prometheus rules and the Grafana dashboard in deploy/, checked with the real promtool.

promtool comes from `make tools` (Debian's prometheus package unpacked into
.tools/prometheus), from PAGEMETER_PROMETHEUS_BIN_DIR, or from PATH; without it
the tests that run it are skipped with the reason, and the checks that need no
binary still run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "pagemeter-rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "pagemeter-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "pagemeter-dashboard.json"
BIN_DIR_ENV = "PAGEMETER_PROMETHEUS_BIN_DIR"
TOOLS_BIN_DIR = REPO / ".tools" / "prometheus" / "usr" / "bin"
PROMTOOL_TIMEOUT_SECONDS = 60

_HISTOGRAMS = (
    "grpc_server_handling_seconds",
    "pagemeter_redis_script_seconds",
    "pagemeter_webhook_delivery_seconds",
)
# Every metric pagemeter exports (a histogram by its three series).
EXPORTED_METRICS = frozenset(
    {
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "pagemeter_check_decisions_total",
        "pagemeter_units_total",
        "pagemeter_overage_units_total",
        "pagemeter_records_total",
        "pagemeter_redis_script_errors_total",
        "pagemeter_redis_up",
        "pagemeter_redis_primaries_down",
        "pagemeter_store_persistent",
        "pagemeter_unplanned_metric_refusals_total",
        "pagemeter_document_types_folded_total",
        "pagemeter_serving",
        "pagemeter_build_info",
        "pagemeter_org_committed_units",
        "pagemeter_org_held_units",
        "pagemeter_org_contract_quota_units",
        "pagemeter_org_hard_limit_units",
        "pagemeter_org_overage_units",
        "pagemeter_org_overage_cost",
        "pagemeter_org_prepaid_balance_units",
        "pagemeter_org_exporter_orgs",
        "pagemeter_org_exporter_skipped_orgs",
        "pagemeter_org_exporter_scrape_seconds",
        "pagemeter_org_exporter_up",
        # The webhook dispatchers' (dispatch/metrics.py).
        "pagemeter_webhook_deliveries_total",
        "pagemeter_webhook_failures_total",
        "pagemeter_webhook_retries_total",
        "pagemeter_webhook_dead_letters_total",
        "pagemeter_webhook_lag_seconds",
        "pagemeter_webhook_partitions_owned",
    }
    | {f"{name}_{suffix}" for name in _HISTOGRAMS for suffix in ("bucket", "sum", "count")}
)
# Not exported yet: the fail-open policy will add it; its alert waits for it.
PENDING_METRICS = frozenset({"pagemeter_fail_open_decisions_total"})

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan"}
)


# -- finding the binaries ----------------------------------------------------------------


def prometheus_binary(name: str) -> Path:
    """The promtool or prometheus binary to test with, or skip saying how to get it."""
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        path = Path(override) / name
        assert os.access(path, os.X_OK), f"{BIN_DIR_ENV}={override} has no executable {name}"
        return path
    path = TOOLS_BIN_DIR / name
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    pytest.skip(
        f"no {name}: run `make tools` (unpacks Debian's prometheus package into "
        f"{TOOLS_BIN_DIR.relative_to(REPO)}; needs apt) or set {BIN_DIR_ENV}"
    )


@pytest.fixture(scope="module")
def promtool() -> Path:
    return prometheus_binary("promtool")


def run_promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(promtool), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )
    # Shown by pytest for a failing test (and with -s for any).
    print(f"$ promtool {' '.join(args)}\n{result.stdout}{result.stderr}")
    return result


# -- reading PromQL out of the files -----------------------------------------------------


def yaml_exprs(text: str) -> list[str]:
    """The `expr:` values of a rules or rules-test file (one-line or `|` block scalars)."""
    exprs: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)(?:- )?expr:\s*(.*)$", line)
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if value in ("|", "|-", ">", ">-"):
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(block)
        exprs.append(value)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names and functions left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in _PROMQL_KEYWORDS:
            names.add(name)
    return names


def test_metric_names_are_read_from_promql() -> None:
    """The PromQL name reader finds selected metrics and leaves out functions, labels, keywords and Grafana variables."""
    expr = (
        'sort_desc(max by (org, metric) (pagemeter_org_committed_units{org=~"$org",x="a{b}"})'
        " / on (org) group_left (currency) (pagemeter_org_contract_quota_units > 0)) > bool 0.8"
        " or histogram_quantile(0.99, sum without (instance) "
        "(rate(grpc_server_handling_seconds_bucket[$__rate_interval] offset 5m)))"
    )
    assert metric_names(expr) == {
        "pagemeter_org_committed_units",
        "pagemeter_org_contract_quota_units",
        "grpc_server_handling_seconds_bucket",
    }


# -- the rules ---------------------------------------------------------------------------


def rule_names(kind: str) -> list[str]:
    return re.findall(rf"^\s*- {kind}:\s*(\S+)\s*$", RULES.read_text(), flags=re.MULTILINE)


def test_promtool_check_rules_accepts_the_rules(promtool: Path) -> None:
    """`promtool check rules` accepts deploy/prometheus/pagemeter-rules.yml with no error."""
    result = run_promtool(promtool, "check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass(promtool: Path) -> None:
    """Every case of `promtool test rules pagemeter-rules.test.yml` passes: each alert fires when it should and stays silent beside it."""
    result = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_rules_name_only_exported_metrics() -> None:
    """Every metric the rules and their unit tests select is one pagemeter exports, a recording rule of the file, or the coming fail-open counter."""
    recorded = set(rule_names("record"))
    known = EXPORTED_METRICS | PENDING_METRICS | recorded
    exprs = yaml_exprs(RULES.read_text()) + yaml_exprs(RULES_TEST.read_text())
    assert len(yaml_exprs(RULES.read_text())) == len(rule_names("alert")) + len(recorded)
    for expr in exprs:
        unknown = metric_names(expr) - known
        assert not unknown, f"{expr!r} names {sorted(unknown)}"
    used = set().union(*(metric_names(e) for e in yaml_exprs(RULES.read_text())))
    assert "pagemeter_fail_open_decisions_total" in used


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    """The promtool unit tests show every alert of the rules file both firing and not firing."""
    firing: set[str] = set()
    silent: set[str] = set()
    lines = RULES_TEST.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^\s*alertname:\s*(\S+)\s*$", line)
        if not match:
            continue
        expected = next(row for row in lines[i + 1 :] if "exp_alerts:" in row)
        (silent if expected.split("exp_alerts:")[1].strip() == "[]" else firing).add(match.group(1))
    alerts = set(rule_names("alert"))
    assert alerts, "no alerts found in the rules file"
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"
    assert (firing | silent) <= alerts, "unit tests of alerts the rules file lacks"


# -- the dashboard -----------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the panels and of the template variables' queries."""
    exprs = [
        target["expr"]
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        assert match, f"variable {variable['name']}: {query!r} is not label_values(expr, label)"
        exprs.append(match.group(1))
    return exprs


def test_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    """The dashboard is valid JSON for Grafana (schemaVersion 39) whose every panel and query uses the ${DS_PROMETHEUS} datasource variable, with an org variable."""
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["org"]["type"] == "query"
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            assert target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == source, variable["name"]


def test_dashboard_names_only_exported_metrics() -> None:
    """Every PromQL expression in the dashboard selects only metrics pagemeter exports, and together they show the service and per-organization metrics."""
    exprs = dashboard_exprs(load_dashboard())
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"{expr!r} selects no metric"
        unknown = names - EXPORTED_METRICS
        assert not unknown, f"{expr!r} names {sorted(unknown)}"
        used |= names
    for expected in (
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "pagemeter_check_decisions_total",
        "pagemeter_units_total",
        "pagemeter_redis_script_seconds_bucket",
        "pagemeter_redis_script_errors_total",
        "pagemeter_redis_up",
        "pagemeter_serving",
        "pagemeter_org_committed_units",
        "pagemeter_org_contract_quota_units",
        "pagemeter_org_overage_cost",
        "pagemeter_org_prepaid_balance_units",
    ):
        assert expected in used, f"no panel shows {expected}"


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts, so promtool can parse it."""
    expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_dashboard_promql_parses(promtool: Path, tmp_path: Path) -> None:
    """promtool parses every PromQL expression of the dashboard (as recording rules, Grafana's variables filled in)."""
    exprs = dashboard_exprs(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(expr)}
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    # JSON is YAML: promtool reads it as a rules file.
    (tmp_path / "dashboard-rules.yml").write_text(json.dumps(rules, indent=1))
    result = run_promtool(promtool, "check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
