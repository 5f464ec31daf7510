"""`make bench`'s SDK batching phase (issue 18, item 4): decisions per second through
the async SDK with 64 concurrent jobs in one client process, coalesced against not.

One client process (spawned, pinned to the load core like the other load
generators) runs an AsyncPagemeterClient on the default asyncio loop, as an
application would, with JOBS tasks that each call `check_quota` in a loop. The
same pagemeter-server serves both sides, in alternating rounds (the order flips
each round, so a drift of the host weighs on both); the figure is the median of
the rounds' ratios. Each round also reports the server's CPU, the client's CPU
per decision, the batch RPCs and single RPCs the server handled (so the
coalesced side's mean batch size), and p50/p99 per call as the caller sees it.
Every answer must be an allowed decision and every RPC must end OK.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import queue
import statistics
import time
from typing import Any

import grpc

from pagemeter_client import AsyncPagemeterClient

JOBS = 64
SIDES = ("coalesced", "single")
LABEL = "SDK check_quota, 64 jobs, {side}, round {round}"
UNITS = {"pages": 3, "documents": 1}


# -- the client process -----------------------------------------------------------------


def client_worker(spec: dict[str, Any], results: Any) -> None:
    """Entry point of the spawned client process: one side's run, its outcome to `results`."""
    results.put(asyncio.run(_run_jobs(spec)))


