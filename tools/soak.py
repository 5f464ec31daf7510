"""A bounded soak test of pagemeter: steady mixed load for a few minutes, memory sampled.

`make soak` (SOAK_MINUTES=3 by default) runs this. It is not part of `make test`.

What it does:

1. Starts a real Redis (pagemeter_server.embedded.RedisProcess, append-only file
   on, as the embedded store runs it) and the real `pagemeter-server` command as a
   subprocess against it, on free loopback ports, with `--dev-open-access`,
   `--log-level WARNING` and a small per-organization records cap
   (`--max-records-per-org 2000`): record and usage retention cannot go below a
   day, so the cap is the retention that bites within minutes.
2. Sets plans for 20 organizations (pages with overage, documents unlimited,
   prepaid credits for two of them) and drives steady load from worker processes
   with synchronous gRPC stubs: CheckQuota with a hold then RecordUsage (some
   jobs fail), plain CheckQuota, RecordUsage alone (some retried with the same
   request id), CheckQuota with a hold then ReleaseQuota, holds left to expire,
   GetUsage, ListUsageRecords and GetUsageStatistics, with document types. Most
   writes go to a handful of "hot" organizations, each with many distinct
   request ids, so their records index reaches the cap in about a minute.
3. Every --interval seconds prints: elapsed time, calls so far, calls/s, the
   server's RSS (its process and any children), Redis used_memory, DBSIZE,
   records created, the bounded structures' bytes (MEMORY USAGE of every key
   that is not a record hash) and the records index size (ZCARD pm:{org}:recs)
   of the hot organizations. The Prometheus endpoint is scraped at each sample
   too (the per-org exporter).
4. At the end prints the table, a breakdown of Redis memory by kind of key, the
   bytes per record and an extrapolation per organization, and a verdict.

The verdict (samples split in thirds; the first third is warm-up):

* server RSS: mean of the last third at most 10 % above the mean of the middle
  third (--rss-growth-limit);
* bounded structures (records index, day and month hashes, holds, plan, audit,
  ...): once every hot organization's records index is full, the mean of the
  second half of those samples at most 10 % plus 64 KiB above the first half;
  no records index ever above the cap, and every hot one at the cap at the end;
* Redis used_memory minus the bounded structures grows with the record hashes
  only: one hash per distinct request id, kept for --record-retention-days (the
  idempotency window, days), so within minutes it grows linearly, by design. The
  check fits used_memory against the number of records and requires a linear fit
  (R^2 >= 0.98) after the cap is reached.
* fewer than 1 % of calls failed, and the server ran to the end.

Exit status 0 when every check passes, 1 when one fails, 2 when the run could
not be carried out (Redis or the server did not start, or the server died).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import multiprocessing as mp
import multiprocessing.sharedctypes
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis
from google.protobuf import duration_pb2

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    plan_pb2,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
)
from pagemeter_server.ops.embedded import RedisProcess, free_port, server_version
from server_process import SERVER, ServerProcess

DOCUMENT_TYPES = (
    "invoice",
    "receipt",
    "contract",
    "id_card",
    "bank_statement",
    "delivery_note",
    "payslip",
    "tax_form",
)
TIMEZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")

# Shared counters, one row per worker process.
COUNTERS = (
    "CheckQuota",
    "RecordUsage",
    "ReleaseQuota",
    "GetUsage",
    "ListUsageRecords",
    "GetUsageStatistics",
    "errors",
    "records",  # distinct request ids that reached Redis (one record hash each)
    "duplicates",  # RecordUsage answered duplicate=True (deliberate retries)
    "denied",  # CheckQuota answered allowed=False
    "busy_us",  # microseconds spent waiting for answers
)
RPCS = COUNTERS[:6]
C = {name: i for i, name in enumerate(COUNTERS)}

# Scenario -> weight. Calls per scenario: job 2, record 1 (+1 retry 10 %),
# release 2, abandon 1, check 1, usage 1, list 1 (+1 next page 30 %), stats 1.
SCENARIOS = {
    "job": 35,  # CheckQuota hold -> RecordUsage (5 % of the jobs fail)
    "record": 15,  # RecordUsage alone, 10 % retried with the same id and payload
    "release": 8,  # CheckQuota hold -> ReleaseQuota
    "abandon": 3,  # CheckQuota hold with a 20 s TTL, never recorded: it expires
    "check": 15,  # plain CheckQuota, no hold
    "usage": 10,  # GetUsage
    "list": 8,  # ReportingService.ListUsageRecords
    "stats": 6,  # ReportingService.GetUsageStatistics
}

RECORD_KEY = re.compile(r"^pm:\{[^}]*\}:r:")
KEY_KIND = re.compile(r"^pm:\{[^}]*\}:([a-z]+)")


@dataclass
class Sample:
    elapsed: float
    calls: int
    rate: float
    errors: int
    records: int
    mean_latency_ms: float
    server_rss: int
    redis_rss: int
    used_memory: int
    bounded_bytes: int
    dbsize: int
    index_size: int
    index_max: int  # largest records index of any organization
    hot_index_min: int  # smallest records index of the hot organizations


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    started_at: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    calls_by_rpc: dict[str, int] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    per_record: dict[str, float] = field(default_factory=dict)
    extrapolation: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    server_log_tail: str = ""


# ---------------------------------------------------------------------------
# Load: worker processes


def worker(
    index: int,
    target: str,
    options: dict[str, Any],
    counters: Any,
    start: Any,
    stop: Any,
    results: Any,
) -> None:
    """One load process: paced synchronous calls until `stop` is set."""
    rng = random.Random(options["seed"] * 1000 + index)
    hot: list[str] = options["hot_orgs"]
    orgs: list[str] = options["orgs"]
    interval = options["workers"] / options["rate"]
    base = index * len(COUNTERS)
    errors: collections.Counter[str] = collections.Counter()
    ids = (f"{options['run_id']}-w{index}-{n}" for n in range(10**12))
    recent: collections.deque[tuple[str, quota_pb2.RecordUsageRequest]] = collections.deque(
        maxlen=50
    )
    scenarios = list(SCENARIOS)
    weights = [SCENARIOS[s] for s in scenarios]
    next_at = 0.0

    def bump(name: str, by: int = 1) -> None:
        counters[base + C[name]] += by

    def call(rpc: str, method: Callable[..., Any], request: Any) -> Any:
        nonlocal next_at
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        elif now - next_at > 1.0:
            next_at = now  # fell behind by more than a second: no catch-up burst
        next_at += interval
        began = time.perf_counter()
        try:
            reply = method(request, timeout=options["call_timeout"])
        except grpc.RpcError as exc:
            code = exc.code()
            errors[f"{rpc} {code.name if code else 'UNKNOWN'}"] += 1
            bump("errors")
            return None
        finally:
            bump("busy_us", int((time.perf_counter() - began) * 1e6))
        bump(rpc)
        return reply

    def write_org() -> str:
        return rng.choice(hot)

    def units() -> dict[str, int]:
        return {"pages": rng.randint(1, 30), "documents": 1}

    def hold(org: str, request_id: str, want: dict[str, int], ttl: float | None) -> bool:
        request = quota_pb2.CheckQuotaRequest(
            org_id=org, units=want, request_id=request_id, hold=True
        )
        if ttl is not None:
            request.hold_ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl)))
        reply = call("CheckQuota", quota.CheckQuota, request)
        if reply is None:
            return False
        if reply.held:
            bump("records")  # an allowed hold writes the job's record hash
        if not reply.allowed:
            bump("denied")
        return bool(reply.held)

    with grpc.insecure_channel(target) as channel:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        reporting = reporting_pb2_grpc.ReportingServiceStub(channel)
        start.wait()
        next_at = time.monotonic() + rng.random() * interval
        while not stop.is_set():
            scenario = rng.choices(scenarios, weights)[0]
            if scenario == "job":
                org, request_id, want = write_org(), next(ids), units()
                if hold(org, request_id, want, None):
                    done = {"pages": rng.randint(1, want["pages"]), "documents": 1}
                    record = quota_pb2.RecordUsageRequest(
                        org_id=org,
                        request_id=request_id,
                        units=done,
                        document_type=rng.choice(DOCUMENT_TYPES),
                    )
                    if rng.random() < 0.05:
                        record.success = False
                    call("RecordUsage", quota.RecordUsage, record)
            elif scenario == "record":
                if recent and rng.random() < 0.1:
                    request_id, record = rng.choice(recent)
                    reply = call("RecordUsage", quota.RecordUsage, record)
                    if reply is not None and reply.duplicate:
                        bump("duplicates")
                    continue
                org, request_id = write_org(), next(ids)
                record = quota_pb2.RecordUsageRequest(
                    org_id=org,
                    request_id=request_id,
                    units=units(),
                    document_type=rng.choice(DOCUMENT_TYPES),
                )
                if call("RecordUsage", quota.RecordUsage, record) is not None:
                    bump("records")
                    recent.append((request_id, record))
            elif scenario == "release":
                org, request_id = write_org(), next(ids)
                if hold(org, request_id, units(), None):
                    call(
                        "ReleaseQuota",
                        quota.ReleaseQuota,
                        quota_pb2.ReleaseQuotaRequest(org_id=org, request_id=request_id),
                    )
            elif scenario == "abandon":
                hold(write_org(), next(ids), units(), options["abandon_ttl"])
            elif scenario == "check":
                reply = call(
                    "CheckQuota",
                    quota.CheckQuota,
                    quota_pb2.CheckQuotaRequest(org_id=rng.choice(orgs), units=units()),
                )
                if reply is not None and not reply.allowed:
                    bump("denied")
            elif scenario == "usage":
                call(
                    "GetUsage",
                    quota.GetUsage,
                    quota_pb2.GetUsageRequest(org_id=rng.choice(orgs)),
                )
            elif scenario == "list":
                org = rng.choice(hot)
                page = call(
                    "ListUsageRecords",
                    reporting.ListUsageRecords,
                    reporting_pb2.ListUsageRecordsRequest(org_id=org, page_size=50),
                )
                if page is not None and page.next_page_token and rng.random() < 0.3:
                    call(
                        "ListUsageRecords",
                        reporting.ListUsageRecords,
                        reporting_pb2.ListUsageRecordsRequest(
                            org_id=org, page_size=50, page_token=page.next_page_token
                        ),
                    )
            elif scenario == "stats":
                call(
                    "GetUsageStatistics",
                    reporting.GetUsageStatistics,
                    reporting_pb2.GetUsageStatisticsRequest(
                        org_id=rng.choice(orgs),
                        period=rng.choice(
                            (
                                reporting_pb2.STATISTICS_PERIOD_DAILY,
                                reporting_pb2.STATISTICS_PERIOD_WEEKLY,
                                reporting_pb2.STATISTICS_PERIOD_MONTHLY,
                            )
                        ),
                        group_by=reporting_pb2.STATISTICS_GROUPING_BOTH,
                    ),
                )
    results.put((index, dict(errors)))


# ---------------------------------------------------------------------------
# The server under test (tools/server_process.py)


def set_plans(channel: grpc.Channel, orgs: Sequence[str], credit_orgs: Iterable[str]) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    for n, org in enumerate(orgs):
        plan = plan_pb2.Plan(
            org_id=org,
            name=("Starter", "Business", "Enterprise")[n % 3],
            timezone=TIMEZONES[n % len(TIMEZONES)],
            currency="EUR",
            processing_priority="standard",
            support_level="email",
            metrics=[
                plan_pb2.MetricLimits(
                    metric="pages",
                    contract_quota=20_000 * (n + 1),
                    overage_allowed=True,
                    price_per_unit="0.03",
                    overage_price_per_unit="0.028",
                ),
                plan_pb2.MetricLimits(metric="documents", price_per_unit="0.01"),
            ],
        )
        admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan), timeout=10)
    for org in credit_orgs:
        admin.GrantCredits(
            admin_pb2.GrantCreditsRequest(
                org_id=org,
                metric="pages",
                units=5_000,
                grant_id=f"soak-grant-{org}",
                reason="soak test",
            ),
            timeout=10,
        )


# ---------------------------------------------------------------------------
# Redis measurements


def kind_of(key: str) -> str:
    if RECORD_KEY.match(key):
        return "r (record hashes)"
    match = KEY_KIND.match(key)
    if not match:
        return "other"
    kind = match.group(1)
    return {
        "d": "d (day hashes)",
        "u": "u (month + lifetime hashes)",
        "recs": "recs (records index)",
    }.get(kind, kind)


def bounded_keys(client: redis.Redis) -> list[str]:
    """Every key except the record hashes (one SCAN of the database)."""
    return [key for key in client.scan_iter(count=5000) if not RECORD_KEY.match(key)]


def memory_usage(client: redis.Redis, keys: Sequence[str], samples: int = 0) -> list[int]:
    sizes: list[int] = []
    for start in range(0, len(keys), 500):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 500]:
            pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", samples)  # type: ignore[no-untyped-call]
        sizes.extend(int(size or 0) for size in pipe.execute())
    return sizes


class BoundedTracker:
    """MEMORY USAGE of the bounded structures, re-scanned now and then for new keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.keys: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        self.keys = bounded_keys(self.client)

    def measure(self) -> int:
        return sum(memory_usage(self.client, self.keys))


