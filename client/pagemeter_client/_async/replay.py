"""One replay pass over the acknowledged requests of a client (see pagemeter_client.replay)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from pagemeter.v1 import quota_pb2, quota_pb2_grpc
from pagemeter_client.replay import (
    REPLAYING,
    AcknowledgedLog,
    ReplayResult,
    _batch_failed,
    _batch_item,
    _hold_expired,
    _Tally,
    hold_outcome,
    plan,
    release_outcome,
)


async def replay_async(
    acknowledged: AcknowledgedLog,
    quota: quota_pb2_grpc.QuotaServiceAsyncStub,
    *,
    deadline: float,
    metadata: tuple[tuple[str, str], ...],
    should_stop: Callable[[], bool] = lambda: False,
) -> ReplayResult:
    """One pass over the window, on the client's stub (see pagemeter_client.replay)."""
    marker = REPLAYING.set(True)
    try:
        tally = _Tally()
        for kind, entries in plan(acknowledged.snapshot()):
            if tally.stopped or should_stop():
                break
            if kind == "hold":
                entry = entries[0]
                if _hold_expired(entry):
                    tally.add(entry, "expired")
                    continue
                try:
                    answer = await quota.CheckQuota(
                        entry.check(), timeout=deadline, metadata=metadata
                    )
                except grpc.RpcError as error:
                    tally.error(entry, error)
                else:
                    tally.add(entry, hold_outcome(answer))
            elif kind == "record":
                request = quota_pb2.RecordUsageBatchRequest(items=[e.record() for e in entries])
                try:
                    batch = await quota.RecordUsageBatch(
                        request, timeout=deadline, metadata=metadata
                    )
                except grpc.RpcError as error:
                    _batch_failed(tally, entries, error)
                else:
                    for entry, item in zip(entries, batch.items, strict=True):
                        _batch_item(tally, entry, item)
            else:
                entry = entries[0]
                try:
                    released = await quota.ReleaseQuota(
                        entry.release(), timeout=deadline, metadata=metadata
                    )
                except grpc.RpcError as error:
                    tally.error(entry, error)
                else:
                    tally.add(entry, release_outcome(entry.release_outcome, released))
        result = tally.result()
    finally:
        REPLAYING.reset(marker)
    if result.stopped or result.deferred:
        acknowledged.rearm()
    acknowledged.finished(result)
    return result
