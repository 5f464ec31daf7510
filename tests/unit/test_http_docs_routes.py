"""docs/http.md's route table is the server's: every route the contract declares, and
no other."""

from __future__ import annotations

import re
from pathlib import Path

from pagemeter_server.gateway.routes import routes

DOC = Path(__file__).resolve().parents[2] / "docs" / "http.md"
_ROW = re.compile(r"^\| `(GET|PUT|POST|PATCH|DELETE) (/v1/[^`]*)` \| (\w+)", re.M)


def test_the_route_table_lists_every_route_with_its_rpc() -> None:
    """Each (method, path template, RPC) of the contract is a row of the table, and each
    row is one of the contract's."""
    documented = set(_ROW.findall(DOC.read_text()))
    declared = {(r.verb, r.template, r.method.name) for r in routes()}
    assert declared - documented == set(), "routes missing from docs/http.md"
    assert documented - declared == set(), "docs/http.md lists routes the server lacks"
