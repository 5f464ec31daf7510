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
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from pagemeter_server.auth import check_open_access, load_credentials
from pagemeter_server.embedded import RedisProcess
from pagemeter_server.settings import Settings, split_host_port

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


def _worker_main(settings: Settings) -> None:
    from pagemeter_server.app import main_with_settings

    main_with_settings(settings)


def supervise(settings: Settings) -> int:
    """Run settings.workers worker processes until a signal or a worker's death."""
    check_open_access(settings, load_credentials(settings, os.environ), settings.listen)
    embedded: RedisProcess | None = None
    redis_url = settings.redis_url
    if not redis_url and settings.redis_mode == "single":
        embedded = RedisProcess(settings.data_dir)
        embedded.start()
        redis_url = embedded.url
        log.info("embedded Redis started (pid %s, data in %s)", embedded.pid, settings.data_dir)
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        for index in range(settings.workers):
            process = context.Process(
                target=_worker_main,
                args=(worker_settings(settings, index, redis_url),),
                name=f"pagemeter-worker-{index}",
            )
            process.start()
            workers.append(process)
        log.info("pagemeter supervising %d workers on %s", len(workers), settings.listen)
        while not stopping and all(worker.is_alive() for worker in workers):
            time.sleep(0.2)
        if not stopping:
            log.error("a worker exited; stopping the others")
            forward(signal.SIGTERM, None)
        deadline = time.monotonic() + settings.grace_period_seconds + 5
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()
        failed = any(worker.exitcode not in (0, -signal.SIGTERM) for worker in workers)
        return 1 if failed and not stopping else 0
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded Redis stopped")
        sys.stdout.flush()
