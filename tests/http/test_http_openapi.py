"""The OpenAPI document: generated from the contract, valid OpenAPI 3.1, served at
/openapi.json, complete, and good enough for a generated client to call the API."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from openapi_spec_validator import validate

from pagemeter_server.gateway.routes import routes
from pagemeter_server.gateway.server import openapi_document
from tests.conftest import eagle_plan
from tests.http.conftest import ADMIN_TOKEN, SERVICE_TOKEN, HttpApi

BIN = Path(sys.executable).parent


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(openapi_document())
    return loaded


def test_the_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation


def test_the_document_is_what_the_protos_generate(repo_root: Path) -> None:
    """tools/openapi.py --check passes: the committed document matches the .proto files."""
    result = subprocess.run(
        [sys.executable, "tools/openapi.py", "--check"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_route_is_in_the_document_with_its_schemas() -> None:
    """Each route the server serves is an operation, with a request schema for bodies,
    its path parameters, a 200 schema and the google.rpc.Status failure schema."""
    doc = document()
    schemas = doc["components"]["schemas"]
    for route in routes():
        path = route.template.replace("{plan.org_id}", "{org_id}")
        operation = doc["paths"][path][route.verb.lower()]
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ok.rsplit("/", 1)[1] in schemas
        assert "default" in operation["responses"]
        in_path = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert in_path == {name.rsplit(".", 1)[-1] for name in route.path_fields}
        if route.body == "*":
            assert "requestBody" in operation
    assert "google.rpc.Status" in schemas


def test_descriptions_come_from_the_proto_comments() -> None:
    """The .proto comments describe the operations and fields (GetUsage's year range)."""
    doc = document()
    get_usage = doc["paths"]["/v1/usage"]["get"]
    assert "Never quota-limited" in get_usage["description"]
    year = next(p for p in get_usage["parameters"] if p["name"] == "year")
    assert "2020-2100" in year["schema"]["description"]


async def test_the_server_serves_the_document(api: HttpApi) -> None:
    """GET /openapi.json answers the packaged document, without credentials."""
    async with api.session.get(api.base + "/openapi.json") as response:
        assert response.status == 200
        assert await response.read() == openapi_document()


def generate_client(out: Path, spec: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(spec),
            "--meta",
            "none",
            "--output-path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "will not be generated" not in result.stdout, result.stdout


async def test_a_client_generated_from_the_document_calls_the_api(
    api: HttpApi, tmp_path: Path
) -> None:
    """openapi-python-client generates a client from /openapi.json that sets a plan,
    checks quota, records usage and reads it back with a tenant key: every operation is
    generated, and the answers parse into its models."""
    async with api.session.get(api.base + "/openapi.json") as response:
        spec = tmp_path / "openapi.json"
        spec.write_bytes(await response.read())
    generate_client(tmp_path / "pmhttp", spec)
    sys.path.insert(0, str(tmp_path))
    try:
        await asyncio.to_thread(_exercise_generated_client, api.base)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "pmhttp" or m.startswith("pmhttp.")]:
            del sys.modules[name]


def _exercise_generated_client(base: str) -> None:
    client_module = importlib.import_module("pmhttp.client")
    with (
        client_module.AuthenticatedClient(base_url=base, token=ADMIN_TOKEN) as admin,
        client_module.AuthenticatedClient(base_url=base, token=SERVICE_TOKEN) as service,
    ):
        key = _write_with_generated_client(admin, service)
    with client_module.AuthenticatedClient(base_url=base, token=key) as tenant:
        _read_with_generated_client(tenant)


def _write_with_generated_client(admin: Any, service: Any) -> str:
    """Set a plan, check and record 5 pages, create a tenant key; the key's secret."""
    models = importlib.import_module("pmhttp.models")
    set_plan = importlib.import_module("pmhttp.api.admin_service.admin_service_set_plan")
    create_key = importlib.import_module("pmhttp.api.admin_service.admin_service_create_api_key")
    check = importlib.import_module("pmhttp.api.quota_service.quota_service_check_quota")
    record = importlib.import_module("pmhttp.api.quota_service.quota_service_record_usage")
    plan = json_format.MessageToDict(eagle_plan("acme"))
    answer = set_plan.sync(
        org_id="acme",
        client=admin,
        body=models.PagemeterV1SetPlanRequest.from_dict({"plan": plan}),
    )
    assert isinstance(answer, models.PagemeterV1SetPlanResponse), answer
    decision = check.sync(
        org_id="acme",
        client=service,
        body=models.PagemeterV1CheckQuotaRequest.from_dict({"units": {"pages": "5"}}),
    )
    assert isinstance(decision, models.PagemeterV1CheckQuotaResponse), decision
    assert decision.allowed is True
    recorded = record.sync(
        org_id="acme",
        client=service,
        body=models.PagemeterV1RecordUsageRequest.from_dict(
            {"requestId": "gen-1", "units": {"pages": "5"}}
        ),
    )
    assert isinstance(recorded, models.PagemeterV1RecordUsageResponse), recorded
    key = create_key.sync(
        org_id="acme",
        client=admin,
        body=models.PagemeterV1CreateApiKeyRequest.from_dict({"name": "generated"}),
    )
    return str(key.secret)


def _read_with_generated_client(tenant: Any) -> None:
    """The tenant's own usage (5 pages), and a refused month as a google.rpc.Status."""
    models = importlib.import_module("pmhttp.models")
    own_usage = importlib.import_module("pmhttp.api.quota_service.quota_service_get_usage_2")
    usage = own_usage.sync(client=tenant)
    assert isinstance(usage, models.PagemeterV1GetUsageResponse), usage
    pages = next(m for m in usage.metrics if m.metric == "pages")
    assert str(pages.committed) == "5"
    refused = own_usage.sync(client=tenant, year=2026, month=13)
    assert isinstance(refused, models.GoogleRpcStatus), refused
    assert refused.message == "Invalid month. Must be an integer between 1 and 12."