async def _run_jobs(spec: dict[str, Any]) -> dict[str, Any]:
    measure_from = spec["start_at"] + spec["warm_up"]
    measure_to = measure_from + spec["duration"]
    decided = 0
    total = 0
    denied = 0
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    # The client's defaults (linger 1 ms, 100 items): what an application gets.
    async with AsyncPagemeterClient(
        spec["target"], batching=spec["batching"], timeout=10.0
    ) as client:
        await client.get_usage(spec["org"])  # connected before the clock starts
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))

        async def job() -> None:
            nonlocal decided, total, denied
            while (started_at := time.time()) < measure_to:
                started = time.perf_counter()
                try:
                    answer = await client.check_quota(spec["org"], UNITS)
                except grpc.RpcError as error:
                    errors[str(getattr(error, "code", lambda: "?")())] += 1
                    continue
                took = time.perf_counter() - started
                total += 1
                denied += not answer.allowed
                if measure_from <= started_at and time.time() <= measure_to:
                    decided += 1
                    latencies.append(took)

        cpu_before = time.process_time()
        await asyncio.gather(*(job() for _ in range(JOBS)))
        cpu = time.process_time() - cpu_before
    latencies.sort()
    return {
        "decided": decided,
        "total": total,
        "denied": denied,
        "errors": dict(errors),
        "client_cpu_s": cpu,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


# -- the phase, driven by bench/run.py ---------------------------------------------------


def measure(bench: Any, org: str, cpu_use: Any, rounds: int = 2) -> None:
    """`rounds` alternating pairs of runs (coalesced, then single; flipped each round)."""
    for round_number in range(1, rounds + 1):
        sides = SIDES if round_number % 2 else SIDES[::-1]
        for side in sides:
            _one_run(bench, org, cpu_use, side, round_number)


def _one_run(bench: Any, org: str, cpu_use: Any, side: str, round_number: int) -> None:
    name = LABEL.format(side=side, round=round_number)
    args = bench.args
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    start_at = time.time() + 3.0  # time for the process to start and connect
    spec = {
        "target": bench.target,
        "org": org,
        "batching": side == "coalesced",
        "start_at": start_at,
        "warm_up": args.warm_up,
        "duration": args.duration,
    }
    before = bench.metrics.scrape()
    process = ctx.Process(target=client_worker, args=(spec, results))
    process.start()
    bench.cores.pin(process.pid or 0, bench.cores.load)
    time.sleep(max(0.0, start_at + args.warm_up - time.time()))
    with cpu_use(bench.server.pid) as server_cpu:
        time.sleep(max(0.0, start_at + args.warm_up + args.duration - time.time()))
    outcome = _collect(results, process, args.warm_up + args.duration + 60)
    process.join(30)
    after = bench.metrics.scrape()
    rpcs = {method: _handled(before, after, method) for method in ("CheckQuota", "CheckQuotaBatch")}
    batches = sum(rpcs["CheckQuotaBatch"].values())
    mean_batch = outcome["total"] / batches if batches else None
    decisions_per_s = outcome["decided"] / args.duration
    result: dict[str, Any] = {
        "tool": f"AsyncPagemeterClient, {JOBS} jobs, one process",
        # RPCs per second: batch RPCs on the coalesced side.
        "calls_per_s": decisions_per_s / mean_batch if mean_batch else decisions_per_s,
        "decisions_per_s": decisions_per_s,
        "p50_ms": outcome["p50_ms"],
        "p99_ms": outcome["p99_ms"],
        "server_cpu_cores": server_cpu["cores"],
        "client_cpu_us_per_decision": 1e6 * outcome["client_cpu_s"] / max(outcome["total"], 1),
        "server_rpcs": rpcs,
        "mean_batch_items": mean_batch,
        "errors": outcome["errors"],
    }
    bench.results[name] = result
    wrong = {m: {c: n for c, n in codes.items() if c != "OK"} for m, codes in rpcs.items()}
    if outcome["errors"] or outcome["denied"] or any(wrong.values()):
        bench.problems.append(
            f"{name}: errors {outcome['errors']}, {outcome['denied']} denied, server codes {wrong}"
        )
    if side == "coalesced" and rpcs["CheckQuota"]:
        bench.problems.append(f"{name}: single CheckQuota RPCs while coalescing: {rpcs}")
    batch_note = (
        f", {result['mean_batch_items']:.1f} items per batch" if result["mean_batch_items"] else ""
    )
    print(
        f"[bench {time.strftime('%H:%M:%S')}] {name}: {result['decisions_per_s']:.0f} decisions/s, "
        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, server CPU "
        f"{result['server_cpu_cores']:.2f} cores, client "
        f"{result['client_cpu_us_per_decision']:.0f} us CPU per decision{batch_note}",
        flush=True,
    )


def _handled(before: Any, after: Any, method: str) -> dict[str, int]:
    """RPCs of `method` the server finished between two scrapes, by code."""
    out: dict[str, int] = {}
    for (sample, labels), value in after.items():
        fields = dict(labels)
        if sample == "grpc_server_handled_total" and fields.get("grpc_method") == method:
            moved = int(value - before.get((sample, labels), 0.0))
            if moved:
                out[fields["grpc_code"]] = out.get(fields["grpc_code"], 0) + moved
    return out


def _collect(results: Any, process: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            outcome: dict[str, Any] = results.get(timeout=1.0)
        except queue.Empty:
            if process.exitcode not in (None, 0) or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"the SDK client process failed (exit code {process.exitcode})"
                ) from None
            continue
        return outcome


# -- the summary ------------------------------------------------------------------------


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """Coalesced against single from the alternating rounds of one run: each side's
    decisions/s (median), the median of the rounds' ratios and each ratio."""
    coalesced: list[float] = []
    single: list[float] = []
    ratios: list[float] = []
    number = 1
    while (c := results.get(LABEL.format(side="coalesced", round=number))) and (
        s := results.get(LABEL.format(side="single", round=number))
    ):
        coalesced.append(c["decisions_per_s"])
        single.append(s["decisions_per_s"])
        if s["decisions_per_s"]:
            ratios.append(c["decisions_per_s"] / s["decisions_per_s"])
        number += 1
    return {
        "jobs": JOBS,
        "coalesced_decisions_per_s": round(statistics.median(coalesced), 1) if coalesced else None,
        "single_decisions_per_s": round(statistics.median(single), 1) if single else None,
        "coalesced_vs_single": round(statistics.median(ratios), 3) if ratios else None,
        "coalesced_vs_single_rounds": [round(r, 3) for r in ratios],
    }
