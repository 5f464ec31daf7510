"""`make bench`: pagemeter's throughput, latency, Redis ceiling, Redis cost and memory.

Not part of `make test`. Method, figures and how to read them: docs/performance.md.

What it does, in order:

1. Starts a private Redis (pagemeter_server.embedded.RedisProcess: append-only
   file, appendfsync everysec, as the embedded store runs it), the real
   `pagemeter-server` command against it (--dev-open-access, --log-level
   WARNING, --org-exporter-max-orgs 0, metrics on a loopback port that is read
   only between phases), bench/empty_server.py (the same gRPC stack with a
   CheckQuota that does nothing) and bench/naive_server.py (the same stack with
   the shortest honest quota handler: decode, one redis-py EVALSHA of a small
   quota script, answer; issue 18's reference). On a machine with two or more cores both
   servers are pinned to one core ("server core") and Redis and the load
   generators to another ("load core"), so a figure is calls/s of one core.
2. Sets a plan with a large quota for one organization.
3. Saturation (h2load, gRPC over h2c, one repeated body, -c clients x -m
   streams): the empty and the naive handlers (before and after the others, to
   see the drift of a noisy machine), CheckQuota without hold, GetUsage, RecordUsage (one
   request_id, so every call but the first is answered as a duplicate) and
   CheckQuotaBatch (when the server has it). Every body is first sent once with
   the Python gRPC client to check its status is OK; after each phase the
   server's own counters (grpc_server_handled_total) must show no call that
   ended with another code.
4. Latency at half the saturation rate of CheckQuota (h2load --rps, one
   connection, periodic arrivals), for CheckQuota and for the empty and naive
   handlers at the same rate; p50/p99 from h2load's per-request log, plus the server-side
   handling time from its histogram.
5. Calls that need distinct bodies, with the Python driver (bench/driver.py,
   several processes): reserve+commit (CheckQuota hold=true, then RecordUsage
   of the same id), RecordUsage with new ids, and the empty handler measured by
   the same driver. The committed counters in Redis must move by exactly the
   units of the jobs the driver saw acknowledged.
6. The Redis ceiling: redis-benchmark running the real check.lua with EVALSHA
   and the keys and arguments Store.check builds for the organization, with
   -P 16 and without pipelining; and the same script through redis-py alone
   (pagemeter's Redis client, one process, no gRPC): the client's own cost.
7. Redis commands per call type (INFO commandstats deltas over a known number
   of calls) and Redis memory of an organization (MEMORY USAGE of its keys)
   after a known number of jobs.
8. Tracing: CheckQuota at saturation (h2load) on the server (tracing off, the
   default) and on a second one with tracing on and its spans dropped in the
   process (bench/traced_server.py), in alternating rounds; and the
   nanoseconds per call of what tracing off still runs.
   SDK batching (bench/sdk_batching.py): decisions/s through the async SDK, 64
   jobs in one client process, coalesced against single calls, alternating rounds.
9. With --profile (the default when py-spy is installed): py-spy samples the
   server during a CheckQuota saturation run and a reserve+commit run; the
   summary says where the time goes.

`--only PHASE` runs one phase (repeatable), for a quick look at it.

Prints a table and ends with ONE line of JSON. Results, h2load logs and profiles
are kept in .bench/<timestamp>/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_server.domain.decisions import CheckCall
from pagemeter_server.ops.embedded import RedisProcess, free_port, server_version
from pagemeter_server.store.keys import PLAN_SCHEMA_KEY
from pagemeter_server.store.scripts import script_text

# bench/driver.py: imported here and by the driver processes this script spawns;
# tools/server_process.py: the server-process helper shared with the tests and soak.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import driver
import sdk_batching

from server_process import NotServing, ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def shown_path(path: Path) -> str:
    """A path relative to the repository when it is inside it (--out may be anywhere)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


BIN = Path(sys.executable).parent
SERVER = BIN / "pagemeter-server"
EMPTY_SERVER = Path(__file__).resolve().parent / "empty_server.py"
NAIVE_SERVER = Path(__file__).resolve().parent / "naive_server.py"
OPEN_LOOP = Path(__file__).resolve().parent / "open_loop.py"
TRACED_SERVER = Path(__file__).resolve().parent / "traced_server.py"
# The phases of a run, in order (--only picks some).
PHASES = (
    "saturation",
    "latency",
    "drivers",
    "replica-acks",
    "events",
    "tracing",
    "sdk-batching",
    "redis-ceiling",
    "command-stats",
    "memory",
    "profile",
)
SERVICE = "pagemeter.v1.QuotaService"
ORG = "bench-org"
# An organization whose two metrics carry four windows each (8 windows per call).
WINDOWS_ORG = "bench-windows"
WINDOWS_LABEL = "CheckQuota, 4 windows per metric"
WINDOWS_PER_CALL = 8
MEMORY_ORG = "bench-memory"
CHECK_UNITS = {"pages": 3, "documents": 1}
MIB = 1024 * 1024
# Targets of the performance work (docs/performance.md).
# Redis clients for the comparison below, installed by `make bench` beside the
# bench (pip --target), never as pagemeter's dependencies; after the venv's own
# packages on the path, so that nothing of theirs shadows what pagemeter uses.
BENCH_CLIENTS_DIR = Path(__file__).resolve().parent.parent / ".tools" / "bench-clients"
if BENCH_CLIENTS_DIR.is_dir():
    sys.path.append(str(BENCH_CLIENTS_DIR))

# The Redis clients compared on check.lua alone (redis_client_floor); valkey-glide
# and coredis only where installed (make bench installs them beside the bench).
REDIS_CLIENTS = ("redis-py", "pipelined", "valkey-glide", "coredis")
CLIENT_MODULES = {"valkey-glide": "glide", "coredis": "coredis"}


def client_available(client: str) -> bool:
    module = CLIENT_MODULES.get(client)
    return module is None or importlib.util.find_spec(module) is not None


