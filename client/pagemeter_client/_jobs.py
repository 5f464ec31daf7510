"""What both kinds of reservation share: their state and how a job of unknown outcome is settled."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import grpc.aio

from pagemeter.v1 import (
    quota_pb2,
)
from pagemeter_client._errors import UsageQueued, error_details


class _ReservationState:
    """What both kinds of reservation know about their job."""

    def __init__(
        self,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        decision: quota_pb2.CheckQuotaResponse,
    ) -> None:
        self.org_id = org_id
        self.request_id = request_id
        self.units = dict(units)
        self.decision = decision
        # Set by the first commit/fail/release attempt, even one that raised: the
        # context manager must not then settle the job a second, different way
        # (that would be refused as a reused request_id, or record finished work
        # as failed). Retrying the same call by hand is safe: it is idempotent.
        self.settled = False


# A call answered with one of these may or may not have been applied: pagemeter
# gave up waiting for Redis (UNAVAILABLE after its Redis timeout), or the caller
# did (DEADLINE_EXCEEDED, CANCELLED). Resending it with the same request_id is
# exact either way (docs/reliability.md).
UNKNOWN_OUTCOME = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
# How long reserve() keeps trying to release a hold of unknown outcome, and the
# pause between its tries (each also bounded by gRPC's own retries).
RELEASE_WINDOW = 2.0
RELEASE_RETRY_PAUSE = 0.1


def _outcome_unknown(error: grpc.RpcError) -> bool:
    code = getattr(error, "code", None)  # grpc.Call and grpc.aio.AioRpcError both have it
    return callable(code) and code() in UNKNOWN_OUTCOME


def _note_settle_failure(body_error: BaseException, settle_error: grpc.RpcError) -> None:
    # The body's exception is what the caller must see; a failure to record the
    # failed job is secondary (the hold still expires after its TTL).
    details = error_details(settle_error)
    body_error.add_note(
        f"pagemeter: recording the failed job also failed ({details.code.name}: "
        f"{details.message}); its hold expires after its TTL"
    )


def _note_settle_queued(body_error: BaseException, queued: UsageQueued) -> None:
    body_error.add_note(
        f"pagemeter: the failed job could not be recorded now ({queued.code.name}); it is "
        f"queued in the outbox as record {queued.entry.id} and will be delivered later"
    )
