"""The migration of stored plans, run as an operator runs it: the
`pagemeter-server migrate-plans` command on a store written by the earlier
release, and a server on its own embedded store migrating at start."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest
import redis

from pagemeter.v1 import admin_pb2, admin_pb2_grpc
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.store.keys import ORGS_KEY, PLAN_SCHEMA_KEY, OrgKeys
from server_process import SERVER, ServerProcess
from tests.conftest import eagle_plan
from tests.rules.test_plan_migration import v1_json


def write_earlier_release_plans(client: redis.Redis, orgs: list[str]) -> None:
    """Plans as the earlier release stored them: schema 1, version 1, in the org list."""
    for org in orgs:
        keys = OrgKeys(org)
        text = v1_json(eagle_plan(org_id=org))
        client.hset(keys.plan, mapping={"json": text, "version": 1, "updated_ms": 1})
        client.hset(keys.planver, "1", text)
        client.zadd(ORGS_KEY, {org: 0})


def schemas(client: redis.Redis, orgs: list[str]) -> list[object]:
    return [json.loads(str(client.hget(OrgKeys(org).plan, "json"))).get("schema") for org in orgs]


def migrate_command(url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
    return subprocess.run(
        [str(SERVER), "migrate-plans", "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_migrate_plans_command_rewrites_every_plan_once(tmp_path: Path) -> None:
    """`pagemeter-server migrate-plans` exits 0 with every plan in schema 2 and the store
    marked; a second run exits 0 and changes no byte."""
    store = RedisProcess(tmp_path / "redis")
    store.start()
    client = redis.Redis.from_url(store.url, decode_responses=True)
    try:
        orgs = ["acme", "globex", "initech"]
        write_earlier_release_plans(client, orgs)
        assert schemas(client, orgs) == [None, None, None]

        first = migrate_command(store.url)
        assert first.returncode == 0, first.stderr
        assert "Traceback" not in first.stderr
        assert schemas(client, orgs) == [2, 2, 2]
        assert client.get(PLAN_SCHEMA_KEY) == "2"
        stored = {org: client.hgetall(OrgKeys(org).planver) for org in orgs}

        second = migrate_command(store.url)
        assert second.returncode == 0, second.stderr
        assert {org: client.hgetall(OrgKeys(org).planver) for org in orgs} == stored
    finally:
        client.close()
        store.stop()


def test_migrate_plans_command_without_a_store_exits_1_with_a_reason(tmp_path: Path) -> None:
    """With no Redis at the URL the command says so in one line and exits 1."""
    result = migrate_command("redis://127.0.0.1:1")
    assert result.returncode == 1
    assert "could not migrate the stored plans" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_server_on_its_embedded_store_migrates_at_start(tmp_path: Path, workers: int) -> None:
    """A server that starts its own embedded store (no other server can share it)
    migrates the plans an earlier release left in its data dir, then serves them;
    with --workers the supervisor, which owns the store, migrates before the workers start."""
    data = tmp_path / "data"
    earlier = RedisProcess(data)
    earlier.start()
    client = redis.Redis.from_url(earlier.url, decode_responses=True)
    write_earlier_release_plans(client, ["acme"])
    client.close()
    earlier.stop()

    server = ServerProcess.pagemeter(
        ["--data-dir", str(data), "--dev-open-access", "--workers", str(workers)],
        tmp_path / "s.log",
    )
    server.start()
    try:
        server.wait_until_serving()
        with grpc.insecure_channel(server.target) as channel:
            plan = admin_pb2_grpc.AdminServiceStub(channel).GetPlan(
                admin_pb2.GetPlanRequest(org_id="acme"), timeout=10
            )
        assert plan.plan.name == eagle_plan().name
        assert "migrated to the plan document of schema 2: 1 organizations" in server.log_text()
    finally:
        assert server.stop() == 0, server.log_tail()
    again = RedisProcess(data)
    again.start()
    client = redis.Redis.from_url(again.url, decode_responses=True)
    try:
        assert schemas(client, ["acme"]) == [2]
    finally:
        client.close()
        again.stop()
