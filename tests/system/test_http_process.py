"""The HTTP/JSON API of a real `pagemeter-server` process: start-up errors, SIGTERM
draining the calls in progress, SIGKILL in the middle of HTTP traffic."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pagemeter_server.ops.embedded import RedisProcess, free_port
from server_process import SERVER, ServerProcess


def call(base: str, verb: str, path: str, body: Any = None, timeout: float = 10) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=verb)
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def test_http_port_in_use_is_a_clear_start_up_error(tmp_path: Path) -> None:
    """An HTTP port already taken makes the server exit 1 with one readable line, no
    traceback, and its embedded Redis stopped."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                str(SERVER),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                "",
                "--http-listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path / "data"),
                "--dev-open-access",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")},
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "embedded Redis stopped" in result.stderr


@pytest.fixture
def served(redis_server: RedisProcess, tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A server process on the suite's Redis (flushed) with its HTTP API; its base URL."""
    redis.Redis.from_url(redis_server.url).flushall()
    http = f"127.0.0.1:{free_port()}"
    server = ServerProcess.pagemeter(
        [
            "--redis-url",
            redis_server.url,
            "--dev-open-access",
            "--http-listen",
            http,
            "--grace-period",
            "10",
            "--redis-timeout",
            "5",
        ],
        tmp_path / "server.log",
    )
    server.start()
    try:
        server.wait_until_serving()
        call(
            f"http://{http}",
            "PUT",
            "/v1/orgs/acme/plan",
            {"plan": {"name": "B", "metrics": [{"metric": "pages", "contractQuota": "100000"}]}},
        )
        yield server, f"http://{http}"
    finally:
        server.stop()


def test_sigterm_lets_an_http_call_in_progress_finish(
    served: tuple[ServerProcess, str], redis_server: RedisProcess
) -> None:
    """A record held up by a paused Redis when SIGTERM arrives is answered 200 and
    counted; a new connection after SIGTERM is refused; the process exits 0."""
    server, base = served
    client = redis.Redis.from_url(redis_server.url)
    client.client_pause(1500, all=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            call,
            base,
            "POST",
            "/v1/orgs/acme/usage:record",
            {"requestId": "in-flight", "units": {"pages": 7}},
        )
        time.sleep(0.3)  # the call has reached the server and waits on Redis
        assert server.process is not None
        server.process.terminate()
        time.sleep(0.3)
        with pytest.raises(urllib.error.URLError):
            call(base, "GET", "/v1/orgs/acme/usage", timeout=2)
        answer = pending.result(timeout=30)
    assert answer["duplicate"] is False
    assert server.stop() == 0, server.log_tail()
    server.start()
    server.wait_until_serving()
    usage = call(base, "GET", "/v1/orgs/acme/usage")
    pages = next(m for m in usage["metrics"] if m["metric"] == "pages")
    assert pages["committed"] == "7"


def test_sigkill_during_http_records_loses_or_doubles_nothing_acknowledged(
    served: tuple[ServerProcess, str],
) -> None:
    """Records sent over HTTP while the server is SIGKILLed and restarted, each retried
    with its request id until answered: every one counts exactly once."""
    server, base = served

    def record_until_answered(number: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                call(
                    base,
                    "POST",
                    "/v1/orgs/acme/usage:record",
                    {"requestId": f"job-{number}", "units": {"pages": 3}},
                    timeout=5,
                )
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline
                time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(record_until_answered, n) for n in range(200)]
        time.sleep(0.2)
        server.kill()
        server.start()
        server.wait_until_serving()
        for future in futures:
            future.result(timeout=90)
    usage = call(base, "GET", "/v1/orgs/acme/usage")
    pages = next(m for m in usage["metrics"] if m["metric"] == "pages")
    assert pages["committed"] == str(3 * 200)
