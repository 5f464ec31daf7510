"""The coalescing client's pure parts: its settings, the errors a batch item
becomes, and gRPC's backoff (pagemeter_client._coalesce)."""

from __future__ import annotations

import grpc
import pytest

from pagemeter.v1 import quota_pb2
from pagemeter_client import error_details
from pagemeter_client._channel import RetryPolicy
from pagemeter_client._coalesce import (
    ITEM_MESSAGE_KEPT,
    ITEM_VIOLATIONS_KEPT,
    Batching,
    backoff,
    item_error,
    item_error_is_complete,
)
from pagemeter_client.outbox import status_code


def test_a_batch_item_error_reads_as_the_single_calls_error() -> None:
    """A BatchItemError becomes an AioRpcError whose code, message, BadRequest and ErrorInfo error_details reads as the server packs them."""
    refused = quota_pb2.BatchItemError(
        code="INVALID_ARGUMENT",
        message="request_id must be 1 to 128 characters",
        reason="BAD_ID",
        field_violations=[quota_pb2.FieldProblem(field="request_id", description="too long")],
    )
    details = error_details(item_error(refused))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.message == "request_id must be 1 to 128 characters"
    assert details.field_violations == [("request_id", "too long")]
    assert [(i.reason, i.domain) for i in details.error_infos] == [("BAD_ID", "pagemeter")]


def test_an_item_error_is_complete_only_when_nothing_may_be_missing() -> None:
    """An ErrorInfo reason (its metadata is not carried), a full list of violations or a message at the cut length may be incomplete."""
    violation = quota_pb2.FieldProblem(field="f", description="d")
    assert item_error_is_complete(quota_pb2.BatchItemError(code="INVALID_ARGUMENT", message="m"))
    assert not item_error_is_complete(quota_pb2.BatchItemError(code="X", reason="R"))
    assert not item_error_is_complete(
        quota_pb2.BatchItemError(code="X", field_violations=[violation] * ITEM_VIOLATIONS_KEPT)
    )
    assert not item_error_is_complete(
        quota_pb2.BatchItemError(code="X", message="m" * ITEM_MESSAGE_KEPT)
    )


def test_status_codes_by_name() -> None:
    """Code names map to grpc.StatusCode; a name grpc lacks is UNKNOWN."""
    assert status_code("ALREADY_EXISTS") == grpc.StatusCode.ALREADY_EXISTS
    assert status_code("NOT_A_CODE") == grpc.StatusCode.UNKNOWN


def test_backoff_stays_under_grpcs_exponential_bound() -> None:
    """The pause before attempt n+1 is random between 0 and min(initial x multiplier^(n-1), max)."""
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.2, max_backoff=0.5)
    for attempt, bound in ((1, 0.2), (2, 0.4), (3, 0.5), (4, 0.5)):
        pauses = [backoff(policy, attempt) for _ in range(200)]
        assert all(0 <= pause <= bound for pause in pauses)
        assert max(pauses) > bound / 2


def test_batching_settings() -> None:
    """Deadlines within max(linger, 1 ms) share a batch; the ranges are checked."""
    assert Batching(linger=0).slack == 0.001
    assert Batching(linger=0.05).slack == 0.05
    with pytest.raises(ValueError, match="batch_linger"):
        Batching(linger=True)
    with pytest.raises(ValueError, match="batch_max_items"):
        Batching(max_items=2.5)  # type: ignore[arg-type]
