"""A Python load driver for what h2load cannot do: calls whose bodies must differ.

h2load repeats one request body, so every call after the first of a RecordUsage
with one request_id is answered as a duplicate, and CheckQuota with hold=true
needs a new request_id per job. This driver sends distinct request ids from
several processes (grpc.aio under uvloop, pre-serialized request bytes, so the
driver spends as little as it can per call). It is slower per call than h2load:
its figures are labelled "Python driver" and compared with the empty handler
measured by the same driver.

Scenarios:
  empty           CheckQuota bytes to the empty handler (the driver's own floor)
  reserve_commit  CheckQuota hold=true with a new request_id, then RecordUsage of it
  record          RecordUsage with a new request_id (no hold)
  redis_floor     no gRPC: check.lua through one Redis client alone (the client's cost)
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import grpc

from pagemeter.v1 import quota_pb2

CHECK = "/pagemeter.v1.QuotaService/CheckQuota"
RECORD = "/pagemeter.v1.QuotaService/RecordUsage"

# Units each scenario commits per successful job (the counters check in run.py).
RESERVE_UNITS = {"pages": 2, "documents": 1}
RECORD_UNITS = {"pages": 1, "documents": 1}


async def _script_caller(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(call, close) for one Redis client: `call()` runs the spec's script once.

    spec["client"]: "redis-py" (redis-py's pool, as pagemeter configured it before
    decision 50), "pipelined" (pagemeter's pipelined connection on redis-py's
    handshake: the server's default), "valkey-glide" or "coredis" (when installed:
    `make bench` installs them into the bench's own folder, not as dependencies).
    """
    kind = spec.get("client", "redis-py")
    keys, args = spec["keys"], spec["args"]
    host, port = spec["url"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    if kind in ("redis-py", "pipelined"):
        from pagemeter_server.settings import parse_settings
        from pagemeter_server.store.connections import connect_redis

        client = connect_redis(spec["url"], parse_settings(["--redis-url", spec["url"]]))
        script = client.register_script(spec["script"])
        if kind == "pipelined":
            from pagemeter_server.store.coalesce import PipelinedScripts

            piped = PipelinedScripts(client)

            async def call() -> Any:
                return await piped.call(script, keys, args)
        else:

            async def call() -> Any:
                return await script(keys=keys, args=args)

        return call, client.aclose
    if kind == "valkey-glide":
        from glide import (  # type: ignore[import-not-found]
            GlideClient,
            GlideClientConfiguration,
            NodeAddress,
            Script,
        )

        glide = await GlideClient.create(GlideClientConfiguration([NodeAddress(host, int(port))]))
        glide_script = Script(spec["script"])
        text_args = [str(a) for a in args]

        async def call() -> Any:
            return await glide.invoke_script(glide_script, keys=keys, args=text_args)

        return call, glide.close
    if kind == "coredis":
        import coredis  # type: ignore[import-not-found]

        core = coredis.Redis(host=host, port=int(port), decode_responses=True)
        await core.__aenter__()
        core_script = core.register_script(spec["script"])

        async def call() -> Any:
            return await core_script(keys=keys, args=args)

        async def close() -> None:
            await core.__aexit__(None, None, None)

        return call, close
    raise ValueError(f"unknown Redis client {kind!r}")


async def _redis_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """EVALSHA of one script through one Redis client, nothing else.

    The cost of the Redis client path alone (the client, hiredis, the event loop),
    measured from one process: what every Redis-backed RPC pays on top of gRPC.
    """
    script, close = await _script_caller(spec)
    offset = time.monotonic() - time.time()
    start = spec["start_at"] + offset
    measure_from = start + spec["warm_up"]
    measure_to = measure_from + spec["duration"]
    latencies: list[float] = []

    async def one() -> None:
        while (now := time.monotonic()) < measure_to:
            await script()
            ended = time.monotonic()
            if measure_from <= ended < measure_to:
                latencies.append(ended - now)

    await script()  # loads the script, opens a connection
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    workers = asyncio.gather(*(one() for _ in range(spec["concurrency"])))
    # The process's CPU over the measured window (every thread: valkey-glide's
    # work is in its own), per call: the client's cost, whatever caps the rate.
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    cpu_from = time.process_time()
    await asyncio.sleep(max(0.0, measure_to - time.monotonic()))
    cpu_used = time.process_time() - cpu_from
    await workers
    await close()
    return {
        "cpu_seconds": cpu_used,
        "ops": len(latencies),
        "calls": len(latencies),
        "latencies": latencies,
        "call_latencies": {},
        "jobs_ok": 0,
        "errors": {},
        "unexpected": {},
    }


async def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    scenario: str = spec["scenario"]
    if scenario == "redis_floor":
        return await _redis_floor(spec)
    org: str = spec["org"]
    prefix = f"{spec['run_id']}-{scenario}-p{spec['index']}"
    # Wall-clock start shared by all processes, turned into this process's monotonic clock.
    offset = time.monotonic() - time.time()
    start = spec["start_at"] + offset
    measure_from = start + spec["warm_up"]
    measure_to = measure_from + spec["duration"]

    latencies: list[float] = []  # seconds per operation (a job = two calls) in the window
    call_latencies: dict[str, list[float]] = {"CheckQuota": [], "RecordUsage": []}
    ops_in_window = 0
    calls_in_window = 0
    jobs_ok = 0  # every job acknowledged as committed, window or not (counters check)
    errors: collections.Counter[str] = collections.Counter()
    unexpected: collections.Counter[str] = collections.Counter()

    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        # No serializers: the multicallables take and return bytes.
        check = channel.unary_unary(CHECK, None, None)
        record = channel.unary_unary(RECORD, None, None)
        await asyncio.wait_for(channel.channel_ready(), 10)
        empty_body = quota_pb2.CheckQuotaRequest(
            org_id=org, units={"pages": 3, "documents": 1}
        ).SerializeToString()

        async def one(worker: int) -> None:
            nonlocal ops_in_window, calls_in_window, jobs_ok
            n = 0
            while True:
                now = time.monotonic()
                if now >= measure_to:
                    return
                request_id = f"{prefix}-{worker}-{n}"
                n += 1
                began = now
                calls = 1
                timings: list[tuple[str, float]] = []
                try:
                    if scenario == "empty":
                        await check(empty_body, timeout=10)
                    elif scenario == "reserve_commit":
                        calls = 2
                        held = quota_pb2.CheckQuotaResponse.FromString(
                            await check(
                                quota_pb2.CheckQuotaRequest(
                                    org_id=org,
                                    units=RESERVE_UNITS,
                                    request_id=request_id,
                                    hold=True,
                                ).SerializeToString(),
                                timeout=10,
                            )
                        )
                        middle = time.monotonic()
                        timings.append(("CheckQuota", middle - began))
                        if not held.held:
                            unexpected["CheckQuota not held"] += 1
                            continue
                        done = quota_pb2.RecordUsageResponse.FromString(
                            await record(
                                quota_pb2.RecordUsageRequest(
                                    org_id=org, request_id=request_id, units=RESERVE_UNITS
                                ).SerializeToString(),
                                timeout=10,
                            )
                        )
                        timings.append(("RecordUsage", time.monotonic() - middle))
                        if done.duplicate or done.status != quota_pb2.RECORD_STATUS_COMPLETED:
                            unexpected["RecordUsage not a new completed record"] += 1
                            continue
                        jobs_ok += 1
                    elif scenario == "record":
                        done = quota_pb2.RecordUsageResponse.FromString(
                            await record(
                                quota_pb2.RecordUsageRequest(
                                    org_id=org, request_id=request_id, units=RECORD_UNITS
                                ).SerializeToString(),
                                timeout=10,
                            )
                        )
                        if done.duplicate or done.status != quota_pb2.RECORD_STATUS_COMPLETED:
                            unexpected["RecordUsage not a new completed record"] += 1
                            continue
                        jobs_ok += 1
                    else:
                        raise ValueError(f"unknown scenario {scenario}")
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                ended = time.monotonic()
                if measure_from <= ended < measure_to:
                    ops_in_window += 1
                    calls_in_window += calls
                    latencies.append(ended - began)
                    for name, seconds in timings:
                        call_latencies[name].append(seconds)

        await asyncio.sleep(max(0.0, start - time.monotonic()))
        await asyncio.gather(*(one(w) for w in range(spec["concurrency"])))

    return {
        "ops": ops_in_window,
        "calls": calls_in_window,
        "latencies": latencies,
        "call_latencies": call_latencies,
        "jobs_ok": jobs_ok,
        "errors": dict(errors),
        "unexpected": dict(unexpected),
    }


def worker(spec: dict[str, Any], results: Any) -> None:
    """Process entry point: drive one scenario, put the result on `results`."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed on Linux
        outcome = asyncio.run(_drive(spec))
    else:
        outcome = uvloop.run(_drive(spec))
    results.put(outcome)