def breakdown(client: redis.Redis) -> dict[str, dict[str, int]]:
    """Keys and MEMORY USAGE bytes by kind of key, over the whole database."""
    keys = [key for key in client.scan_iter(count=5000)]
    sizes = memory_usage(client, keys)
    table: dict[str, dict[str, int]] = {}
    for key, size in zip(keys, sizes, strict=True):
        row = table.setdefault(kind_of(key), {"keys": 0, "bytes": 0})
        row["keys"] += 1
        row["bytes"] += size
    return dict(sorted(table.items(), key=lambda item: -item[1]["bytes"]))


def tree_rss(process: Any) -> int:
    """RSS of a process and its descendants (the workers of `--workers N`)."""
    total = 0
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += int(each.memory_info().rss)
    return total


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, R^2)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - mean_y) ** 2 for y in ys)
    if sxx == 0:
        return mean_y, 0.0, 0.0
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy else 1.0
    return mean_y - slope * mean_x, slope, r2


# ---------------------------------------------------------------------------
# Output


def mib(n: float) -> str:
    return f"{n / 1048576:.1f}"


def kib(n: float) -> str:
    return f"{n / 1024:.0f}"


TABLE_HEADER = (
    "| t (s) | calls | calls/s | errors | records | lat ms | server RSS MiB | "
    "Redis used_memory MiB | bounded KiB | DBSIZE | index ZCARD | hot min ZCARD | max ZCARD |"
)


