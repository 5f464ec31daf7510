"""docs/envoy.md: its configuration snippets parse, and build the descriptors pagemeter reads."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pagemeter_server.api.ratelimit import KNOWN_KEYS

BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)


def yaml_blocks(repo_root: Path) -> list[str]:
    return BLOCK.findall((repo_root / "docs" / "envoy.md").read_text())


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every key and value of a parsed YAML document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def test_every_yaml_snippet_parses(repo_root: Path) -> None:
    """Each yaml block of docs/envoy.md is one valid YAML document (the cluster, the filter, the routes, the JWT action, Istio's EnvoyFilter)."""
    blocks = yaml_blocks(repo_root)
    assert len(blocks) >= 5
    for block in blocks:
        assert yaml.safe_load(block) is not None


def test_snippets_use_only_the_descriptor_keys_pagemeter_reads(repo_root: Path) -> None:
    """Every descriptor_key in the snippets is one pagemeter reads, and the route snippets build all three."""
    keys = {
        value
        for block in yaml_blocks(repo_root)
        for key, value in walk(yaml.safe_load(block))
        if key == "descriptor_key"
    }
    assert keys == set(KNOWN_KEYS)


def test_filter_snippets_send_credentials_and_deny_on_failure(repo_root: Path) -> None:
    """Each ratelimit filter snippet sends a bearer token in initial_metadata and sets failure_mode_deny."""
    filters = [
        value
        for block in yaml_blocks(repo_root)
        for key, value in walk(yaml.safe_load(block))
        if key == "typed_config" and value["@type"].endswith("ratelimit.v3.RateLimit")
    ]
    assert len(filters) == 2  # Envoy's and Istio's
    for config in filters:
        assert config["failure_mode_deny"] is True
        metadata = config["rate_limit_service"]["grpc_service"]["initial_metadata"]
        assert metadata[0]["key"] == "authorization"
        assert metadata[0]["value"].startswith("Bearer ")
