"""A real Prometheus scraping the real `pagemeter-server` command, with pagemeter's rules loaded.

The server runs as a subprocess with its embedded Redis, on free loopback ports.
Two organizations get a plan and usage through the gRPC API (one at 85 % of its
contract quota, one at 10 %); then Prometheus (Debian's static binary, see
`make tools`) scrapes every second and its HTTP API is asked what operators ask.
Everything started here is killed in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_server.ops.embedded import REDIS_SERVER_ENV, free_port
from tests.system.test_prometheus_rules import (
    RULES,
    dashboard_exprs,
    grafana_to_promql,
    load_dashboard,
    prometheus_binary,
)

pytestmark = pytest.mark.timeout(60)

SERVER_COMMAND = Path(sys.executable).parent / "pagemeter-server"
STARTUP_DEADLINE_SECONDS = 20.0
SCRAPE_DEADLINE_SECONDS = 20.0
RPC_TIMEOUT_SECONDS = 5.0
HIGH_ORG = "scrape-high"  # 850 of 1000 pages: 85 %
LOW_ORG = "scrape-low"  # 100 of 1000 pages: 10 %
T = TypeVar("T")


def wait_for(
    produce: Callable[[], T | None], timeout: float, what: str, log: Callable[[], str]
) -> T:
    """Call produce until it returns something other than None, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = produce()
        if value is not None:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{log()}")