def table_row(s: Sample) -> str:
    return (
        f"| {s.elapsed:.0f} | {s.calls} | {s.rate:.0f} | {s.errors} | {s.records} | "
        f"{s.mean_latency_ms:.2f} | {mib(s.server_rss)} | {mib(s.used_memory)} | "
        f"{kib(s.bounded_bytes)} | {s.dbsize} | {s.index_size} | {s.hot_index_min} | "
        f"{s.index_max} |"
    )


def separator() -> str:
    return "|" + "---:|" * (TABLE_HEADER.count("|") - 1)


def print_table(samples: Sequence[Sample]) -> None:
    print(TABLE_HEADER)
    print(separator())
    for s in samples:
        print(table_row(s))


# ---------------------------------------------------------------------------
# The run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env_minutes = float(os.environ.get("SOAK_MINUTES", "3"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=env_minutes, help="load duration")
    parser.add_argument("--rate", type=float, default=400, help="target calls/s, all workers")
    parser.add_argument("--workers", type=int, default=4, help="load processes")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--orgs", type=int, default=20, help="organizations with a plan")
    parser.add_argument("--hot-orgs", type=int, default=5, help="organizations most writes go to")
    parser.add_argument("--max-records-per-org", type=int, default=2000)
    parser.add_argument("--abandon-ttl", type=float, default=20, help="TTL of abandoned holds (s)")
    parser.add_argument("--call-timeout", type=float, default=5.0)
    parser.add_argument("--rss-growth-limit", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    parser.add_argument(
        "--server-args",
        default="",
        help="extra pagemeter-server flags, e.g. '--workers 2 --redis-pipelining'",
    )
    parser.add_argument(
        "--redis-config",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra redis-server setting, e.g. hash-max-ziplist-value=128 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.minutes > 120:
        parser.error("--minutes must be above 0 and at most 120 (a bounded soak)")
    if args.interval <= 0 or args.minutes * 60 < 3 * args.interval:
        parser.error("the run needs at least three sample intervals")
    if not 1 <= args.hot_orgs <= args.orgs:
        parser.error("--hot-orgs must be between 1 and --orgs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pagemeter-soak-"))
    orgs = [f"soak-org-{n:02d}" for n in range(args.orgs)]
    hot = orgs[: args.hot_orgs]
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    redis_extra: list[str] = []
    for setting in args.redis_config:
        name, _, value = setting.partition("=")
        redis_extra += [f"--{name}", value]
    redis_process = RedisProcess(workdir / "redis", extra_args=redis_extra)

    def server_args(redis_url: str) -> list[str]:
        return [
            "--listen",
            target,
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--http-listen",
            "",
            "--redis-url",
            redis_url,
            "--dev-open-access",
            "--log-level",
            "WARNING",
            "--max-records-per-org",
            str(args.max_records_per_org),
            *shlex.split(args.server_args),
        ]

    report = Report(
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "grpcio": grpc.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        settings={
            "minutes": args.minutes,
            "target_rate": args.rate,
            "workers": args.workers,
            "interval_s": args.interval,
            "orgs": args.orgs,
            "hot_orgs": args.hot_orgs,
            "max_records_per_org": args.max_records_per_org,
            "abandoned_hold_ttl_s": args.abandon_ttl,
            "redis_config": args.redis_config,
            "scenario_weights": SCENARIOS,
            "server_args": server_args(f"redis://127.0.0.1:{redis_process.port}/0"),
        },
    )
    server = ServerProcess(
        [str(SERVER), *server_args(redis_process.url)], workdir / "server.log", target=target
    )
    processes: list[Any] = []
    ctx = mp.get_context("spawn")
    try:
        redis_process.start()
        client = redis.Redis.from_url(redis_process.url, decode_responses=True)
        report.machine["redis"] = server_version(client.info("server"))
        baseline_memory = int(client.info("memory")["used_memory"])
        server.start()
        server.wait_until_serving(30)
        with grpc.insecure_channel(target) as channel:
            set_plans(channel, orgs, [hot[1 % len(hot)], hot[3 % len(hot)]])
        server_ps = psutil.Process(server.pid)
        redis_ps = psutil.Process(redis_process.pid or 0)
        tracker = BoundedTracker(client)
        index_key = f"pm:{{{hot[0]}}}:recs"

        counters = multiprocessing.sharedctypes.RawArray(
            ctypes.c_int64, args.workers * len(COUNTERS)
        )
        start, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
        options = {
            "seed": args.seed,
            "run_id": f"s{int(time.time()):x}",
            "orgs": orgs,
            "hot_orgs": hot,
            "workers": args.workers,
            "rate": args.rate,
            "abandon_ttl": args.abandon_ttl,
            "call_timeout": args.call_timeout,
        }
        for index in range(args.workers):
            process = ctx.Process(
                target=worker,
                args=(index, target, options, counters, start, stop, results),
                daemon=True,
            )
            process.start()
            processes.append(process)
        time.sleep(2.0)  # let the workers import and connect before the clock starts

        def totals() -> list[int]:
            sums = [0] * len(COUNTERS)
            for w in range(args.workers):
                for i in range(len(COUNTERS)):
                    sums[i] += counters[w * len(COUNTERS) + i]
            return sums

        print(
            f"pagemeter soak: {args.minutes:g} min, target {args.rate:g} calls/s from "
            f"{args.workers} processes, {args.orgs} orgs ({args.hot_orgs} hot), records cap "
            f"{args.max_records_per_org}/org; server pid {server.pid}, Redis pid "
            f"{redis_process.pid}, data in {workdir}",
            flush=True,
        )
        print(TABLE_HEADER)
        print(separator(), flush=True)
        began = time.monotonic()
        start.set()
        duration = args.minutes * 60
        last_calls, last_busy, last_t = 0, 0, 0.0
        n = 0
        while True:
            n += 1
            wake = began + n * args.interval
            time.sleep(max(0.0, wake - time.monotonic()))
            if not server.running():
                raise RuntimeError(f"pagemeter-server died during the soak:\n{server.log_tail()}")
            sums = totals()
            now = time.monotonic() - began
            calls = sum(sums[C[r]] for r in RPCS) + sums[C["errors"]]
            with urllib.request.urlopen(  # the per-org exporter reads Redis too
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=5
            ) as response:
                response.read()
            if n % 3 == 1:
                tracker.refresh()  # a new day key, a new org key: pick them up
            memory = client.info("memory")
            pipe = client.pipeline(transaction=False)
            for org in orgs:
                pipe.zcard(f"pm:{{{org}}}:recs")
            index_sizes = [int(x) for x in pipe.execute()]
            sample = Sample(
                elapsed=now,
                calls=calls,
                rate=(calls - last_calls) / (now - last_t),
                errors=sums[C["errors"]],
                records=sums[C["records"]],
                mean_latency_ms=(sums[C["busy_us"]] - last_busy)
                / 1000
                / max(1, calls - last_calls),
                server_rss=tree_rss(server_ps),
                redis_rss=redis_ps.memory_info().rss,
                used_memory=int(memory["used_memory"]),
                bounded_bytes=tracker.measure(),
                dbsize=int(client.dbsize()),
                index_size=int(client.zcard(index_key)),
                index_max=max(index_sizes),
                hot_index_min=min(index_sizes[: len(hot)]),
            )
            report.samples.append(sample)
            print(table_row(sample), flush=True)
            last_calls, last_busy, last_t = calls, sums[C["busy_us"]], now
            if now >= duration - args.interval / 2:
                break
        stop.set()
        for _ in processes:
            index, errors = results.get(timeout=30)
            for key, count in errors.items():
                report.errors_by_code[key] = report.errors_by_code.get(key, 0) + count
        for process in processes:
            process.join(timeout=10)
        sums = totals()
        report.calls_by_rpc = {r: sums[C[r]] for r in RPCS}
        report.calls_by_rpc["duplicates (retries)"] = sums[C["duplicates"]]
        report.calls_by_rpc["CheckQuota denied"] = sums[C["denied"]]
        report.calls_by_rpc["errors"] = sums[C["errors"]]
        report.calls_by_rpc["records (distinct request ids)"] = sums[C["records"]]
        report.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report.breakdown = breakdown(client)
        analyse(report, args, baseline_memory, client, hot)
        report.server_log_tail = server.log_tail()
    except Exception as exc:  # a run that could not be carried out
        print(f"soak: could not complete the run: {exc}", file=sys.stderr)
        if server.running() or server.process is not None:
            tail = server.log_tail()
            if tail:
                print(f"server log:\n{tail}", file=sys.stderr)
        return 2
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        exit_code = server.stop()
        redis_process.stop()
        if exit_code not in (None, 0):
            print(f"pagemeter-server exited with status {exit_code}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0 if all(check.ok for check in report.checks) else 1


def thirds(values: Sequence[float]) -> tuple[float, float]:
    """Mean of the middle third and of the last third."""
    k = len(values) // 3
    middle, last = values[k : len(values) - k], values[len(values) - k :]
    return statistics.fmean(middle), statistics.fmean(last)


def analyse(
    report: Report,
    args: argparse.Namespace,
    baseline_memory: int,
    client: redis.Redis,
    hot: Sequence[str],
) -> None:
    samples = report.samples
    cap = args.max_records_per_org

    # 1. server RSS levels off
    mid, last = thirds([s.server_rss for s in samples])
    growth = last / mid - 1
    _, rss_slope, _ = linear_fit(
        [s.calls for s in samples[len(samples) // 3 :]],
        [s.server_rss for s in samples[len(samples) // 3 :]],
    )
    report.checks.append(
        Check(
            "server RSS levels off",
            growth <= args.rss_growth_limit,
            f"middle third {mib(mid)} MiB, last third {mib(last)} MiB: {growth:+.1%} "
            f"(limit +{args.rss_growth_limit:.0%}); fitted {rss_slope * 1000:+.0f} bytes "
            f"per 1000 calls after warm-up",
        )
    )

    # 2. bounded structures stay bounded once every hot organization's records
    # index is full: compare the first and second half of those samples.
    capped = [s for s in samples if s.hot_index_min >= cap]
    if len(capped) >= 4:
        half = len(capped) // 2
        first_b = statistics.fmean(s.bounded_bytes for s in capped[:half])
        second_b = statistics.fmean(s.bounded_bytes for s in capped[half:])
        report.checks.append(
            Check(
                "bounded structures level off",
                second_b <= first_b * (1 + args.rss_growth_limit) + 65536,
                f"every key but the record hashes, after every hot org reached the cap "
                f"(t >= {capped[0].elapsed:.0f} s): first half {kib(first_b)} KiB, second "
                f"half {kib(second_b)} KiB ({second_b / first_b - 1:+.1%}; limit +10 % "
                f"+ 64 KiB)",
            )
        )
    else:
        report.checks.append(
            Check(
                "bounded structures level off",
                False,
                f"only {len(capped)} samples after every hot org reached the cap of {cap}: "
                "run longer (SOAK_MINUTES) or raise --rate",
            )
        )
    worst = max(s.index_max for s in samples)
    final_index = samples[-1].index_size
    report.checks.append(
        Check(
            "records index capped",
            worst <= cap and samples[-1].hot_index_min == cap,
            f"largest ZCARD pm:{{org}}:recs seen {worst}, cap {cap}; every hot org ends "
            f"at {samples[-1].hot_index_min}",
        )
    )

    # 3. the rest of Redis grows with the record hashes only
    fit_from = capped if len(capped) >= 3 else samples[len(samples) // 3 :]
    fit_span = "after the cap" if fit_from is capped else "after warm-up (cap not reached)"
    xs = [float(s.records) for s in fit_from]
    ys = [float(s.used_memory - s.bounded_bytes) for s in fit_from]
    intercept, slope, r2 = linear_fit(xs, ys)
    report.checks.append(
        Check(
            "Redis grows with record hashes only",
            r2 >= 0.98,
            f"used_memory minus bounded structures = {mib(intercept)} MiB + "
            f"{slope:.0f} B x records (R^2 {r2:.4f}, {len(fit_from)} samples {fit_span})",
        )
    )

    # 4. the load itself
    calls = samples[-1].calls
    errors = samples[-1].errors
    report.checks.append(
        Check(
            "calls succeeded",
            errors <= 0.01 * max(1, calls),
            f"{errors} errors in {calls} calls" + (f": {report.errors_by_code}" if errors else ""),
        )
    )

    # Bytes per record, per index entry, per day and month hash.
    records_row = report.breakdown.get("r (record hashes)", {"keys": 0, "bytes": 0})
    index_bytes = memory_usage(client, [f"pm:{{{hot[0]}}}:recs"])[0]
    day_keys = sorted(client.scan_iter(match=f"pm:{{{hot[0]}}}:d:*", count=1000))
    month_keys = sorted(
        k
        for k in client.scan_iter(match=f"pm:{{{hot[0]}}}:u:*", count=1000)
        if not k.endswith("lifetime")
    )
    day_bytes = memory_usage(client, day_keys[-1:])[0] if day_keys else 0
    month_bytes = memory_usage(client, month_keys[-1:])[0] if month_keys else 0
    end = samples[-1]
    per_record_run = (end.used_memory - baseline_memory - end.bounded_bytes) / max(1, end.records)
    report.per_record = {
        "record_hash_memory_usage": records_row["bytes"] / max(1, records_row["keys"]),
        "record_fitted_slope": slope,
        "record_overall": per_record_run,
        "index_entry": index_bytes / max(1, final_index),
        "day_hash": day_bytes,
        "month_hash": month_bytes,
        "record_keys": records_row["keys"],
        "records_counted_by_clients": end.records,
        "baseline_used_memory": baseline_memory,
    }

    # Steady state per organization: 40 days of record hashes (the idempotency
    # window), an index of at most the default 100,000 entries, 400+ days of day
    # hashes and about 14 month hashes (usage retention 400 days).
    per_record = max(slope, report.per_record["record_hash_memory_usage"])
    for jobs_per_month in (10_000, 100_000, 1_000_000):
        kept = jobs_per_month * 40 / 30.4
        index_entries = min(kept, 100_000)
        total = (
            kept * per_record
            + index_entries * report.per_record["index_entry"]
            + 430 * day_bytes
            + 14 * month_bytes
        )
        report.extrapolation.append(
            {
                "jobs_per_month": jobs_per_month,
                "record_hashes_kept": round(kept),
                "record_hashes_mib": kept * per_record / 2**20,
                "index_mib": index_entries * report.per_record["index_entry"] / 2**20,
                "counters_mib": (430 * day_bytes + 14 * month_bytes) / 2**20,
                "total_mib": total / 2**20,
                "per_org_month_mib": jobs_per_month * per_record / 2**20,
            }
        )


def print_summary(report: Report) -> None:
    if not report.samples:
        return
    print("\nSamples")
    print_table(report.samples)
    machine = report.machine
    print(
        f"\nMachine: {machine['cpus']} CPUs, {machine['memory_gib']} GiB, Python "
        f"{machine['python']}, Redis {machine.get('redis')}; load average at start "
        f"{machine['load_average_at_start']}, at end {machine.get('load_average_at_end')}"
    )
    print("\nCalls")
    for name, count in report.calls_by_rpc.items():
        print(f"  {name:32} {count}")
    duration = report.samples[-1].elapsed
    print(f"  {'mean rate':32} {report.samples[-1].calls / duration:.0f} calls/s")
    print("\nRedis memory by kind of key at the end (MEMORY USAGE)")
    print("| kind | keys | KiB | bytes/key |")
    print("|---|---:|---:|---:|")
    for kind, row in report.breakdown.items():
        print(f"| {kind} | {row['keys']} | {kib(row['bytes'])} | {row['bytes'] // row['keys']} |")
    p = report.per_record
    if p:
        print("\nBytes")
        print(f"  record hash, MEMORY USAGE mean          {p['record_hash_memory_usage']:.0f}")
        print(f"  record, used_memory slope after the cap {p['record_fitted_slope']:.0f}")
        print(f"  record, all of used_memory / records    {p['record_overall']:.0f}")
        print(f"  records index entry                      {p['index_entry']:.0f}")
        print(f"  day hash (8 document types)              {p['day_hash']:.0f}")
        print(f"  month hash                               {p['month_hash']:.0f}")
        print("\nSteady state per organization (40-day record retention, 400-day usage retention)")
        print(
            "| jobs/month | record hashes kept | records MiB | index MiB | counters MiB |"
            " total MiB | MiB per org-month of jobs |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for row in report.extrapolation:
            print(
                f"| {row['jobs_per_month']:,} | {row['record_hashes_kept']:,} | "
                f"{row['record_hashes_mib']:.1f} | {row['index_mib']:.1f} | "
                f"{row['counters_mib']:.2f} | {row['total_mib']:.1f} | "
                f"{row['per_org_month_mib']:.1f} |"
            )
    print("\nVerdict")
    for check in report.checks:
        print(f"  {'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    if report.server_log_tail:
        print(f"\nserver log (last lines):\n{report.server_log_tail}")
    ok = all(check.ok for check in report.checks)
    print(f"\nsoak {'PASSED' if ok else 'FAILED'}")


if __name__ == "__main__":
    sys.exit(main())
