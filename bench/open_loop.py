"""Open-loop load at a fixed rate with evenly spaced arrivals, for latency at a given rate.

h2load's `--rps` sends its requests in bursts: every ~10 ms, the requests due
since the last burst leave together (about 10 of them at 1,000 calls/s), so the
last of a burst waits for the nine before it and the percentiles measure the
burst, not the server at that rate. Here one sender thread issues each call at
its own time, i/rate after the start, on one channel (one HTTP/2 connection,
like `h2load -c 1`), through grpc's C-core client (its `future()` calls, a few
tens of µs of client CPU each, so the sender keeps its schedule).

A call's latency is taken from the time it was due, not from when it left: a
sender running late counts against the server's figure, never for it (no
coordinated omission).

    python bench/open_loop.py --target 127.0.0.1:50051 --rate 1000 --duration 10
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
from typing import Any

import grpc

SERVICE = "pagemeter.v1.QuotaService"


def run(
    target: str,
    method: str,
    body: bytes,
    rate: float,
    duration: float,
    warm_up: float,
) -> dict[str, Any]:
    """Send `rate` calls per second for warm_up + duration seconds; the measured
    ones are those due after the warm-up."""
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    call = channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    lock = threading.Lock()
    latencies: list[float] = []
    codes: dict[str, int] = {}
    total = int((warm_up + duration) * rate)
    measured_from = int(warm_up * rate)
    outstanding = threading.Semaphore(0)

    def finished(future: Any, due: float, measured: bool) -> None:
        ended = time.perf_counter()
        code = future.code().name
        with lock:
            codes[code] = codes.get(code, 0) + 1
            if measured and code == "OK":
                latencies.append(ended - due)
        outstanding.release()

    start = time.perf_counter() + 0.05
    late = 0
    for index in range(total):
        due = start + index / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.001:
            late += 1
        future = call.future(body, timeout=10)
        future.add_done_callback(
            functools.partial(finished, due=due, measured=index >= measured_from)
        )
    for _ in range(total):
        outstanding.acquire(timeout=15)
    elapsed = time.perf_counter() - start
    channel.close()
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000

    return {
        "tool": "open loop (evenly spaced arrivals, 1 connection)",
        "calls": total,
        "calls_per_s": total / elapsed,
        "measured": len(latencies),
        "p50_ms": percentile(0.50) if latencies else None,
        "p99_ms": percentile(0.99) if latencies else None,
        "max_ms": latencies[-1] * 1000 if latencies else None,
        "mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else None,
        "codes": codes,
        "sent_late_over_1ms": late,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", default="CheckQuota")
    parser.add_argument("--body-file", required=True, help="the serialized request message")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warm-up", type=float, default=2.0)
    args = parser.parse_args()
    with open(args.body_file, "rb") as handle:
        body = handle.read()
    result = run(args.target, args.method, body, args.rate, args.duration, args.warm_up)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