def kill_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process's group, then SIGKILL it if it is still there after grace seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@dataclass
class Stack:
    """pagemeter-server and the Prometheus scraping it."""

    base: Path
    metrics_port: int
    prometheus_port: int
    server: subprocess.Popen[bytes] | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    redis_pids: tuple[int, ...] = ()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def logs(self) -> str:
        parts = []
        for name in ("server.log", "prometheus.log"):
            path = self.base / name
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} (last 4000 characters) ---\n{text[-4000:]}")
        return "\n".join(parts)

    def api(self, path: str, **params: str) -> Any:
        """A Prometheus HTTP API call; its `data` on success."""
        url = f"http://127.0.0.1:{self.prometheus_port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why
            with exc:
                reason = exc.read().decode(errors="replace")
            pytest.fail(f"{url}: HTTP {exc.code}: {reason}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector Prometheus answers for expr now."""
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_until(
        self, expr: str, accept: Callable[[list[dict[str, Any]]], bool]
    ) -> list[dict[str, Any]]:
        """expr's result once accept() takes it (scrapes and rule evaluations run every second)."""

        def attempt() -> list[dict[str, Any]] | None:
            result = self.query(expr)
            return result if accept(result) else None

        def log() -> str:
            return f"last result of {expr}: {self.query(expr)}\n{self.logs()}"

        return wait_for(attempt, SCRAPE_DEADLINE_SECONDS, f"Prometheus to answer {expr}", log)

    def cleanup(self) -> None:
        for process in (self.prometheus, self.server):
            if process is not None:
                kill_group(process, 5.0)
        for pid in self.redis_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


# -- pagemeter ---------------------------------------------------------------------------


def start_server(stack: Stack, grpc_port: int) -> grpc.Channel:
    assert os.access(SERVER_COMMAND, os.X_OK), f"no {SERVER_COMMAND}: run `make install`"
    # No PAGEMETER_* setting of the caller may leak in; only the redis-server binary is kept.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PAGEMETER_") or k == REDIS_SERVER_ENV
    }
    with (stack.base / "server.log").open("ab") as log:
        stack.server = subprocess.Popen(
            [
                str(SERVER_COMMAND),
                "--listen",
                f"127.0.0.1:{grpc_port}",
                "--metrics-listen",
                f"127.0.0.1:{stack.metrics_port}",
                "--http-listen",
                "",
                "--data-dir",
                str(stack.base / "data"),
                "--dev-open-access",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    server = stack.server

    def serving() -> bool | None:
        if server.poll() is not None:
            pytest.fail(f"pagemeter-server exited with {server.returncode}\n{stack.logs()}")
        with contextlib.suppress(grpc.RpcError):
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        return None

    wait_for(serving, STARTUP_DEADLINE_SECONDS, "pagemeter-server to serve", stack.logs)
    stack.redis_pids = tuple(child.pid for child in psutil.Process(server.pid).children())
    return channel


def seed(channel: grpc.Channel) -> None:
    """Plans for two organizations, their usage, and one denied check."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    quota = quota_pb2_grpc.QuotaServiceStub(channel)
    plans = (
        plan_pb2.Plan(
            org_id=HIGH_ORG,
            name="Business",
            timezone="Europe/Berlin",
            currency="EUR",
            metrics=[plan_pb2.MetricLimits(metric="pages", contract_quota=1000)],
        ),
        plan_pb2.Plan(
            org_id=LOW_ORG,
            name="Business",
            timezone="UTC",
            metrics=[
                plan_pb2.MetricLimits(
                    metric="pages",
                    contract_quota=1000,
                    overage_allowed=True,
                    hard_limit=1500,
                    overage_price_per_unit="0.028",
                )
            ],
        ),
    )
    for plan in plans:
        admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan), timeout=RPC_TIMEOUT_SECONDS)
    for org, pages in ((HIGH_ORG, 850), (LOW_ORG, 100)):
        check = quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id=org, units={"pages": pages}, request_id=f"{org}-job", hold=True
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        assert check.allowed and check.held, check
        record = quota.RecordUsage(
            quota_pb2.RecordUsageRequest(
                org_id=org, request_id=f"{org}-job", units={"pages": pages}
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        assert record.status == quota_pb2.RECORD_STATUS_COMPLETED, record
    # 850 + 200 pages would pass the quota of a plan without overage: denied.
    denied = quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id=HIGH_ORG, units={"pages": 200}),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    assert not denied.allowed and denied.reason == quota_pb2.DECISION_REASON_QUOTA_EXCEEDED


# -- Prometheus --------------------------------------------------------------------------


def start_prometheus(stack: Stack, prometheus: Path) -> None:
    config = stack.base / "prometheus.yml"
    # JSON is YAML: no YAML library needed to write Prometheus's configuration.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "pagemeter",
                        "scrape_timeout": "1s",
                        "static_configs": [{"targets": [f"127.0.0.1:{stack.metrics_port}"]}],
                    }
                ],
            },
            indent=1,
        )
    )
    with (stack.base / "prometheus.log").open("ab") as log:
        stack.prometheus = subprocess.Popen(
            [
                str(prometheus),
                f"--config.file={config}",
                f"--storage.tsdb.path={stack.base / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{stack.prometheus_port}",
            ],
            cwd=stack.base,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = stack.prometheus

    def ready() -> bool | None:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}\n{stack.logs()}")
        try:
            url = f"http://127.0.0.1:{stack.prometheus_port}/-/ready"
            with urllib.request.urlopen(url, timeout=1) as response:
                return True if response.status == 200 else None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    wait_for(ready, STARTUP_DEADLINE_SECONDS, "prometheus to be ready", stack.logs)
    # The first scrape of pagemeter.
    stack.query_until('up{job="pagemeter"} == 1', bool)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """pagemeter-server with two organizations' usage, scraped every second by Prometheus."""
    prometheus = prometheus_binary("prometheus")
    base = tmp_path_factory.mktemp("prometheus-scrape")
    running = Stack(base=base, metrics_port=free_port(), prometheus_port=free_port())
    channel: grpc.Channel | None = None
    try:
        channel = start_server(running, free_port())
        seed(channel)
        start_prometheus(running, prometheus)
        yield running
    finally:
        if channel is not None:
            channel.close()
        running.cleanup()


def one_sample(result: list[dict[str, Any]]) -> tuple[dict[str, str], float]:
    assert len(result) == 1, result
    labels: dict[str, str] = result[0]["metric"]
    return labels, float(result[0]["value"][1])


# -- what operators ask ------------------------------------------------------------------


def test_per_org_usage_is_scraped(stack: Stack) -> None:
    """Prometheus holds each organization's committed pages and contract quota, as scraped from pagemeter's per-organization exporter."""
    for org, committed in ((HIGH_ORG, 850), (LOW_ORG, 100)):
        result = stack.query_until(
            f'pagemeter_org_committed_units{{org="{org}",metric="pages"}}', bool
        )
        labels, value = one_sample(result)
        assert value == committed, (org, result)
        assert labels["job"] == "pagemeter"
        _, quota = one_sample(
            stack.query(f'pagemeter_org_contract_quota_units{{org="{org}",metric="pages"}}')
        )
        assert quota == 1000
    _, hard_limit = one_sample(
        stack.query(f'pagemeter_org_hard_limit_units{{org="{LOW_ORG}",metric="pages"}}')
    )
    assert hard_limit == 1500
    assert stack.query(f'pagemeter_org_hard_limit_units{{org="{HIGH_ORG}"}}') == []
    _, exported = one_sample(stack.query('pagemeter_org_exporter_orgs{job="pagemeter"}'))
    assert exported == 2


def test_decision_counters_are_scraped(stack: Stack) -> None:
    """Prometheus counts the two allowed checks (within_quota) and the one denied check (quota_exceeded) the organizations made."""
    selector = 'job="pagemeter",metric="pages"'
    allowed = stack.query_until(
        f'sum(pagemeter_check_decisions_total{{{selector},decision="allowed",reason="within_quota"}})',
        bool,
    )
    assert one_sample(allowed)[1] == 2
    denied = stack.query(
        f'sum(pagemeter_check_decisions_total{{{selector},decision="denied",reason="quota_exceeded"}})'
    )
    assert one_sample(denied)[1] == 1
    handled = stack.query(
        'sum(grpc_server_handled_total{grpc_service="pagemeter.v1.QuotaService",'
        'grpc_method="CheckQuota",grpc_code="OK"})'
    )
    assert one_sample(handled)[1] == 3


def test_eighty_percent_query_returns_exactly_the_org_above_it(stack: Stack) -> None:
    """`pagemeter_org_committed_units / pagemeter_org_contract_quota_units > 0.8` returns the organization at 85 % and not the one at 10 %."""
    result = stack.query_until(
        "pagemeter_org_committed_units / pagemeter_org_contract_quota_units > 0.8", bool
    )
    labels, ratio = one_sample(result)
    assert (labels["org"], labels["metric"]) == (HIGH_ORG, "pages")
    assert ratio == pytest.approx(0.85)


def test_rules_load_and_evaluate_on_real_series(stack: Stack) -> None:
    """Prometheus loads pagemeter's rules without error, records the quota ratio of both organizations, and holds the 80 % alert pending for the 85 % one only."""
    ratios = stack.query_until("pagemeter:org_quota_used:ratio", lambda r: len(r) == 2)
    assert {r["metric"]["org"]: float(r["value"][1]) for r in ratios} == pytest.approx(
        {HIGH_ORG: 0.85, LOW_ORG: 0.1}
    )
    groups = stack.api("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {group["file"] for group in groups} == {str(RULES)}
    assert len(rules) >= 10
    for rule in rules:
        assert rule["health"] == "ok", rule
        if rule["type"] == "alerting":
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["name"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["name"]

    def near_quota_alerts() -> list[dict[str, Any]] | None:
        alerts = [
            a
            for a in stack.api("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == "PagemeterOrgNearQuota"
        ]
        return alerts or None

    alerts = wait_for(near_quota_alerts, SCRAPE_DEADLINE_SECONDS, "the 80 % alert", stack.logs)
    assert [(a["labels"]["org"], a["state"]) for a in alerts] == [(HIGH_ORG, "pending")]
    # The service is healthy: none of its alerts is pending or firing.
    active = {a["labels"]["alertname"] for a in stack.api("/api/v1/alerts")["alerts"]}
    assert active == {"PagemeterOrgNearQuota"}


def test_dashboard_queries_run_and_rank_organizations(stack: Stack) -> None:
    """Prometheus evaluates every query of the Grafana dashboard without error, and the organization table's share-of-quota query ranks the 85 % organization before the 10 % one."""
    dashboard = load_dashboard()
    for expr in dashboard_exprs(dashboard):
        stack.query(grafana_to_promql(expr))
    (table,) = [p for p in dashboard["panels"] if p["type"] == "table"]
    share = grafana_to_promql(table["targets"][0]["expr"])
    result = stack.query_until(share, lambda r: len(r) == 2)
    ranked: list[tuple[str, object]] = [(r["metric"]["org"], float(r["value"][1])) for r in result]
    assert ranked == [
        (HIGH_ORG, pytest.approx(0.85)),
        (LOW_ORG, pytest.approx(0.1)),
    ]
    serving = stack.query(grafana_to_promql(dashboard_expr(dashboard, "Serving")))
    assert one_sample(serving)[1] == 1


def dashboard_expr(dashboard: dict[str, Any], title: str) -> str:
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    expr: str = panel["targets"][0]["expr"]
    return expr


def test_promtool_check_metrics_finds_no_lint_problem(stack: Stack) -> None:
    """`promtool check metrics` on a real scrape of pagemeter's /metrics (service and per-organization metrics) reports no problem."""
    promtool = prometheus_binary("promtool")
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        body = response.read()
    assert b"pagemeter_org_committed_units{" in body
    assert b"grpc_server_handled_total{" in body
    result = subprocess.run(
        [str(promtool), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    print(f"$ promtool check metrics\n{output}")
    assert result.returncode == 0, output
    assert output.strip() == "", output
