"""Several server processes on one port (--workers N), sharing one Redis.

The supervisor (the process started as pagemeter-server) checks the
configuration, starts the embedded Redis when no URL is given, then starts N
worker processes with the `spawn` method (no gRPC state crosses a fork). Each
worker binds the same gRPC port with SO_REUSEPORT, so the kernel spreads new
connections over them. Worker i serves its Prometheus metrics on the metrics
port + i, and only worker 0 publishes the per-organization gauges (they would
be the same on every worker). SIGTERM or SIGINT to the supervisor is passed on
to every worker, which drains as a single server does; the supervisor then stops
the embedded Redis. A worker that dies is not restarted: the supervisor stops
the others and exits non-zero, so that the service manager sees the failure.

Nothing outlives the supervisor: each worker and the embedded Redis get SIGTERM
from the kernel when it dies, even by SIGKILL (a worker then drains as on any
SIGTERM). Unless --reuse-port is given, the supervisor claims the gRPC port for
itself first (lifecycle.PortClaim), so a second `--workers N` cannot join the
first one's SO_REUSEPORT group and split its traffic over two stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from pagemeter_server.api.auth import check_open_access, load_credentials
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.ops.lifecycle import Phase, PortClaim, die_with_parent
from pagemeter_server.settings import Settings, split_host_port
from pagemeter_server.store.plan_migration import migrate_plans_at, summary

log = logging.getLogger("pagemeter.workers")


def worker_settings(settings: Settings, index: int, redis_url: str) -> Settings:
    """One worker's settings: the shared Redis, its own metrics port, one exporter."""
    metrics = settings.metrics_listen
    if metrics:
        host, port = split_host_port(metrics)
        metrics = f"{host}:{port + index}" if port else metrics
    return dataclasses.replace(
        settings,
        workers=1,
        redis_url=redis_url,
        metrics_listen=metrics,
        org_exporter_max_orgs=settings.org_exporter_max_orgs if index == 0 else 0,
        reuse_port=True,
    )


def _worker_main(settings: Settings, supervisor_pid: int) -> None:
    # First: a worker must not serve on after its supervisor died (SIGTERM: drain).
    die_with_parent(supervisor_pid)
    from pagemeter_server.app import main_with_settings

    main_with_settings(settings)


def supervise(settings: Settings, phase: Phase | None = None) -> int:
    """Run settings.workers worker processes until a signal or a worker's death."""
    phase = phase if phase is not None else Phase()
    check_open_access(settings, load_credentials(settings, os.environ), settings.listen)
    with contextlib.ExitStack() as owned:
        _, port = split_host_port(settings.listen)
        if not settings.reuse_port and port:
            claim = PortClaim(port)
            claim.acquire()
            owned.callback(claim.release)
        else:
            claim = None
        redis_url = settings.redis_url
        if not redis_url and settings.redis_mode == "single":
            embedded = RedisProcess(settings.data_dir)
            embedded.start()
            owned.callback(_stop_embedded, embedded)
            redis_url = embedded.url
            log.info("embedded Redis started (pid %s, data in %s)", embedded.pid, settings.data_dir)
            # The supervisor owns the embedded store: no server of an earlier
            # release can share it, so its plans move to schema 2 now.
            migration = asyncio.run(migrate_plans_at(redis_url))
            if migration is not None:
                log.info(summary(migration))
        code = _run_workers(settings, redis_url, claim, phase, owned)
    return code


def _stop_embedded(embedded: RedisProcess) -> None:
    embedded.stop()
    log.info("embedded Redis stopped")
    sys.stdout.flush()


def _run_workers(
    settings: Settings,
    redis_url: str,
    claim: PortClaim | None,
    phase: Phase,
    owned: contextlib.ExitStack,
) -> int:
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        phase.now = "stopping"
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    def reap() -> None:
        # Also on an error: no worker is left behind (they would get the
        # parent-death SIGTERM anyway, but only once this process has exited).
        deadline = time.monotonic() + settings.grace_period_seconds + 5
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    owned.callback(reap)
    for index in range(settings.workers):
        process = context.Process(
            target=_worker_main,
            args=(worker_settings(settings, index, redis_url), os.getpid()),
            name=f"pagemeter-worker-{index}",
        )
        process.start()
        workers.append(process)
    phase.now = "serving"
    log.info("pagemeter supervising %d workers on %s", len(workers), settings.listen)
    while not stopping and all(worker.is_alive() for worker in workers):
        if claim is not None:
            claim.tend()
        time.sleep(0.2)
    if not stopping:
        log.error("a worker exited; stopping the others")
        forward(signal.SIGTERM, None)
    reap()
    failed = any(worker.exitcode not in (0, -signal.SIGTERM) for worker in workers)
    return 1 if failed and not stopping else 0