TARGETS = {
    "check_vs_naive": 0.85,
    "check_vs_empty": 0.85,
    "reserve_commit_vs_empty": 0.40,
    "batch_vs_redis_ceiling": 0.50,
    "check_p99_ms_at_half_rate": 2.5,
    "record_new_cpu_per_call_vs_check": 1.3,
    "rss_mb_per_worker": 150.0,
    "sdk_coalesced_vs_single": 4.0,
}
LOWER_IS_BETTER = (
    "check_p99_ms_at_half_rate",
    "record_new_cpu_per_call_vs_check",
    "rss_mb_per_worker",
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------
# Tools


class Tools:
    """h2load and redis-benchmark unpacked from Debian packages (Makefile)."""

    def __init__(self, folder: Path) -> None:
        self.h2load = folder / "usr/bin/h2load"
        self.redis_benchmark = folder / "usr/bin/redis-benchmark"
        for tool in (self.h2load, self.redis_benchmark):
            if not os.access(tool, os.X_OK):
                raise SystemExit(f"{tool} is missing: run `make bench` (it downloads the tools)")
        libs = sorted({str(p.parent) for p in folder.rglob("*.so*")})
        self.env = dict(os.environ)
        self.env["LD_LIBRARY_PATH"] = ":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")])

    def version(self, tool: Path) -> str:
        out = subprocess.run(
            [str(tool), "--version"], env=self.env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip().splitlines()[0]


# ---------------------------------------------------------------------------
# Processes, pinning, resource sampling


class Cores:
    """Which CPUs run the servers and which run Redis and the load generators."""

    def __init__(self, pin: bool) -> None:
        available = sorted(os.sched_getaffinity(0))
        self.pinned = pin and len(available) >= 2
        self.server = {available[0]} if self.pinned else set(available)
        self.load = set(available[1:]) if self.pinned else set(available)

    @staticmethod
    def on(cpus: set[int], command: Sequence[str]) -> list[str]:
        """`command` run on `cpus` through taskset. Not a preexec_fn: that makes
        subprocess fork the bench, whose gRPC threads then run their fork handlers
        in the child, which sometimes aborts it (seen: h2load killed by SIGABRT
        before it ran, "epoll_wait error: Bad file descriptor")."""
        return ["taskset", "-c", ",".join(str(cpu) for cpu in sorted(cpus)), *command]

    def pin(self, pid: int, cpus: set[int]) -> None:
        """Pin a process and all its threads."""
        if not self.pinned:
            return
        with contextlib.suppress(psutil.Error):
            for thread in psutil.Process(pid).threads():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(thread.id, cpus)


class RssSampler:
    """Peak RSS of each watched process, sampled in a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.processes: dict[str, psutil.Process] = {}
        self.peak: dict[str, int] = collections.defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.processes[name] = psutil.Process(pid)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for name, process in list(self.processes.items()):
            with contextlib.suppress(psutil.Error):
                self.peak[name] = max(self.peak[name], process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@contextlib.contextmanager
def cpu_use(pid: int) -> Iterator[dict[str, float]]:
    """CPU seconds per wall second of a process (all threads) over the block."""
    process = psutil.Process(pid)
    box: dict[str, float] = {}
    before, started = process.cpu_times(), time.monotonic()
    yield box
    after, ended = process.cpu_times(), time.monotonic()
    busy = (after.user - before.user) + (after.system - before.system)
    box["cores"] = busy / max(ended - started, 1e-9)


def wait_until_serving(server: ServerProcess, *, health: bool) -> None:
    """Until `server` serves (its health, or a connection to a server without it), or exit."""
    try:
        server.wait_until_serving(30, health=health)
    except NotServing as exc:
        raise SystemExit(str(exc)) from None


# ---------------------------------------------------------------------------
# Statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    values = sorted(seconds)
    if not values:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan, "max_ms": math.nan}
    return {
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "mean_ms": sum(values) / len(values) * 1000,
        "max_ms": values[-1] * 1000,
    }


# ---------------------------------------------------------------------------
# Prometheus metrics of the server


class Metrics:
    """The server's metrics, summed over its workers (worker i serves on the port + i)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for url in self.urls:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    values[key] = values.get(key, 0.0) + sample.value
        return values


def worker_count(server_args: list[str]) -> int:
    """The --workers value among the extra server arguments (1 when absent)."""
    for i, arg in enumerate(server_args):
        if arg.startswith("--workers="):
            return int(arg.split("=", 1)[1])
        if arg == "--workers" and i + 1 < len(server_args):
            return int(server_args[i + 1])
    return 1


def delta(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> dict[tuple[tuple[str, str], ...], float]:
    """after - before of every sample `name` whose labels include `labels`."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for (sample, sample_labels), value in after.items():
        if sample != name:
            continue
        as_dict = dict(sample_labels)
        if any(as_dict.get(k) != v for k, v in labels.items()):
            continue
        out[sample_labels] = value - before.get((sample, sample_labels), 0.0)
    return out


def handled_codes(before: Any, after: Any, method: str) -> dict[str, int]:
    counts = delta(before, after, "grpc_server_handled_total", grpc_method=method)
    return {dict(k)["grpc_code"]: int(v) for k, v in counts.items() if v}


def histogram_quantiles(before: Any, after: Any, name: str, **labels: str) -> dict[str, float]:
    """p50/p99 (linear inside a bucket, as histogram_quantile does) and the mean, in ms."""
    buckets = delta(before, after, f"{name}_bucket", **labels)
    count = sum(delta(before, after, f"{name}_count", **labels).values())
    total = sum(delta(before, after, f"{name}_sum", **labels).values())
    edges = sorted((float(dict(k)["le"]), v) for k, v in buckets.items() if dict(k)["le"] != "+Inf")
    out = {"mean_ms": total / count * 1000 if count else math.nan, "count": count}
    for q in (50, 99):
        rank = q / 100 * count
        lower, below, value = 0.0, 0.0, math.nan
        for edge, cumulative in edges:
            if cumulative >= rank:
                inside = cumulative - below
                value = lower + (edge - lower) * ((rank - below) / inside if inside else 1.0)
                break
            lower, below = edge, cumulative
        out[f"p{q}_ms"] = value * 1000 if not math.isnan(value) else math.nan
    return out


# ---------------------------------------------------------------------------
# Load generators


def grpc_frame(message: Any) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte length, bytes."""
    data: bytes = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def parse_h2load(output: str) -> dict[str, Any]:
    def grab(pattern: str) -> re.Match[str]:
        found = re.search(pattern, output)
        if not found:
            raise RuntimeError(f"unexpected h2load output:\n{output}")
        return found

    finished = grab(r"finished in ([\d.]+)s, ([\d.]+) req/s")
    requests = grab(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout"
    )
    codes = grab(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
    return {
        "req_per_s": float(finished.group(2)),
        "done": int(requests.group(3)),
        "succeeded": int(requests.group(4)),
        "failed": int(requests.group(5)),
        "errored": int(requests.group(6)),
        "timeout": int(requests.group(7)),
        "status_2xx": int(codes.group(1)),
    }


def collect(results: Any, processes: Sequence[Any], timeout: float) -> list[dict[str, Any]]:
    """One result per driver process; fails fast when a process died without one."""
    outcomes: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(processes):
        try:
            outcomes.append(results.get(timeout=1.0))
            continue
        except queue.Empty:
            pass
        dead = [p for p in processes if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            for process in processes:
                process.kill()
            raise RuntimeError(
                f"driver processes failed (exit codes {[p.exitcode for p in processes]})"
            )
    return outcomes


class Bench:
    def __init__(self, args: argparse.Namespace, tools: Tools, out: Path) -> None:
        self.args = args
        self.tools = tools
        self.out = out
        self.cores = Cores(not args.no_pin)
        self.rss = RssSampler()
        self.results: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.redis: RedisProcess | None = None
        self.server: ServerProcess | None = None
        self.empty: ServerProcess | None = None
        self.naive: ServerProcess | None = None

    # -- set-up -----------------------------------------------------------------

    def start(self) -> None:
        data = self.out / "redis"
        self.redis = RedisProcess(data)
        self.redis.start()
        assert self.redis.pid is not None
        self.redis_client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        self.port, self.metrics_port, self.empty_port = free_port(), free_port(), free_port()
        self.naive_port = free_port()
        self.server = ServerProcess(
            [
                str(SERVER),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--redis-url",
                self.redis.url,
                "--dev-open-access",
                "--log-level",
                "WARNING",
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--http-listen",
                "",
                "--org-exporter-max-orgs",
                "0",
                *self.args.server_arg,
            ],
            self.out / "server.log",
            target=f"127.0.0.1:{self.port}",
            cwd=ROOT,
        )
        self.empty = ServerProcess(
            [sys.executable, str(EMPTY_SERVER), "--listen", f"127.0.0.1:{self.empty_port}"],
            self.out / "empty_server.log",
            target=f"127.0.0.1:{self.empty_port}",
            name="empty handler",
            cwd=ROOT,
        )
        self.naive = ServerProcess(
            [
                sys.executable,
                str(NAIVE_SERVER),
                "--listen",
                f"127.0.0.1:{self.naive_port}",
                "--redis-url",
                self.redis.url,
            ],
            self.out / "naive_server.log",
            target=f"127.0.0.1:{self.naive_port}",
            name="naive handler",
            cwd=ROOT,
        )
        self.server.start()
        self.empty.start()
        self.naive.start()
        wait_until_serving(self.server, health=True)
        wait_until_serving(self.empty, health=False)
        wait_until_serving(self.naive, health=False)
        # Pin after start-up: gRPC's threads exist by now.
        self.cores.pin(self.server.pid, self.cores.server)
        self.cores.pin(self.empty.pid, self.cores.server)
        self.cores.pin(self.naive.pid, self.cores.server)
        self.cores.pin(self.redis.pid, self.cores.load)
        self.rss.watch("pagemeter", self.server.pid)
        self.rss.watch("empty", self.empty.pid)
        self.rss.watch("naive", self.naive.pid)
        self.rss.watch("redis", self.redis.pid)
        self.rss.start()
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.quota = quota_pb2_grpc.QuotaServiceStub(self.channel)
        self.metrics = Metrics(
            [
                f"http://127.0.0.1:{self.metrics_port + i}/metrics"
                for i in range(worker_count(self.args.server_arg))
            ]
        )
        self.set_plan(ORG)
        # Windows need the current plan document (decision 35): a fresh store is migrated.
        self.redis_client.set(PLAN_SCHEMA_KEY, "2")
        self.set_plan(WINDOWS_ORG, windows=True)

    def stop(self) -> None:
        self.rss.stop()
        with contextlib.suppress(Exception):
            self.channel.close()
        for process in (self.server, self.empty, self.naive):
            if process is not None:
                code = process.stop()
                if code not in (0, None) and process is self.server:
                    self.problems.append(f"pagemeter-server exited with {code}")
        if self.redis is not None:
            self.redis.stop()

    def set_plan(self, org: str, windows: bool = False) -> None:
        """The benchmark's plan; with `windows`, a minute, hour, day and week window on
        each metric too (limits never reached), for the cost of deciding windows."""
        caps = (
            [
                plan_pb2.WindowLimit(window=kind, limit=10**15)
                for kind in (
                    plan_pb2.WINDOW_MINUTE,
                    plan_pb2.WINDOW_HOUR,
                    plan_pb2.WINDOW_DAY,
                    plan_pb2.WINDOW_WEEK,
                )
            ]
            if windows
            else []
        )
        plan = plan_pb2.Plan(
            org_id=org,
            name="Benchmark",
            timezone="UTC",
            currency="EUR",
            metrics=[
                plan_pb2.MetricLimits(
                    metric="pages",
                    contract_quota=10**15,
                    overage_allowed=True,
                    price_per_unit="0.03",
                    overage_price_per_unit="0.028",
                    windows=caps,
                ),
                plan_pb2.MetricLimits(metric="documents", contract_quota=10**15, windows=caps),
            ],
        )
        admin_pb2_grpc.AdminServiceStub(self.channel).SetPlan(
            admin_pb2.SetPlanRequest(plan=plan), timeout=10
        )

    def committed(self, org: str = ORG) -> dict[str, int]:
        reply = self.quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org), timeout=10)
        return {m.metric: m.committed for m in reply.metrics}

    # -- h2load -------------------------------------------------------------------

    def sanity(self, port: int, method: str, body: bytes, response_type: Any) -> Any:
        """Send the exact bytes h2load will send, with the Python client; must be OK."""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/{method}", None, None)
            raw, outcome = call.with_call(body[5:], timeout=10)
            if outcome.code() != grpc.StatusCode.OK:
                raise RuntimeError(f"{method}: grpc-status {outcome.code()}")
            return response_type.FromString(raw)

    def h2load(
        self,
        name: str,
        port: int,
        method: str,
        body: bytes,
        *,
        clients: int,
        streams: int,
        rps: float | None = None,
        pid: int | None = None,
    ) -> dict[str, Any]:
        """`pid`: the server process behind `port` when it is not one of the bench's
        pagemeter-server, empty handler and naive handler (a second server)."""
        body_path = self.out / f"{method}.body"
        body_path.write_bytes(body)
        log_path = self.out / f"h2load-{name}.tsv"
        log_path.unlink(missing_ok=True)  # h2load appends to its log file
        command = [
            str(self.tools.h2load),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-D",
            str(self.args.duration),
            "--warm-up-time",
            str(self.args.warm_up),
            "-d",
            str(body_path),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--log-file",
            str(log_path),
        ]
        if rps is not None:
            command += ["--rps", f"{rps:.3f}"]
        command.append(f"http://127.0.0.1:{port}/{SERVICE}/{method}")
        assert self.server is not None
        assert self.empty is not None
        if pid is None:
            by_port = {
                self.port: self.server,
                self.empty_port: self.empty,
                self.naive_port: self.naive,
            }
            behind = by_port[port]
            assert behind is not None
            pid = behind.pid
        before = self.metrics.scrape() if port == self.port else None
        with cpu_use(pid) as cpu:
            done = subprocess.run(
                self.cores.on(self.cores.load, command),
                env=self.tools.env,
                capture_output=True,
                text=True,
                check=False,
            )
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        (self.out / f"h2load-{name}.txt").write_text(done.stdout)
        parsed = parse_h2load(done.stdout)
        times = [
            int(line.split("\t")[2]) / 1e6
            for line in log_path.read_text().splitlines()
            if line.strip()
        ]
        result: dict[str, Any] = {
            "tool": "h2load",
            "calls_per_s": parsed["req_per_s"],
            "calls": parsed["done"],
            **latency_summary(times),
            "server_cpu_cores": cpu["cores"],
            "h2load": parsed,
            "clients": clients,
            "streams": streams,
        }
        if rps is not None:
            result["offered_per_s"] = rps * clients
        if parsed["succeeded"] != parsed["done"] or parsed["status_2xx"] != parsed["done"]:
            self.problems.append(f"{name}: h2load saw non-2xx or failed requests: {parsed}")
        if len(times) != parsed["done"]:
            self.notes.append(f"{name}: h2load log has {len(times)} rows for {parsed['done']}")
        if before is not None:
            after = self.metrics.scrape()
            codes = handled_codes(before, after, method)
            result["server_codes"] = codes
            # h2load resets the streams still in flight when its time is up: the
            # server counts those calls CANCELLED (at most clients x streams).
            cancelled = codes.get("CANCELLED", 0)
            not_ok = {k: v for k, v in codes.items() if k not in ("OK", "CANCELLED")}
            if not_ok or codes.get("OK", 0) < parsed["done"] or cancelled > clients * streams:
                self.problems.append(
                    f"{name}: the server answered {codes} for {parsed['done']} h2load calls"
                )
            result["server_handling"] = histogram_quantiles(
                before, after, "grpc_server_handling_seconds", grpc_method=method
            )
            scripts = {
                dict(k)["script"]
                for k, v in delta(before, after, "pagemeter_redis_script_seconds_count").items()
                if v
            }
            result["redis_script"] = {
                script: histogram_quantiles(
                    before, after, "pagemeter_redis_script_seconds", script=script
                )
                for script in sorted(scripts)
            }
        self.results[name] = result
        log(
            f"{name}: {result['calls_per_s']:.0f} calls/s, p50 {result['p50_ms']:.2f} ms, "
            f"p99 {result['p99_ms']:.2f} ms, server CPU {cpu['cores']:.2f} cores"
        )
        return result

    # -- phases -------------------------------------------------------------------

    def saturation(self) -> None:
        c, m = self.args.clients, self.args.streams
        check = grpc_frame(quota_pb2.CheckQuotaRequest(org_id=ORG, units=CHECK_UNITS))
        usage = grpc_frame(quota_pb2.GetUsageRequest(org_id=ORG))
        record = grpc_frame(
            quota_pb2.RecordUsageRequest(org_id=ORG, request_id="bench-replayed", units=CHECK_UNITS)
        )
        answer = self.sanity(self.port, "CheckQuota", check, quota_pb2.CheckQuotaResponse)
        if not answer.allowed:
            raise RuntimeError(f"the benchmark's CheckQuota is not allowed: {answer}")
        self.sanity(self.empty_port, "CheckQuota", check, quota_pb2.CheckQuotaResponse)
        naive = self.sanity(self.naive_port, "CheckQuota", check, quota_pb2.CheckQuotaResponse)
        if not naive.allowed:
            raise RuntimeError(f"the naive handler's CheckQuota is not allowed: {naive}")
        self.sanity(self.port, "GetUsage", usage, quota_pb2.GetUsageResponse)
        first = self.sanity(self.port, "RecordUsage", record, quota_pb2.RecordUsageResponse)
        if first.duplicate or first.status != quota_pb2.RECORD_STATUS_COMPLETED:
            raise RuntimeError(f"the first RecordUsage was not recorded: {first}")

        self.h2load("empty (before)", self.empty_port, "CheckQuota", check, clients=c, streams=m)
        self.h2load("naive (before)", self.naive_port, "CheckQuota", check, clients=c, streams=m)
        self.h2load("CheckQuota", self.port, "CheckQuota", check, clients=c, streams=m)
        windowed = grpc_frame(quota_pb2.CheckQuotaRequest(org_id=WINDOWS_ORG, units=CHECK_UNITS))
        self.h2load(WINDOWS_LABEL, self.port, "CheckQuota", windowed, clients=c, streams=m)
        self.h2load("GetUsage", self.port, "GetUsage", usage, clients=c, streams=m)
        committed_before = self.committed()
        records_before = self.metrics.scrape()
        self.h2load(
            "RecordUsage (duplicate)", self.port, "RecordUsage", record, clients=c, streams=m
        )
        records_after = self.metrics.scrape()
        committed_after = self.committed()
        duplicates = int(
            sum(
                delta(
                    records_before, records_after, "pagemeter_records_total", duplicate="true"
                ).values()
            )
        )
        fresh = int(
            sum(
                delta(
                    records_before, records_after, "pagemeter_records_total", duplicate="false"
                ).values()
            )
        )
        self.results["RecordUsage (duplicate)"]["check"] = {
            "duplicates": duplicates,
            "new_records": fresh,
            "committed_moved": {
                k: committed_after[k] - committed_before.get(k, 0) for k in committed_after
            },
        }
        if fresh or committed_after != committed_before:
            self.problems.append(
                "RecordUsage replayed by h2load changed the counters: "
                f"{committed_before} -> {committed_after}, {fresh} new records"
            )
        # Every replayed call reached the script and was answered as a duplicate
        # (the server also counts the warm-up's calls, which h2load does not report).
        done = self.results["RecordUsage (duplicate)"]["calls"]
        if duplicates < done:
            self.problems.append(
                f"RecordUsage replayed by h2load: {duplicates} duplicates for {done} calls"
            )
        self.batch(c, m)
        self.h2load("empty (after)", self.empty_port, "CheckQuota", check, clients=c, streams=m)
        self.h2load("naive (after)", self.naive_port, "CheckQuota", check, clients=c, streams=m)
        # CheckQuota against the naive handler in alternating pairs (the order flips
        # each round): this host's speed drifts by tens of % within minutes, so one
        # CheckQuota run between the naive handler's before and after is at the
        # mercy of the minute it ran in. The target reads the median of the pairs.
        for number in range(1, self.args.ratio_rounds + 1):
            pair = [
                (f"CheckQuota vs naive, round {number}: CheckQuota", self.port),
                (f"CheckQuota vs naive, round {number}: naive", self.naive_port),
            ]
            for name, port in pair if number % 2 else pair[::-1]:
                self.h2load(name, port, "CheckQuota", check, clients=c, streams=m)

    def batch(self, clients: int, streams: int) -> None:
        methods = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].methods_by_name
        if "CheckQuotaBatch" not in methods:
            self.notes.append(
                "CheckQuotaBatch: not in the contract; batched decisions not measured"
            )
            return
        size = self.args.batch_size
        body = grpc_frame(
            quota_pb2.CheckQuotaBatchRequest(
                items=[
                    quota_pb2.CheckQuotaRequest(org_id=ORG, units=CHECK_UNITS) for _ in range(size)
                ]
            )
        )
        try:
            reply = self.sanity(
                self.port,
                "CheckQuotaBatch",
                body,
                quota_pb2.CheckQuotaBatchResponse,
            )
        except (RuntimeError, grpc.RpcError) as exc:
            self.notes.append(f"CheckQuotaBatch: not measured, the sanity call failed: {exc}")
            return
        allowed = sum(
            1 for item in reply.items if item.HasField("response") and item.response.allowed
        )
        if allowed != size:
            self.problems.append(f"CheckQuotaBatch: {allowed} of {size} items allowed")
        result = self.h2load(
            f"CheckQuotaBatch x{size}",
            self.port,
            "CheckQuotaBatch",
            body,
            clients=clients,
            streams=streams,
        )
        result["batch_size"] = size
        result["decisions_per_s"] = result["calls_per_s"] * size

    def latency(self) -> None:
        """Latency at half CheckQuota's saturation rate, for CheckQuota and for the
        empty and naive handlers at the same rate: with evenly spaced arrivals
        (bench/open_loop.py; the figures the targets read), and with h2load's
        `--rps`, which sends its calls in bursts of about 10 every ~10 ms (kept
        to compare with earlier runs)."""
        saturated = self.results["CheckQuota"]["calls_per_s"]
        rate = saturated / 2
        check = grpc_frame(quota_pb2.CheckQuotaRequest(org_id=ORG, units=CHECK_UNITS))
        servers = (
            ("CheckQuota @ half rate", self.port),
            ("empty @ same rate", self.empty_port),
            ("naive @ same rate", self.naive_port),
        )
        for name, port in servers:
            self.open_loop(name, port, "CheckQuota", check[5:], rate)
        # One connection: h2load's clients all start together, so with several
        # clients the bursts would only be larger.
        for name, port in servers:
            self.h2load(
                f"{name} (h2load bursts)",
                port,
                "CheckQuota",
                check,
                clients=1,
                streams=256,
                rps=rate,
            )

    def open_loop(self, name: str, port: int, method: str, message: bytes, rate: float) -> None:
        body_path = self.out / f"{method}.message"
        body_path.write_bytes(message)
        done = subprocess.run(
            self.cores.on(
                self.cores.load,
                [
                    sys.executable,
                    str(OPEN_LOOP),
                    "--target",
                    f"127.0.0.1:{port}",
                    "--method",
                    method,
                    "--body-file",
                    str(body_path),
                    "--rate",
                    f"{rate:.3f}",
                    "--duration",
                    str(self.args.duration),
                    "--warm-up",
                    str(self.args.warm_up),
                ],
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"open-loop load failed:\n{done.stderr}")
        result = json.loads(done.stdout)
        failed = {code: n for code, n in result["codes"].items() if code != "OK"}
        if failed:
            self.problems.append(f"{name}: calls that did not end OK: {failed}")
        self.results[name] = result
        log(
            f"{name}: {result['calls_per_s']:.0f} calls/s, p50 {result['p50_ms']:.2f} ms, "
            f"p99 {result['p99_ms']:.2f} ms (evenly spaced arrivals)"
        )

    def python_driver(
        self, name: str, scenario: str, port: int, pid: int | None = None
    ) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        results: Any = ctx.Queue()
        start_at = time.time() + 3.0  # time for the processes to start and connect
        specs = [
            {
                "scenario": scenario,
                "target": f"127.0.0.1:{port}",
                "org": ORG,
                "run_id": f"bench{int(time.time() * 1000)}",
                "index": i,
                "start_at": start_at,
                "warm_up": self.args.warm_up,
                "duration": self.args.duration,
                "concurrency": self.args.driver_concurrency,
            }
            for i in range(self.args.driver_processes)
        ]
        committed_before = self.committed()
        assert self.server is not None
        assert self.empty is not None
        if pid is None:
            by_port = {
                self.port: self.server,
                self.empty_port: self.empty,
                self.naive_port: self.naive,
            }
            behind = by_port[port]
            assert behind is not None
            pid = behind.pid
        before = self.metrics.scrape()
        processes = [ctx.Process(target=driver.worker, args=(spec, results)) for spec in specs]
        for process in processes:
            process.start()
            self.cores.pin(process.pid or 0, self.cores.load)
        # The server's CPU over the measured window only (not the drivers' start-up).
        time.sleep(max(0.0, start_at + self.args.warm_up - time.time()))
        with cpu_use(pid) as cpu:
            time.sleep(max(0.0, start_at + self.args.warm_up + self.args.duration - time.time()))
        outcomes = collect(results, processes, self.args.warm_up + self.args.duration + 120)
        for process in processes:
            process.join(30)
        after = self.metrics.scrape()
        committed_after = self.committed()
        ops = sum(o["ops"] for o in outcomes)
        calls = sum(o["calls"] for o in outcomes)
        jobs_ok = sum(o["jobs_ok"] for o in outcomes)
        errors: collections.Counter[str] = collections.Counter()
        unexpected: collections.Counter[str] = collections.Counter()
        for o in outcomes:
            errors.update(o["errors"])
            unexpected.update(o["unexpected"])
        result: dict[str, Any] = {
            "tool": f"Python driver ({len(processes)} processes x {self.args.driver_concurrency})",
            "calls_per_s": calls / self.args.duration,
            "ops_per_s": ops / self.args.duration,
            "calls": calls,
            **latency_summary([s for o in outcomes for s in o["latencies"]]),
            "server_cpu_cores": cpu["cores"],
            "errors": dict(errors),
            "unexpected": dict(unexpected),
        }
        if scenario == "reserve_commit":
            for method in ("CheckQuota", "RecordUsage"):
                result[f"{method}_latency"] = latency_summary(
                    [s for o in outcomes for s in o["call_latencies"][method]]
                )
        if errors or unexpected:
            self.problems.append(f"{name}: errors {dict(errors)}, unexpected {dict(unexpected)}")
        if scenario in ("reserve_commit", "record"):
            units = driver.RESERVE_UNITS if scenario == "reserve_commit" else driver.RECORD_UNITS
            moved = {k: committed_after.get(k, 0) - committed_before.get(k, 0) for k in units}
            expected = {k: v * jobs_ok for k, v in units.items()}
            result["check"] = {"jobs_acknowledged": jobs_ok, "committed_moved": moved}
            if moved != expected:
                self.problems.append(
                    f"{name}: committed moved by {moved}, the driver saw {jobs_ok} jobs "
                    f"acknowledged (expected {expected})"
                )
            codes = {m: handled_codes(before, after, m) for m in ("CheckQuota", "RecordUsage")}
            result["server_codes"] = codes
        self.results[name] = result
        log(
            f"{name}: {result['calls_per_s']:.0f} calls/s ({result['ops_per_s']:.0f} ops/s), "
            f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
            f"server CPU {cpu['cores']:.2f} cores"
        )
        return result

    def drivers(self) -> None:
        self.python_driver("empty (Python driver)", "empty", self.empty_port)
        self.python_driver("reserve+commit (Python driver)", "reserve_commit", self.port)
        self.python_driver("RecordUsage new ids (Python driver)", "record", self.port)

    @contextlib.contextmanager
    def second_server(
        self, extra: list[str], name: str, program: Sequence[str] = (str(SERVER),)
    ) -> Iterator[tuple[ServerProcess, int]]:
        """A second pagemeter-server (or `program`, which takes its arguments) on the
        same Redis with `extra` arguments, on the server cores beside the first
        (only one is loaded at a time), so a phase can be measured on both in one run."""
        assert self.redis is not None
        port = free_port()
        second = ServerProcess(
            [
                *program,
                "--listen",
                f"127.0.0.1:{port}",
                "--redis-url",
                self.redis.url,
                "--dev-open-access",
                "--log-level",
                "WARNING",
                "--metrics-listen",
                "",
                "--http-listen",
                "",
                "--org-exporter-max-orgs",
                "0",
                *self.args.server_arg,
                *extra,
            ],
            self.out / f"server-{name.replace(' ', '-').strip('-')}.log",
            target=f"127.0.0.1:{port}",
            name=f"pagemeter-server {name}",
            cwd=ROOT,
        )
        try:
            second.start()
            wait_until_serving(second, health=True)
            self.cores.pin(second.pid, self.cores.server)
            yield second, port
        finally:
            code = second.stop()
            if code not in (0, None):
                self.problems.append(f"pagemeter-server {name} exited with {code}")

    def replica_acks(self) -> None:
        """What --replica-acks 1 costs: jobs with and without it, on one Redis with a replica.

        A replica is attached to the bench's Redis (on the load cores, as Redis
        is) and a second pagemeter-server with --replica-acks 1 runs beside the
        first; both are measured in this run, so the ratio is of like with like.
        """
        assert self.redis is not None
        replica = RedisProcess(
            self.out / "replica", extra_args=["--replicaof", "127.0.0.1", str(self.redis.port)]
        )
        replica.start()
        try:
            assert replica.pid is not None
            self.cores.pin(replica.pid, self.cores.load)
            deadline = time.monotonic() + 30
            while self.redis_client.info("replication").get("connected_slaves", 0) < 1:
                if time.monotonic() > deadline:
                    self.problems.append("replica acks: the replica never connected")
                    return
                time.sleep(0.1)
            with self.second_server(["--replica-acks", "1"], "--replica-acks 1") as (acks, port):
                for scenario, label in (
                    ("record", "RecordUsage new ids"),
                    ("reserve_commit", "reserve+commit"),
                ):
                    self.python_driver(
                        f"{label}, replica attached (Python driver)", scenario, self.port
                    )
                    self.python_driver(
                        f"{label}, --replica-acks 1 (Python driver)",
                        scenario,
                        port,
                        acks.pid,
                    )
        finally:
            replica.stop()

    def events_cost(self, rounds: int = 3) -> None:
        """What writing the events costs (docs/events.md): records and jobs on this
        server (events on) and on a second one with --max-events-per-org 0, on
        the same Redis, in `rounds` alternating pairs (the order flips each
        round, so that a drift of the host weighs on both sides); the figures
        are the median of the rounds' ratios."""
        with self.second_server(["--max-events-per-org", "0"], "--max-events-per-org 0") as (
            off,
            off_port,
        ):
            for scenario, label in (
                ("record", "RecordUsage new ids"),
                ("reserve_commit", "reserve+commit"),
            ):
                for round_number in range(1, rounds + 1):
                    phases = [
                        (
                            f"{label}, events on, round {round_number} (Python driver)",
                            self.port,
                            None,
                        ),
                        (
                            f"{label}, events off, round {round_number} (Python driver)",
                            off_port,
                            off.pid,
                        ),
                    ]
                    for name, port, pid in phases if round_number % 2 else phases[::-1]:
                        self.python_driver(name, scenario, port, pid)

    def tracing_cost(self, rounds: int = 3) -> None:
        """What tracing costs a CheckQuota (docs/operations.md, "Tracing"): h2load at
        saturation on this server (tracing off, as by default) and on a second one
        with tracing on whose spans are dropped in the process (bench/traced_server.py),
        in `rounds` alternating pairs, the order flipped each round; and what tracing
        off still runs per call (tracing_off_path_ns)."""
        c, m = self.args.clients, self.args.streams
        check = grpc_frame(quota_pb2.CheckQuotaRequest(org_id=ORG, units=CHECK_UNITS))
        with self.second_server([], "tracing on", program=(sys.executable, str(TRACED_SERVER))) as (
            traced,
            traced_port,
        ):
            self.sanity(traced_port, "CheckQuota", check, quota_pb2.CheckQuotaResponse)
            for round_number in range(1, rounds + 1):
                phases = [
                    (f"CheckQuota, tracing off, round {round_number}", self.port, None),
                    (f"CheckQuota, tracing on, round {round_number}", traced_port, traced.pid),
                ]
                for name, port, pid in phases if round_number % 2 else phases[::-1]:
                    self.h2load(name, port, "CheckQuota", check, clients=c, streams=m, pid=pid)
        self.results["tracing off, added per call"] = tracing_off_path_ns()

    # -- Redis ----------------------------------------------------------------------

    def check_script_call(self) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV Store.check sends for ORG, captured from the real Store."""
        from pagemeter_server.app import build_store
        from pagemeter_server.ops.metrics import ServiceMetrics
        from pagemeter_server.settings import parse_settings

        assert self.redis is not None
        settings = parse_settings(["--redis-url", self.redis.url])
        captured: list[tuple[str, list[str], list[Any]]] = []

        async def capture() -> None:
            client = aioredis.from_url(self.redis.url, decode_responses=True)  # type: ignore[union-attr]
            try:
                store = build_store(client, settings, ServiceMetrics(CollectorRegistry()))
                original = store.run

                async def recording(
                    name: str, keys: Sequence[str], args: Sequence[Any], **options: Any
                ) -> Any:
                    captured.append((name, list(keys), list(args)))
                    return await original(name, keys, args, **options)

                store.run = recording  # type: ignore[method-assign]
                result = await store.check(
                    ORG,
                    CheckCall(CHECK_UNITS, hold_ttl_ms=round(settings.hold_ttl_seconds * 1000)),
                    now_ms=int(time.time() * 1000),
                )
                if not result.allowed:
                    raise RuntimeError("Store.check did not allow the benchmark's units")
            finally:
                await client.aclose()

        asyncio.run(capture())
        calls = [c for c in captured if c[0] == "check"]
        if not calls:
            raise RuntimeError("could not capture Store.check's script call (Store.run not used)")
        _, keys, args = calls[-1]
        return keys, args

    def redis_client_floor(self, keys: list[str], args: list[Any]) -> None:
        """check.lua through each Redis client alone, from one process on the server core
        (issue 18's evaluation: redis-py's pool, pagemeter's pipelined connection, and
        valkey-glide and coredis when they are installed)."""
        for client in REDIS_CLIENTS:
            if not client_available(client):
                log(f"{client}: not installed, left out")
                continue
            outcome = self.one_client_floor(client, keys, args)
            result = {
                "tool": f"{client} ({self.args.clients * self.args.streams} concurrent, 1 process)",
                "calls_per_s": outcome["calls"] / self.args.duration,
                "calls": outcome["calls"],
                "client_us_per_call": (
                    outcome["cpu_seconds"] / outcome["calls"] * 1e6 if outcome["calls"] else None
                ),
                **latency_summary(outcome["latencies"]),
            }
            name = (
                "redis-py check.lua (client floor)"
                if client == "redis-py"
                else f"{client} check.lua (client floor)"
            )
            self.results[name] = result
            log(
                f"{client} check.lua from one process: {result['calls_per_s']:.0f} calls/s, "
                f"{fmt(result['client_us_per_call'])} µs of client CPU per call"
            )

    def one_client_floor(self, client: str, keys: list[str], args: list[Any]) -> dict[str, Any]:
        assert self.redis is not None
        ctx = mp.get_context("spawn")
        results: Any = ctx.Queue()
        spec = {
            "scenario": "redis_floor",
            "client": client,
            "url": self.redis.url,
            "script": script_text("check"),
            "keys": keys,
            "args": args,
            "index": 0,
            "start_at": time.time() + 2.0,
            "warm_up": self.args.warm_up,
            "duration": self.args.duration,
            "concurrency": self.args.clients * self.args.streams,
        }
        process = ctx.Process(target=driver.worker, args=(spec, results))
        process.start()
        self.cores.pin(process.pid or 0, self.cores.server)
        (outcome,) = collect(results, [process], self.args.warm_up + self.args.duration + 120)
        process.join(30)
        return dict(outcome)

    def redis_ceiling(self) -> None:
        assert self.redis is not None
        keys, args = self.check_script_call()
        self.redis_client_floor(keys, args)
        sha = self.redis_client.script_load(script_text("check"))
        reply = self.redis_client.evalsha(sha, len(keys), *keys, *args)
        if reply[0] != "OK" or reply[1] != "1":
            raise RuntimeError(f"check.lua through EVALSHA did not allow: {reply[:2]}")
        command = ["EVALSHA", sha, str(len(keys)), *keys, *(str(a) for a in args)]
        self.results["redis-benchmark"] = {"command": " ".join(c or "''" for c in command)}
        for pipeline in (16, 1):
            requests = self.args.redis_requests * (2 if pipeline > 1 else 1)
            done = subprocess.run(
                self.cores.on(
                    self.cores.server,
                    [
                        str(self.tools.redis_benchmark),
                        "-h",
                        self.redis.host,
                        "-p",
                        str(self.redis.port),
                        "-c",
                        "16",
                        "-n",
                        str(requests),
                        "-P",
                        str(pipeline),
                        "--csv",
                        *command,
                    ],
                ),
                env=self.tools.env,
                capture_output=True,
                text=True,
                check=False,
                # The servers are idle now: redis-benchmark takes their core.
            )
            rows = [line for line in done.stdout.splitlines() if line.startswith('"EVALSHA')]
            if done.returncode != 0 or not rows:
                raise RuntimeError(f"redis-benchmark failed:\n{done.stdout}\n{done.stderr}")
            fields = [f.strip('"') for f in rows[-1].rsplit(",", 7)]
            result = {
                "tool": "redis-benchmark",
                "calls_per_s": float(fields[1]),
                "calls": requests,
                "mean_ms": float(fields[2]),
                "p50_ms": float(fields[4]),
                "p99_ms": float(fields[6]),
                "clients": 16,
                "pipeline": pipeline,
            }
            self.results[f"redis check.lua -P {pipeline}"] = result
            log(f"redis-benchmark check.lua -P {pipeline}: {result['calls_per_s']:.0f} calls/s")

    def command_stats(self) -> None:
        """Redis commands per call type: INFO commandstats deltas over a known number of calls."""
        n = self.args.commandstats_calls
        quota = self.quota
        prefix = f"cs{int(time.time())}"

        def batch_call(i: int) -> None:
            quota.CheckQuotaBatch(
                quota_pb2.CheckQuotaBatchRequest(
                    items=[quota_pb2.CheckQuotaRequest(org_id=ORG, units=CHECK_UNITS)] * 10
                ),
                timeout=10,
            )

        kinds: list[tuple[str, Callable[[int], Any], int]] = [
            (
                "CheckQuota (no hold)",
                lambda i: quota.CheckQuota(
                    quota_pb2.CheckQuotaRequest(org_id=ORG, units=CHECK_UNITS), timeout=10
                ),
                1,
            ),
            (
                "CheckQuota hold=true",
                lambda i: quota.CheckQuota(
                    quota_pb2.CheckQuotaRequest(
                        org_id=ORG, units=CHECK_UNITS, request_id=f"{prefix}-h{i}", hold=True
                    ),
                    timeout=10,
                ),
                1,
            ),
            (
                "RecordUsage of a held job",
                lambda i: quota.RecordUsage(
                    quota_pb2.RecordUsageRequest(
                        org_id=ORG, units=CHECK_UNITS, request_id=f"{prefix}-h{i}"
                    ),
                    timeout=10,
                ),
                1,
            ),
            (
                "RecordUsage (no hold)",
                lambda i: quota.RecordUsage(
                    quota_pb2.RecordUsageRequest(
                        org_id=ORG, units=CHECK_UNITS, request_id=f"{prefix}-r{i}"
                    ),
                    timeout=10,
                ),
                1,
            ),
            (
                "RecordUsage duplicate",
                lambda i: quota.RecordUsage(
                    quota_pb2.RecordUsageRequest(
                        org_id=ORG, units=CHECK_UNITS, request_id=f"{prefix}-r{i}"
                    ),
                    timeout=10,
                ),
                1,
            ),
            (
                "ReleaseQuota of a held job",
                lambda i: (
                    quota.CheckQuota(
                        quota_pb2.CheckQuotaRequest(
                            org_id=ORG, units=CHECK_UNITS, request_id=f"{prefix}-x{i}", hold=True
                        ),
                        timeout=10,
                    ),
                    quota.ReleaseQuota(
                        quota_pb2.ReleaseQuotaRequest(org_id=ORG, request_id=f"{prefix}-x{i}"),
                        timeout=10,
                    ),
                ),
                2,
            ),
            (
                "GetUsage",
                lambda i: quota.GetUsage(quota_pb2.GetUsageRequest(org_id=ORG), timeout=10),
                1,
            ),
        ]
        if "CheckQuotaBatch" in self.results_batch_names():
            kinds.append(("CheckQuotaBatch of 10 (per batch)", batch_call, 1))
        # Health probes (PING, TIME) and our own INFO/CONFIG are not calls' work.
        ignore = {"ping", "time", "info", "config", "client", "hello", "select"}
        table: dict[str, dict[str, Any]] = {}
        for name, call, rpcs in kinds:
            self.redis_client.config_resetstat()
            for i in range(n):
                call(i)
            stats = self.redis_client.info("commandstats")
            per_command = {
                key.removeprefix("cmdstat_"): value["calls"] / n
                for key, value in stats.items()
                if key.removeprefix("cmdstat_") not in ignore
            }
            # Time Redis spent in the scripts (EVALSHA's usec includes the commands
            # the script runs): Redis CPU per call.
            script_usec = (
                sum(
                    value["usec"]
                    for key, value in stats.items()
                    if key in ("cmdstat_evalsha", "cmdstat_eval")
                )
                / n
            )
            if name.startswith("ReleaseQuota"):
                # The hold's CheckQuota is measured on its own above: take it out.
                hold = table["CheckQuota hold=true"]["commands"]
                per_command = {k: v - hold.get(k, 0.0) for k, v in per_command.items()}
                script_usec -= table["CheckQuota hold=true"]["redis_usec"]
            per_command = {k: round(v, 2) for k, v in per_command.items() if round(v, 2) > 0}
            scripts = sum(v for k, v in per_command.items() if k in ("evalsha", "eval"))
            table[name] = {
                "script_calls": round(scripts, 2),
                "commands_total": round(sum(per_command.values()), 2),
                "commands_in_scripts": round(sum(per_command.values()) - scripts, 2),
                "commands": dict(sorted(per_command.items(), key=lambda kv: -kv[1])),
                "rpcs_per_call": rpcs,
                "redis_usec": round(script_usec, 1),
            }
        self.results["redis commands per call"] = table
        log(
            "Redis commands per call: "
            + ", ".join(f"{k} {v['commands_total']}" for k, v in table.items())
        )

    def results_batch_names(self) -> set[str]:
        return (
            {"CheckQuotaBatch"}
            if any(k.startswith("CheckQuotaBatch") for k in self.results)
            else set()
        )

    def memory(self) -> None:
        """Bytes of Redis per organization after known numbers of jobs (reserve + commit).

        Measured with this Redis's hash-max-ziplist-value (the embedded store sets
        256) and again, for another organization, with Redis's own default of 64
        (what an external Redis has unless configured; see docs/operations.md).
        """
        name = "hash-max-ziplist-value"
        configured = str(self.redis_client.config_get(name)[name])
        self.results["memory per organization"] = {
            name: configured,
            **self.memory_of(MEMORY_ORG),
        }
        if configured != "64":
            self.redis_client.config_set(name, 64)
            try:
                self.results["memory per organization (Redis default 64)"] = {
                    name: "64",
                    **self.memory_of(MEMORY_ORG + "-64"),
                }
            finally:
                self.redis_client.config_set(name, configured)

    def memory_of(self, org: str) -> dict[str, Any]:
        self.set_plan(org)
        quota = self.quota
        now = time.time()
        days = 28
        document_types = ("invoice", "receipt", "contract", "id_card")
        steps = self.args.memory_jobs
        measured: list[dict[str, Any]] = []
        done = 0
        for target in steps:
            while done < target:
                request_id = f"mem-{done}"
                units = {"pages": 1 + done % 7, "documents": 1}
                held = quota.CheckQuota(
                    quota_pb2.CheckQuotaRequest(
                        org_id=org, units=units, request_id=request_id, hold=True
                    ),
                    timeout=10,
                )
                if not held.held:
                    raise RuntimeError(f"memory: job {request_id} was not held")
                # Jobs spread evenly over the last 28 days: a month of day hashes.
                completed = timestamp_pb2.Timestamp()
                completed.FromMilliseconds(int((now - (done % days) * 86400 - 60) * 1000))
                quota.RecordUsage(
                    quota_pb2.RecordUsageRequest(
                        org_id=org,
                        request_id=request_id,
                        units=units,
                        document_type=document_types[done % len(document_types)],
                        completed_at=completed,
                    ),
                    timeout=10,
                )
                done += 1
            measured.append({"jobs": done, **self.org_memory(org)})
        first, last = measured[0], measured[-1]
        per_job = (last["bytes"] - first["bytes"]) / (last["jobs"] - first["jobs"])
        record_kinds = ("r (job records)", "recs (records index)")
        per_job_records = sum(
            last["by_kind"].get(k, {}).get("bytes", 0) - first["by_kind"].get(k, {}).get("bytes", 0)
            for k in record_kinds
        ) / (last["jobs"] - first["jobs"])
        result = {
            "steps": measured,
            "bytes_per_job": per_job,
            "bytes_per_job_records": per_job_records,
            "fixed_bytes": first["bytes"] - per_job * first["jobs"],
            "days_spread": days,
        }
        log(
            f"Redis memory ({org}): {per_job:.0f} bytes per job, "
            f"{last['bytes']} bytes after {last['jobs']} jobs"
        )
        return result

    def org_memory(self, org: str) -> dict[str, Any]:
        keys = list(self.redis_client.scan_iter(match=f"pm:{{{org}}}:*", count=1000))
        pipe = self.redis_client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command(  # type: ignore[no-untyped-call]  # redis-py lacks annotations here
                "MEMORY", "USAGE", key, "SAMPLES", "0"
            )
        sizes = [int(s or 0) for s in pipe.execute()]
        by_kind: dict[str, dict[str, int]] = {}
        for key, size in zip(keys, sizes, strict=True):
            kind = key.split("}:", 1)[1].split(":", 1)[0]
            kind = {
                "r": "r (job records)",
                "recs": "recs (records index)",
                "d": "d (day hashes)",
                "u": "u (month and lifetime hashes)",
            }.get(kind, kind)
            row = by_kind.setdefault(kind, {"keys": 0, "bytes": 0})
            row["keys"] += 1
            row["bytes"] += size
        records = [k for k in keys if k.split("}:", 1)[1].startswith("r:")][:200]
        pipe = self.redis_client.pipeline(transaction=False)
        for key in records:
            pipe.object("encoding", key)
        encodings = collections.Counter(pipe.execute())
        return {
            "bytes": sum(sizes),
            "keys": len(keys),
            "by_kind": by_kind,
            "record_encodings": dict(encodings),
        }

    # -- profiles -----------------------------------------------------------------

    def profile(self, py_spy: str) -> None:
        assert self.server is not None
        check = grpc_frame(quota_pb2.CheckQuotaRequest(org_id=ORG, units=CHECK_UNITS))
        starters: tuple[tuple[str, Callable[[], Callable[[], None]]], ...] = (
            ("CheckQuota", lambda: self._background_h2load(check)),
            ("reserve+commit", self._background_driver),
        )
        for name, start_load in starters:
            output = self.out / f"profile-{name.replace('+', '-')}.speedscope.json"
            load = start_load()
            time.sleep(self.args.warm_up + 1)
            spied = subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(self.server.pid),
                    "--duration",
                    str(max(3, self.args.duration - 2)),
                    "--rate",
                    "200",
                    "--nonblocking",
                    "--format",
                    "speedscope",
                    "--output",
                    str(output),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            load()
            if spied.returncode != 0 or not output.exists():
                self.notes.append(f"py-spy failed on {name}: {spied.stderr.strip()[-300:]}")
                continue
            summary = summarize_profile(json.loads(output.read_text()))
            summary["file"] = shown_path(output)
            self.results.setdefault("profiles", {})[name] = summary
            log(
                f"profile {name}: "
                + ", ".join(f"{k} {v:.0f}%" for k, v in list(summary["layers"].items())[:5])
            )

    def _background_h2load(self, body: bytes) -> Callable[[], None]:
        body_path = self.out / "profile.body"
        body_path.write_bytes(body)
        process = subprocess.Popen(
            self.cores.on(
                self.cores.load,
                [
                    str(self.tools.h2load),
                    "-c",
                    str(self.args.clients),
                    "-m",
                    str(self.args.streams),
                    "-D",
                    str(self.args.duration + self.args.warm_up + 1),
                    "-d",
                    str(body_path),
                    "-H",
                    "content-type: application/grpc",
                    "-H",
                    "te: trailers",
                    f"http://127.0.0.1:{self.port}/{SERVICE}/CheckQuota",
                ],
            ),
            env=self.tools.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def finish() -> None:
            process.wait()

        return finish

    def _background_driver(self) -> Callable[[], None]:
        ctx = mp.get_context("spawn")
        results: Any = ctx.Queue()
        spec = {
            "scenario": "reserve_commit",
            "target": self.target,
            "org": ORG,
            "run_id": f"profile{int(time.time())}",
            "start_at": time.time() + 1.0,
            "warm_up": self.args.warm_up,
            "duration": self.args.duration,
            "concurrency": self.args.driver_concurrency,
        }
        processes = [
            ctx.Process(target=driver.worker, args=({**spec, "index": i}, results))
            for i in range(self.args.driver_processes)
        ]
        for process in processes:
            process.start()
            self.cores.pin(process.pid or 0, self.cores.load)

        def finish() -> None:
            collect(results, processes, self.args.warm_up + self.args.duration + 120)
            for process in processes:
                process.join(30)

        return finish


# ---------------------------------------------------------------------------
# Profile summary


def layer_of(name: str, file: str) -> str:
    """Which part of the stack a sampled Python frame belongs to."""
    if "pagemeter_server" in file:
        module = file.rsplit("/", 1)[-1].removesuffix(".py")
        return f"pagemeter_server.{module}"
    for marker, layer in (
        ("/redis/", "redis-py (client)"),
        ("/grpc/", "grpc (Python layer)"),
        ("/google/protobuf/", "protobuf"),
        ("/prometheus_client/", "prometheus_client"),
        ("/asyncio/", "asyncio (Python)"),
        ("/uvloop/", "asyncio (Python)"),
        ("/logging/", "logging"),
        ("/json/", "json"),
        ("threading.py", "other threads"),
    ):
        if marker in file:
            return layer
    return "other Python"


def summarize_profile(doc: dict[str, Any]) -> dict[str, Any]:
    """Shares of CPU samples: by layer of the innermost frame, by function, inclusive.

    py-spy without --native cannot see inside C extensions: time spent in the
    gRPC core, its Cython layer and uvloop's C loop shows up as the innermost
    Python frame that called it, which for the event loop is `Runner.run`.
    """
    frames = doc["shared"]["frames"]
    total = 0.0
    layers: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for profile in doc["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            total += weight
            thread = profile.get("name", "")
            threads["main thread" if "MainThread" in thread else "other threads"] += weight
            if not stack:
                continue
            top = frames[stack[-1]]
            file = top.get("file", "")
            label = f"{top['name']} ({file.rsplit('/', 1)[-1]})"
            self_time[label] += weight
            if top["name"] == "Runner.run" or top["name"] == "run_until_complete":
                layers["native: gRPC core, Cython, uvloop (below the event loop)"] += weight
            elif top["name"] == "Thread.run" and "MainThread" not in thread:
                layers["native: gRPC poller thread"] += weight
            elif top["name"] == "StreamWriter.writelines" or top["name"].endswith("sendall"):
                layers["socket writes to Redis (syscall)"] += weight
            else:
                layers[layer_of(top["name"], file)] += weight
            seen: set[str] = set()
            for index in stack:
                frame = frames[index]
                key = f"{frame['name']} ({frame.get('file', '').rsplit('/', 1)[-1]})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += weight

    def shares(counter: collections.Counter[str], n: int) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(n)} if total else {}

    interesting = [
        k
        for k, _ in inclusive.most_common(200)
        if any(
            word in k
            for word in (
                "observed",
                "wrapped",
                "CheckQuota",
                "RecordUsage",
                "Store.",
                "AsyncScript",
                "execute_command",
                "_decision",
                "_check_response",
                "_count_decisions",
                "fingerprint",
                "labels",
                "authenticate",
                "check_units",
                "_validate",
            )
        )
    ]
    return {
        "seconds_sampled": round(total, 2),
        "layers": shares(layers, 20),
        "top_self": shares(self_time, 15),
        "inclusive": {k: round(100 * inclusive[k] / total, 1) for k in interesting[:25]},
        "threads": shares(threads, 5),
    }


# ---------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions(tools: Tools, redis_client: redis.Redis) -> dict[str, str]:
    import hiredis

    def pkg(name: str) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "pagemeter": commit or "?",
        "h2load": tools.version(tools.h2load),
        "redis-benchmark": tools.version(tools.redis_benchmark),
        "redis-server": server_version(redis_client.info("server")),
        "grpcio": grpc.__version__,
        "protobuf": pkg("protobuf"),
        "redis-py": redis.__version__,
        "hiredis": getattr(hiredis, "__version__", "?"),
        "uvloop": pkg("uvloop"),
    }


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def per_window_usec(with_windows: float | None, without: float | None) -> float | None:
    """Microseconds each window adds to a call, from calls/s with and without windows."""
    if not with_windows or not without:
        return None
    return (1e6 / with_windows - 1e6 / without) / WINDOWS_PER_CALL


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return a / b


def paired_figures(
    results: dict[str, Any], base: str, other: str, base_tag: str, other_tag: str
) -> dict[str, float | None]:
    """One scenario measured on two servers in one run: `other` against `base`."""
    first, second = results.get(base, {}), results.get(other, {})
    return {
        "calls_per_s_ratio": ratio(second.get("calls_per_s"), first.get("calls_per_s")),
        f"p50_ms_{base_tag}": first.get("p50_ms"),
        f"p50_ms_{other_tag}": second.get("p50_ms"),
        f"p99_ms_{base_tag}": first.get("p99_ms"),
        f"p99_ms_{other_tag}": second.get("p99_ms"),
        "server_cpu_per_call_ratio": ratio(cpu_per_call(second), cpu_per_call(first)),
    }


def replica_acks_figures(results: dict[str, Any], label: str) -> dict[str, float | None]:
    """--replica-acks 1 against none, both with a replica attached, from one run."""
    return paired_figures(
        results,
        f"{label}, replica attached (Python driver)",
        f"{label}, --replica-acks 1 (Python driver)",
        "without",
        "with",
    )


def events_figures(results: dict[str, Any], label: str) -> dict[str, Any]:
    """Events on against off (--max-events-per-org 0), the same Redis, from the
    alternating rounds of one run: each round's ratio and their median."""
    rounds = []
    number = 1
    while f"{label}, events on, round {number} (Python driver)" in results:
        rounds.append(
            paired_figures(
                results,
                f"{label}, events off, round {number} (Python driver)",
                f"{label}, events on, round {number} (Python driver)",
                "off",
                "on",
            )
        )
        number += 1
    calls = [r["calls_per_s_ratio"] for r in rounds if r["calls_per_s_ratio"] is not None]
    cpu = [r["server_cpu_per_call_ratio"] for r in rounds if r["server_cpu_per_call_ratio"]]
    return {
        "calls_per_s_ratio": statistics.median(calls) if calls else None,
        "calls_per_s_ratio_rounds": [round(x, 3) for x in calls],
        "server_cpu_per_call_ratio": statistics.median(cpu) if cpu else None,
    }


def tracing_off_path_ns(calls: int = 200_000) -> dict[str, float]:
    """Nanoseconds per call of what tracing off still runs, outside any span: the
    SDK's look for a trace context to send with each call, and the log
    formatter's look for a span to name in each line. (The server has no tracing
    interceptor then, and its store one `is None` test per script call.)"""
    from pagemeter_client._channel import with_trace_context
    from pagemeter_server.ops.logs import trace_fields

    metadata = (("authorization", "Bearer x"),)
    figures = {}
    for name, call in (
        ("client_call_metadata", lambda: with_trace_context(metadata)),
        ("log_line_trace_fields", trace_fields),
    ):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        figures[name] = round((time.perf_counter() - started) / calls * 1e9, 1)
    return figures


def tracing_figures(results: dict[str, Any]) -> dict[str, Any]:
    """Tracing on (spans dropped in the process) against off, CheckQuota at
    saturation, from the alternating rounds of one run: the calls/s of each side
    and the median of the rounds' ratios; and the off path's nanoseconds per call."""
    rounds = []
    off, on = [], []
    number = 1
    while f"CheckQuota, tracing on, round {number}" in results:
        off_name = f"CheckQuota, tracing off, round {number}"
        on_name = f"CheckQuota, tracing on, round {number}"
        rounds.append(paired_figures(results, off_name, on_name, "off", "on"))
        off.append(results[off_name]["calls_per_s"])
        on.append(results[on_name]["calls_per_s"])
        number += 1
    calls = [r["calls_per_s_ratio"] for r in rounds if r["calls_per_s_ratio"] is not None]
    cpu = [r["server_cpu_per_call_ratio"] for r in rounds if r["server_cpu_per_call_ratio"]]
    return {
        "check_calls_per_s_off": statistics.median(off) if off else None,
        "check_calls_per_s_on": statistics.median(on) if on else None,
        "check_calls_per_s_ratio_on_vs_off": statistics.median(calls) if calls else None,
        "check_calls_per_s_ratio_rounds": [round(x, 3) for x in calls],
        "server_cpu_per_call_ratio_on_vs_off": statistics.median(cpu) if cpu else None,
        "off_path_ns": results.get("tracing off, added per call"),
    }


def cpu_per_call(result: dict[str, Any]) -> float | None:
    calls = result.get("calls_per_s")
    cores = result.get("server_cpu_cores")
    return cores / calls if calls and cores is not None else None


def check_vs_naive_rounds(r: dict[str, Any]) -> tuple[float | None, list[float]]:
    """The median and the list of CheckQuota ÷ naive over the alternating pairs."""
    ratios = []
    number = 1
    while (mine := r.get(f"CheckQuota vs naive, round {number}: CheckQuota")) and (
        theirs := r.get(f"CheckQuota vs naive, round {number}: naive")
    ):
        if theirs["calls_per_s"]:
            ratios.append(mine["calls_per_s"] / theirs["calls_per_s"])
        number += 1
    return (statistics.median(ratios) if ratios else None), ratios


def report(bench: Bench, info: dict[str, Any]) -> dict[str, Any]:
    r = bench.results
    empty_h2 = [r[k]["calls_per_s"] for k in ("empty (before)", "empty (after)") if k in r]
    empty = sum(empty_h2) / len(empty_h2) if empty_h2 else None
    naive_h2 = [r[k]["calls_per_s"] for k in ("naive (before)", "naive (after)") if k in r]
    naive = sum(naive_h2) / len(naive_h2) if naive_h2 else None
    empty_py = r.get("empty (Python driver)", {}).get("calls_per_s")
    ceiling = r.get("redis check.lua -P 16", {}).get("calls_per_s")
    batch_key = next((k for k in r if k.startswith("CheckQuotaBatch")), None)

    rows: list[list[str]] = []
    for name, result in r.items():
        if "calls_per_s" not in result:
            continue
        tool = result["tool"]
        is_pagemeter = tool == "h2load" or "Python driver" in tool
        saturated = not name.startswith(("empty", "naive")) and "rate" not in name
        base = empty_py if "Python driver" in tool else empty
        versus = "-"
        if is_pagemeter and saturated and "decisions_per_s" not in result:
            versus = fmt(ratio(result["calls_per_s"], base), 2)
        against_ceiling = "-"
        if name == "CheckQuota" or "decisions_per_s" in result or tool.startswith("redis-py"):
            shown = result.get("decisions_per_s", result["calls_per_s"])
            against_ceiling = fmt(ratio(shown, ceiling), 3)
        rows.append(
            [
                name,
                tool.split(" (")[0],
                f"{result['calls_per_s']:.0f}",
                f"{result['decisions_per_s']:.0f}" if "decisions_per_s" in result else "",
                fmt(result.get("p50_ms")),
                fmt(result.get("p99_ms")),
                versus,
                against_ceiling,
                fmt(result.get("server_cpu_cores")),
            ]
        )
    headers = [
        "measurement",
        "tool",
        "calls/s",
        "decisions/s",
        "p50 ms",
        "p99 ms",
        "vs empty",
        "vs Redis ceiling",
        "server CPU",
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    print(
        "vs empty: calls/s against the empty handler measured by the same tool (h2load: the "
        "mean of its two runs). vs Redis ceiling: calls (or decisions) per second against "
        "redis-benchmark's check.lua -P 16. server CPU: cores the server process used over "
        "the run (1.00 = all of its pinned core)."
    )

    print("server side (pagemeter's own histograms; p50/p99 interpolated inside buckets):")
    for name, result in r.items():
        handling = result.get("server_handling")
        if not handling:
            continue
        scripts = ", ".join(
            f"{script} mean {fmt(v['mean_ms'])} ms" for script, v in result["redis_script"].items()
        )
        print(
            f"  {name}: handling mean {fmt(handling['mean_ms'])} ms, "
            f"p50 {fmt(handling['p50_ms'])} ms, p99 {fmt(handling['p99_ms'])} ms; "
            f"Redis script call {scripts or '-'}"
        )
    rss = {k: round(v / MIB, 1) for k, v in bench.rss.peak.items()}
    print(f"peak RSS MB: {rss}")
    commands = r.get("redis commands per call", {})
    if commands:
        print("Redis commands per call (EVALSHA + commands inside the script):")
        for name, row in commands.items():
            top = ", ".join(f"{k} {v:g}" for k, v in list(row["commands"].items())[:6])
            print(
                f"  {name}: {row['commands_total']:g} ({top}); "
                f"{row['redis_usec']:g} us of Redis time"
            )
    for key in ("memory per organization", "memory per organization (Redis default 64)"):
        memory = r.get(key)
        if memory:
            print(
                f"Redis memory per organization, hash-max-ziplist-value "
                f"{memory['hash-max-ziplist-value']}: {memory['fixed_bytes']:.0f} bytes fixed + "
                f"{memory['bytes_per_job']:.0f} bytes per job "
                f"(records and their index {memory['bytes_per_job_records']:.0f}); "
                f"(jobs, bytes): {[(m['jobs'], m['bytes']) for m in memory['steps']]}"
            )
    for name, profile in r.get("profiles", {}).items():
        print(f"profile {name} (share of samples by layer): {profile['layers']}")
    for note in bench.notes:
        print(f"note: {note}")
    for problem in bench.problems:
        print(f"PROBLEM: {problem}")

    check = r.get("CheckQuota", {})
    half = r.get("CheckQuota @ half rate", {})
    rc = r.get("reserve+commit (Python driver)", {})
    batch = r.get(batch_key, {}) if batch_key else {}
    targets = {
        "check_vs_naive": check_vs_naive_rounds(r)[0] or ratio(check.get("calls_per_s"), naive),
        "check_vs_empty": ratio(check.get("calls_per_s"), empty),
        "reserve_commit_vs_empty": ratio(rc.get("calls_per_s"), empty_py),
        "batch_vs_redis_ceiling": ratio(batch.get("decisions_per_s"), ceiling),
        "check_p99_ms_at_half_rate": half.get("p99_ms"),
        "record_new_cpu_per_call_vs_check": ratio(
            cpu_per_call(r.get("RecordUsage new ids (Python driver)", {})), cpu_per_call(check)
        ),
        "rss_mb_per_worker": rss.get("pagemeter"),
        "sdk_coalesced_vs_single": sdk_batching.figures(r).get("coalesced_vs_single"),
    }
    verdict = {}
    for key, value in targets.items():
        if value is None:
            verdict[key] = "not measured"
        elif key in LOWER_IS_BETTER:
            verdict[key] = "met" if value <= TARGETS[key] else "missed"
        else:
            verdict[key] = "met" if value >= TARGETS[key] else "missed"
    print(
        "targets: "
        + ", ".join(f"{k} {fmt(targets[k])} (target {TARGETS[k]}): {verdict[k]}" for k in targets)
    )

    def figure(name: str, key: str = "calls_per_s") -> float | None:
        value = r.get(name, {}).get(key)
        return round(value, 2) if isinstance(value, float) else value

    summary = {
        "date": info["date"],
        "machine": f"{info['machine']['cores']} cores, {info['machine']['cpu']}",
        "pinned": bench.cores.pinned,
        "pagemeter": info["versions"]["pagemeter"],
        "concurrency": f"h2load -c {bench.args.clients} -m {bench.args.streams}",
        "duration_s": bench.args.duration,
        "calls_per_s": {
            "empty": round(empty, 1) if empty else None,
            "empty_before": figure("empty (before)"),
            "empty_after": figure("empty (after)"),
            "naive": round(naive, 1) if naive else None,
            "naive_before": figure("naive (before)"),
            "naive_after": figure("naive (after)"),
            "check": figure("CheckQuota"),
            "get_usage": figure("GetUsage"),
            "record_duplicate": figure("RecordUsage (duplicate)"),
            "check_batch_decisions": figure(batch_key, "decisions_per_s") if batch_key else None,
            "empty_python_driver": figure("empty (Python driver)"),
            "reserve_commit_calls_python_driver": figure("reserve+commit (Python driver)"),
            "reserve_commit_jobs_python_driver": figure(
                "reserve+commit (Python driver)", "ops_per_s"
            ),
            "record_new_python_driver": figure("RecordUsage new ids (Python driver)"),
        },
        "p50_ms": {
            k: figure(n, "p50_ms")
            for k, n in (
                ("check", "CheckQuota"),
                ("get_usage", "GetUsage"),
                ("check_half_rate", "CheckQuota @ half rate"),
                ("empty_same_rate", "empty @ same rate"),
                ("naive_same_rate", "naive @ same rate"),
                ("check_half_rate_h2load_bursts", "CheckQuota @ half rate (h2load bursts)"),
                ("empty_same_rate_h2load_bursts", "empty @ same rate (h2load bursts)"),
                ("naive_same_rate_h2load_bursts", "naive @ same rate (h2load bursts)"),
                ("reserve_commit_job", "reserve+commit (Python driver)"),
            )
        },
        "p99_ms": {
            k: figure(n, "p99_ms")
            for k, n in (
                ("check", "CheckQuota"),
                ("get_usage", "GetUsage"),
                ("check_half_rate", "CheckQuota @ half rate"),
                ("empty_same_rate", "empty @ same rate"),
                ("naive_same_rate", "naive @ same rate"),
                ("check_half_rate_h2load_bursts", "CheckQuota @ half rate (h2load bursts)"),
                ("empty_same_rate_h2load_bursts", "empty @ same rate (h2load bursts)"),
                ("naive_same_rate_h2load_bursts", "naive @ same rate (h2load bursts)"),
                ("reserve_commit_job", "reserve+commit (Python driver)"),
            )
        },
        "ratios": {
            k: round(v, 3) if v is not None else None
            for k, v in targets.items()
            if k.endswith(("empty", "naive", "ceiling"))
        }
        | {
            "get_usage_vs_empty": rounded(ratio(figure("GetUsage"), empty)),
            "naive_vs_empty": rounded(ratio(naive, empty)),
            "check_vs_naive_single_pass": rounded(ratio(check.get("calls_per_s"), naive)),
            "check_vs_naive_rounds": [round(v, 3) for v in check_vs_naive_rounds(r)[1]],
            "check_4_windows_per_metric_vs_naive": rounded(ratio(figure(WINDOWS_LABEL), naive)),
            "record_duplicate_vs_empty": rounded(ratio(figure("RecordUsage (duplicate)"), empty)),
            "record_new_vs_empty_python": rounded(
                ratio(figure("RecordUsage new ids (Python driver)"), empty_py)
            ),
            "check_vs_redis_ceiling": rounded(ratio(check.get("calls_per_s"), ceiling)),
            "check_4_windows_per_metric_vs_check": rounded(
                ratio(figure(WINDOWS_LABEL), check.get("calls_per_s"))
            ),
            "redis_py_floor_vs_redis_ceiling": rounded(
                ratio(figure("redis-py check.lua (client floor)"), ceiling)
            ),
        },
        # What one more window costs a CheckQuota at saturation, from the two rates.
        "usec_per_window": rounded(
            per_window_usec(figure(WINDOWS_LABEL), check.get("calls_per_s"))
        ),
        "events": {
            f"{key}_{figure_name}": value if isinstance(value, list) else rounded(value)
            for key, label in (("record", "RecordUsage new ids"), ("job", "reserve+commit"))
            for figure_name, value in events_figures(r, label).items()
        },
        "tracing": {
            key: value if isinstance(value, list | dict) else rounded(value)
            for key, value in tracing_figures(r).items()
        },
        "sdk_batching": sdk_batching.figures(r),
        "replica_acks_1": {
            f"{key}_{figure_name}": rounded(value)
            for key, label in (("record", "RecordUsage new ids"), ("job", "reserve+commit"))
            for figure_name, value in replica_acks_figures(r, label).items()
        },
        "redis_ceiling_calls_per_s": {
            "pipelined_16": figure("redis check.lua -P 16"),
            "unpipelined": figure("redis check.lua -P 1"),
            "redis_py_one_process": figure("redis-py check.lua (client floor)"),
            "pipelined_one_process": figure("pipelined check.lua (client floor)"),
            "valkey_glide_one_process": figure("valkey-glide check.lua (client floor)"),
            "coredis_one_process": figure("coredis check.lua (client floor)"),
        },
        "redis_client_us_per_call": {
            client: figure(
                "redis-py check.lua (client floor)"
                if client == "redis-py"
                else f"{client} check.lua (client floor)",
                "client_us_per_call",
            )
            for client in REDIS_CLIENTS
        },
        "redis_bytes_per_job": {
            memory["hash-max-ziplist-value"]: round(memory["bytes_per_job"])
            for key in ("memory per organization", "memory per organization (Redis default 64)")
            if (memory := r.get(key))
        },
        "redis_commands_per_call": {
            name: row["commands_total"]
            for name, row in r.get("redis commands per call", {}).items()
        },
        "redis_usec_per_call": {
            name: row["redis_usec"] for name, row in r.get("redis commands per call", {}).items()
        },
        "rss_mb": rss,
        "targets": verdict,
        "problems": len(bench.problems),
    }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pagemeter benchmark (docs/performance.md)")
    parser.add_argument("--tools", type=Path, default=ROOT / ".tools/bench")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench")
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per phase")
    parser.add_argument("--warm-up", type=int, default=2, help="seconds before each measurement")
    parser.add_argument("--clients", type=int, default=16, help="h2load connections (-c)")
    parser.add_argument("--streams", type=int, default=4, help="h2load streams per connection (-m)")
    parser.add_argument("--driver-processes", type=int, default=2)
    parser.add_argument(
        "--driver-concurrency", type=int, default=16, help="calls in flight per process"
    )
    parser.add_argument(
        "--ratio-rounds",
        type=int,
        default=3,
        help="alternating pairs of CheckQuota and naive-handler runs for check_vs_naive",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="items per CheckQuotaBatch")
    parser.add_argument("--redis-requests", type=int, default=100_000)
    parser.add_argument("--commandstats-calls", type=int, default=200)
    parser.add_argument(
        "--memory-jobs", type=lambda s: [int(x) for x in s.split(",")], default=[500, 2500]
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin servers and load to cores"
    )
    parser.add_argument(
        "--profile",
        choices=("auto", "yes", "no"),
        default="auto",
        help="py-spy profiles (auto: if installed)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PHASES,
        default=[],
        help="run only this phase (repeatable; a quick look, not a full run)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra pagemeter-server argument (repeatable)",
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    tools = Tools(args.tools.resolve())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out.resolve() / stamp
    out.mkdir(parents=True)
    bench = Bench(args, tools, out)
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    py_spy = shutil.which("py-spy", path=str(BIN)) if args.profile != "no" else None
    if args.profile == "yes" and not py_spy:
        raise SystemExit("--profile yes: py-spy is not installed in the virtualenv")
    try:
        bench.start()
        assert bench.redis is not None
        info["versions"] = versions(tools, bench.redis_client)
        log(
            f"servers on core(s) {sorted(bench.cores.server)}, Redis and load on "
            f"{sorted(bench.cores.load)}"
            if bench.cores.pinned
            else "not pinned"
        )
        phases: dict[str, Callable[[], None]] = {
            "saturation": bench.saturation,
            "latency": bench.latency,
            "drivers": bench.drivers,
            "replica-acks": bench.replica_acks,
            "events": bench.events_cost,
            "tracing": bench.tracing_cost,
            "sdk-batching": lambda: sdk_batching.measure(bench, ORG, cpu_use),
            "redis-ceiling": bench.redis_ceiling,
            "command-stats": bench.command_stats,
            "memory": bench.memory,
        }
        if py_spy:
            phases["profile"] = lambda: bench.profile(py_spy)
        for name, phase in phases.items():
            if not args.only or name in args.only:
                phase()
    finally:
        bench.stop()
    summary = report(bench, info)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(
        json.dumps(
            {
                "info": info,
                "settings": vars(args) | {"tools": str(args.tools), "out": str(args.out)},
                "results": bench.results,
                "notes": bench.notes,
                "problems": bench.problems,
                "summary": summary,
            },
            indent=2,
            default=str,
        )
    )
    print(f"results: {shown_path(out)}/results.json ({info['elapsed_s']} s)")
    print(json.dumps(summary, separators=(",", ":"), default=str))
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
