"""Service configuration: command-line flags, each with an environment variable.

Each setting is declared once, as a Settings field made by option(): its flag,
default and help, its type from the annotation. The parser, the environment
variables and --help are derived from those declarations (SETTING_OPTIONS), and
tests/unit/test_settings.py checks docs/operations.md against them. A flag wins over
its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Upper bounds of the name caps: the answers that list an organization's metrics
# and document types are sized for them (tests/grpc/test_answer_sizes.py).
MAX_UNPLANNED_METRICS = 32
MAX_DOCUMENT_TYPES = 200

_T = TypeVar("_T")


def split_host_port(address: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets); ValueError names what is wrong.

    An empty host means all interfaces, as gRPC and http.server read it.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{address!r} is not host:port (for example 127.0.0.1:50051)")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{address!r}: port must be between 0 and 65535")
    return host.strip("[]") or "0.0.0.0", port


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """The --sentinels list as (host, port) pairs."""
    return [split_host_port(address.strip()) for address in settings.sentinels.split(",")]


# The query parameters --sentinel-url takes: redis-py's own TLS options.
SENTINEL_URL_PARAMETERS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_CERT_REQS = ("none", "optional", "required")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_SENTINEL_URL_EXAMPLE = (
    "e.g. redis://user:password@ or rediss://user:password@?ssl_ca_certs=/path/ca.pem"
)


def sentinel_url_options(url: str) -> dict[str, Any]:
    """Connection options for the sentinels themselves, from --sentinel-url.

    The URL carries only a username, a password and TLS: `redis://user:password@`
    or `rediss://user:password@?ssl_ca_certs=...` (redis-py's TLS parameters).
    It names no host, port or database, since --sentinels lists the sentinels
    and sentinels have no databases. An empty URL means no credentials, no TLS.
    A ValueError never quotes the URL: it may hold the password.
    """
    if not url:
        return {}
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        query = parse_qs(parts.query, keep_blank_values=True)
    except ValueError:
        raise ValueError(f"--sentinel-url is not a URL: {_SENTINEL_URL_EXAMPLE}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"--sentinel-url must start with redis:// or rediss:// (TLS): {_SENTINEL_URL_EXAMPLE}"
        )
    if host or port is not None:
        raise ValueError(
            "--sentinel-url names no host or port (the sentinels are --sentinels), only "
            f"their credentials and TLS: {_SENTINEL_URL_EXAMPLE}"
        )
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(
            "--sentinel-url takes no database or other path (sentinels have no databases): "
            + _SENTINEL_URL_EXAMPLE
        )
    options: dict[str, Any] = {}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    for name, values in query.items():
        if name not in SENTINEL_URL_PARAMETERS or len(values) != 1:
            # The name is not quoted either: a mistyped URL may carry a secret there.
            raise ValueError(
                "--sentinel-url takes each of these query parameters at most once and no "
                f"others: {', '.join(SENTINEL_URL_PARAMETERS)}"
            )
        options[name] = values[0]
    if parts.scheme == "redis":
        if query:
            raise ValueError("--sentinel-url: TLS parameters (ssl_...) need the rediss:// scheme")
        return options
    options["ssl"] = True
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ValueError("--sentinel-url: ssl_keyfile needs ssl_certfile (the client certificate)")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in options and not options[name]:
            raise ValueError(f"--sentinel-url: {name} needs a file name")
    if "ssl_cert_reqs" in options and options["ssl_cert_reqs"] not in _CERT_REQS:
        raise ValueError(f"--sentinel-url: ssl_cert_reqs is one of {', '.join(_CERT_REQS)}")
    if "ssl_check_hostname" in options:
        check = _BOOLEANS.get(options["ssl_check_hostname"].lower())
        if check is None:
            raise ValueError("--sentinel-url: ssl_check_hostname is true or false")
        options["ssl_check_hostname"] = check
    if options.get("ssl_cert_reqs") == "none":
        # No certificate is checked, so no name can be: say so rather than fail to connect.
        if options.get("ssl_check_hostname"):
            raise ValueError(
                "--sentinel-url: ssl_check_hostname=true needs a checked certificate "
                "(ssl_cert_reqs optional or required)"
            )
        options["ssl_check_hostname"] = False
    return options


# Where option() keeps a setting's flag and help in its dataclass field.
_DECLARATION = "pagemeter.option"


def option(flag: str, default: _T, help: str, *, secret: bool = False) -> _T:
    """Declare one setting: its flag, default and help; its type is the field's annotation.

    The environment variable follows from the flag (--hold-ttl: PAGEMETER_HOLD_TTL).
    A secret (it may hold a password) is kept out of repr(), which a traceback or a
    debug log could show.
    """
    return dataclasses.field(
        default=default, repr=not secret, metadata={_DECLARATION: (flag, help)}
    )


def cors_origin_problem(origin: str) -> str:
    """Why `origin` is not a CORS origin ('' when it is one, or empty, or *)."""
    if origin in ("", "*"):
        return ""
    scheme, sep, rest = origin.partition("://")
    if scheme not in ("http", "https") or not sep or not rest:
        return (
            f"{origin!r} is not an origin: write scheme://host[:port], e.g. https://app.example.com"
        )
    if "/" in rest or "?" in rest or "#" in rest:
        return f"{origin!r} has a path; an origin is only scheme://host[:port]"
    return ""


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know at start-up."""

    listen: str = option("--listen", "127.0.0.1:50051", "gRPC host:port")
    metrics_listen: str = option(
        "--metrics-listen", "127.0.0.1:9464", "Prometheus host:port; empty disables the exporter"
    )
    http_listen: str = option(
        "--http-listen",
        "127.0.0.1:8080",
        "HTTP/JSON API host:port (docs/http.md); empty turns it off",
    )
    http_cors_origins: str = option(
        "--http-cors-origins",
        "",
        "origins (comma-separated, or *) whose browser pages may call the HTTP/JSON API; "
        "empty: CORS off",
    )
    # Empty: start the embedded Redis server in data_dir.
    # It may carry the primary's password: kept out of repr(), as sentinel_url.
    redis_url: str = option(
        "--redis-url",
        "",
        "redis:// or rediss:// URL; empty starts the embedded Redis server (sentinel mode: "
        "only its credentials, database and scheme are used)",
        secret=True,
    )
    # "single" (one Redis, --redis-url), "cluster" (Redis Cluster; --redis-url
    # names any node: the client discovers the others and follows redirections)
    # or "sentinel" (the primary that the sentinels name, followed on failover).
    redis_mode: str = option(
        "--redis-mode",
        "single",
        "single; cluster (Redis Cluster; --redis-url names any node); or sentinel",
    )
    # Sentinel mode: the monitored primary's name and the sentinels' host:port list.
    sentinel_master: str = option(
        "--sentinel-master",
        "pagemeter",
        "sentinel mode: the name the sentinels monitor the primary under",
    )
    sentinels: str = option(
        "--sentinels", "", "sentinel mode: the sentinels, host:port separated by commas"
    )
    # Sentinel mode: the sentinels' own username, password and TLS, as a URL
    # without host (`rediss://user:password@?ssl_ca_certs=...`). Kept out of
    # repr: it may hold a password.
    sentinel_url: str = option(
        "--sentinel-url",
        "",
        "sentinel mode: the sentinels' own credentials and TLS, redis://user:password@ or "
        "rediss://user:password@?ssl_ca_certs=FILE (no host: --sentinels lists them); "
        "better as the variable, out of the process list",
        secret=True,
    )
    data_dir: str = option("--data-dir", ".pagemeter/data", "embedded Redis data directory")
    default_timezone: str = option(
        "--default-timezone", "UTC", "IANA timezone for plans that name none"
    )
    hold_ttl_seconds: float = option("--hold-ttl", 900.0, "default hold TTL, seconds")
    max_hold_ttl_seconds: float = option(
        "--max-hold-ttl", 86400.0, "longest hold TTL a caller may ask for, seconds"
    )
    # How long a request_id is remembered for idempotency (and its record kept).
    record_retention_days: int = option(
        "--record-retention-days", 40, "days a request_id is remembered"
    )
    # How long monthly counters are kept after their month ends.
    usage_retention_days: int = option(
        "--usage-retention-days", 400, "days monthly counters are kept after their month"
    )
    # RecordUsage refuses completed_at older than this (it must stay below
    # record_retention_days so that every accepted late retry is still deduplicated).
    max_record_age_days: int = option(
        "--max-record-age-days", 35, "oldest completed_at RecordUsage accepts, days"
    )
    # Most usage records one organization's records index lists (oldest leave
    # first); bounds its memory whatever its traffic.
    max_records_per_org: int = option(
        "--max-records-per-org", 100_000, "most usage records listed per organization"
    )
    # Metrics not in its plan an organization may record within the usage
    # retention (work done is never dropped, but every name costs a counter
    # field and an answer row); RecordUsage refuses a new one past this.
    max_unplanned_metrics: int = option(
        "--max-unplanned-metrics",
        16,
        "metrics not in its plan one organization may record (0: none)",
    )
    # Document types an organization's statistics tell apart within the usage
    # retention; later ones are counted as "_other" (the record keeps its own).
    max_document_types: int = option(
        "--max-document-types",
        100,
        "document types one organization's statistics tell apart; later ones count as _other",
    )
    allow_volatile_store: bool = option(
        "--allow-volatile-store",
        False,
        "serve on a Redis without an append-only file (records are lost at its restart)",
    )
    redis_timeout_seconds: float = option(
        "--redis-timeout", 2.0, "timeout of each Redis call, seconds"
    )
    # Connections to Redis this process keeps at most (per node in a cluster); a
    # call that finds all of them busy waits up to --redis-timeout for one.
    redis_max_connections: int = option(
        "--redis-max-connections",
        100,
        "Redis connections per process (per node in a cluster); more calls wait for one",
    )
    # Replicas that must have a change before it is acknowledged (Redis WAIT
    # after each changing script; 0: acknowledge what the primary has), and how
    # long to wait for them before answering UNAVAILABLE.
    replica_acks: int = option(
        "--replica-acks",
        0,
        "replicas that must have a change before it is acknowledged (Redis WAIT); 0: off",
    )
    replica_ack_timeout_seconds: float = option(
        "--replica-ack-timeout",
        0.5,
        "seconds to wait for --replica-acks replicas before answering UNAVAILABLE",
    )
    grace_period_seconds: float = option(
        "--grace-period", 10.0, "seconds in-flight calls may finish after SIGTERM"
    )
    log_level: str = option("--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR")
    # Credentials: files of "name=token" lines (tokens may also come from the
    # PAGEMETER_ADMIN_TOKENS / PAGEMETER_SERVICE_TOKENS variables; never flags,
    # which other users of the machine could read).
    admin_tokens_file: str = option(
        "--admin-tokens-file", "", "file of admin tokens, one 'name=token' a line"
    )
    service_tokens_file: str = option(
        "--service-tokens-file", "", "file of service tokens, one 'name=token' a line"
    )
    dev_open_access: bool = option(
        "--dev-open-access",
        False,
        "serve callers without credentials as admins; loopback only, for development",
    )
    read_rate_limit: float = option(
        "--read-rate-limit", 20.0, "reads per second per tenant API key (0: no limit)"
    )
    read_burst: int = option("--read-burst", 40, "burst of reads per tenant API key")
    # TLS for the gRPC port; with a client CA, callers must present a
    # certificate it signed (mutual TLS).
    tls_cert_file: str = option("--tls-cert", "", "server certificate chain (PEM)")
    tls_key_file: str = option("--tls-key", "", "server private key (PEM)")
    tls_client_ca_file: str = option(
        "--tls-client-ca", "", "CA (PEM) that client certificates must be signed by: mutual TLS"
    )
    # Audit trail entries kept per organization (about).
    audit_max_events: int = option(
        "--audit-max-events", 10_000, "audit trail entries kept per organization"
    )
    # The event stream of each organization (docs/events.md): entries kept
    # (about; 0 turns events off) and days kept.
    max_events_per_org: int = option(
        "--max-events-per-org",
        100_000,
        "events kept per organization, about (0: write no events)",
    )
    event_retention_days: int = option(
        "--event-retention-days", 7, "days an organization's events are kept"
    )
    # Seconds between sweeps of the notification thresholds (ops/alert_sweep.py):
    # what changes with time alone (a period ended, a grant near its expiry).
    alert_sweep_seconds: float = option(
        "--alert-sweep-interval",
        300.0,
        "seconds between sweeps of the notification thresholds (0: none)",
    )
    # Webhook delivery (docs/webhooks.md): the dispatchers' settings. A server
    # runs one dispatcher itself with --webhook-dispatch (make run); in production
    # run `pagemeter-server dispatch` processes, as many as needed.
    webhook_dispatch: bool = option(
        "--webhook-dispatch", False, "also deliver webhooks from this server process"
    )
    webhook_retry_hours: float = option(
        "--webhook-retry-hours", 24.0, "hours an event is retried before it is dead-lettered"
    )
    webhook_backoff_seconds: float = option(
        "--webhook-backoff-seconds", 1.0, "delay before the first retry (doubling, with jitter)"
    )
    webhook_backoff_max_seconds: float = option(
        "--webhook-backoff-max-seconds", 600.0, "longest delay between two attempts"
    )
    webhook_timeout_seconds: float = option(
        "--webhook-timeout", 10.0, "seconds a receiver has to answer one delivery"
    )
    webhook_lease_seconds: float = option(
        "--webhook-lease-seconds",
        30.0,
        "a dispatcher's lease of its partitions; a crashed one's work moves after this",
    )
    webhook_poll_interval_seconds: float = option(
        "--webhook-poll-interval", 0.5, "seconds between a dispatcher's looks for new events"
    )
    webhook_scan_interval_seconds: float = option(
        "--webhook-scan-interval", 300.0, "seconds between a dispatcher's SCANs for event streams"
    )
    webhook_max_in_flight: int = option(
        "--webhook-max-in-flight", 64, "deliveries one dispatcher makes at once"
    )
    webhook_secret_overlap_hours: float = option(
        "--webhook-secret-overlap-hours",
        24.0,
        "hours an old signing secret keeps signing after a rotation (unless the call says)",
    )
    log_format: str = option("--log-format", "json", "json (one object a line) or text")
    # Seconds between health probes of Redis (grpc.health.v1 follows them).
    health_interval_seconds: float = option(
        "--health-interval", 1.0, "seconds between health probes of Redis"
    )
    # CheckQuota while Redis is unreachable: "closed" (UNAVAILABLE) or "open"
    # (admit, reason FAIL_OPEN); a plan may override it.
    store_failure_policy: str = option(
        "--store-failure-policy",
        "closed",
        "CheckQuota while Redis is unreachable: closed (UNAVAILABLE) or open (admit)",
    )
    # Where time comes from: "redis" (Redis TIME, one clock for every replica)
    # or "system" (this machine's clock).
    clock: str = option("--clock", "redis", "redis (Redis TIME, shared by all replicas) or system")
    workers: int = option(
        "--workers", 1, "server processes on the one gRPC port (SO_REUSEPORT); metrics on port + i"
    )
    # The script calls of one event-loop turn leave on one connection in one
    # write (store/coalesce.py, decision 50); off: one redis-py call each.
    redis_pipelining: bool = option(
        "--redis-pipelining",
        True,
        "script calls share one pipelined Redis connection (single and Sentinel modes; "
        "each call stays atomic); --no-redis-pipelining: redis-py's pool",
    )
    # Bind the gRPC port with SO_REUSEPORT (set for the workers of --workers N;
    # also for several servers on one port under another process manager).
    reuse_port: bool = option(
        "--reuse-port",
        False,
        "bind the gRPC port with SO_REUSEPORT, so that several servers can share it",
    )
    # The per-organization usage exporter: most organizations per scrape;
    # 0 switches it off on this replica.
    org_exporter_max_orgs: int = option(
        "--org-exporter-max-orgs",
        10_000,
        "organizations per scrape of the per-org usage gauges; 0 turns them off here",
    )
    # Connection and stream limits of this process (docs/security.md): HTTP/2
    # streams per connection (advertised in SETTINGS), connections, RPCs in
    # progress (beyond: RESOURCE_EXHAUSTED), health Watch streams; idle
    # connections and connections older than the age (plus its grace) are
    # closed (0: never).
    max_concurrent_streams: int = option(
        "--max-concurrent-streams",
        100,
        "HTTP/2 streams per connection (advertised; extra streams are refused)",
    )
    max_connections: int = option(
        "--max-connections",
        1000,
        "gRPC connections this process accepts at once (extra ones are closed)",
    )
    max_concurrent_rpcs: int = option(
        "--max-concurrent-rpcs",
        1000,
        "RPCs in progress in this process; beyond, RESOURCE_EXHAUSTED",
    )
    max_health_watchers: int = option(
        "--max-health-watchers",
        100,
        "grpc.health.v1 Watch streams at once; beyond, RESOURCE_EXHAUSTED",
    )
    max_connection_idle_seconds: float = option(
        "--max-connection-idle",
        300.0,
        "seconds a connection without calls stays open (0: for ever)",
    )
    max_connection_age_seconds: float = option(
        "--max-connection-age",
        1800.0,
        "seconds before a connection is asked to close (GOAWAY; 0: never)",
    )
    max_connection_age_grace_seconds: float = option(
        "--max-connection-age-grace",
        60.0,
        "seconds calls may go on after that GOAWAY before the connection is closed",
    )

    def validate(self) -> Settings:
        """Raise ValueError with a readable message for inconsistent settings."""
        try:
            ZoneInfo(self.default_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"default timezone {self.default_timezone!r} is not an IANA timezone"
            ) from exc
        for flag, address in (
            ("--listen", self.listen),
            ("--metrics-listen", self.metrics_listen),
            ("--http-listen", self.http_listen),
        ):
            if address or flag == "--listen":
                try:
                    split_host_port(address)
                except ValueError as exc:
                    raise ValueError(f"{flag}: {exc}") from exc
        for origin in self.http_cors_origins.split(","):
            problem = cors_origin_problem(origin.strip())
            if problem:
                raise ValueError(f"--http-cors-origins: {problem}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level {self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        if not math.isfinite(self.max_hold_ttl_seconds):
            raise ValueError("the maximum hold TTL must be a finite number of seconds")
        if not 0 < self.hold_ttl_seconds <= self.max_hold_ttl_seconds:
            raise ValueError("hold TTL must be positive and at most the maximum hold TTL")
        if self.max_record_age_days >= self.record_retention_days:
            raise ValueError(
                "max record age must be shorter than record retention, or late retries "
                "could be counted twice"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if not 0 <= self.read_rate_limit < math.inf or self.read_burst < 0:
            raise ValueError("read rate limit and burst must be zero or positive")
        if self.redis_mode not in ("single", "cluster", "sentinel"):
            raise ValueError("--redis-mode: use single, cluster or sentinel")
        if self.redis_mode == "sentinel":
            if not self.sentinels:
                raise ValueError("--redis-mode sentinel needs --sentinels host:port,...")
            for address in self.sentinels.split(","):
                try:
                    split_host_port(address.strip())
                except ValueError as exc:
                    raise ValueError(f"--sentinels: {exc}") from exc
        if self.sentinel_url:
            if self.redis_mode != "sentinel":
                raise ValueError(
                    "--sentinel-url (the sentinels' credentials and TLS) needs --redis-mode "
                    "sentinel"
                )
            sentinel_url_options(self.sentinel_url)
        if self.redis_mode == "cluster" and not self.redis_url:
            raise ValueError("--redis-mode cluster needs --redis-url naming a cluster node")
        if not 1 <= self.workers <= 64:
            raise ValueError("--workers must be between 1 and 64")
        if not 1 <= self.redis_max_connections <= 10_000:
            raise ValueError("--redis-max-connections must be between 1 and 10000")
        if self.store_failure_policy not in ("closed", "open"):
            raise ValueError("--store-failure-policy: use closed or open")
        if self.clock not in ("redis", "system"):
            raise ValueError("--clock: use redis or system")
        if self.log_format not in ("json", "text"):
            raise ValueError(f"--log-format {self.log_format!r}: use json or text")
        if not 0 < self.health_interval_seconds <= 60:
            raise ValueError("the health interval must be between 0 and 60 seconds")
        if self.org_exporter_max_orgs < 0:
            raise ValueError("--org-exporter-max-orgs must be 0 (off) or more")
        if self.audit_max_events < 100:
            raise ValueError("the audit trail must keep at least 100 events")
        if not (self.max_events_per_org == 0 or 1000 <= self.max_events_per_org <= 10_000_000):
            raise ValueError("--max-events-per-org must be 0 (off) or between 1000 and 10000000")
        if not (self.alert_sweep_seconds == 0 or 10 <= self.alert_sweep_seconds <= 86_400):
            raise ValueError("--alert-sweep-interval must be 0 (none) or 10 to 86400 seconds")
        if not 2 <= self.event_retention_days <= 400:
            raise ValueError(
                "--event-retention-days must be between 2 and 400 (webhook retries last "
                "up to a day, and a replay reads what is kept)"
            )
        if not 0 < self.webhook_retry_hours < self.event_retention_days * 24:
            raise ValueError(
                "--webhook-retry-hours must be above 0 and below --event-retention-days "
                "(an event must still be kept when its last retry is made)"
            )
        if not 0 < self.webhook_backoff_seconds <= self.webhook_backoff_max_seconds <= 86_400:
            raise ValueError(
                "--webhook-backoff-seconds must be above 0 and at most "
                "--webhook-backoff-max-seconds (at most a day)"
            )
        if not 0 < self.webhook_timeout_seconds <= 300:
            raise ValueError("--webhook-timeout must be between 0 and 300 seconds")
        if not 1 <= self.webhook_lease_seconds <= 3600:
            raise ValueError("--webhook-lease-seconds must be between 1 and 3600")
        if not 0 < self.webhook_poll_interval_seconds <= 60:
            raise ValueError("--webhook-poll-interval must be between 0 and 60 seconds")
        if not 1 <= self.webhook_scan_interval_seconds <= 86_400:
            raise ValueError("--webhook-scan-interval must be between 1 and 86400 seconds")
        if not 1 <= self.webhook_max_in_flight <= 10_000:
            raise ValueError("--webhook-max-in-flight must be between 1 and 10000")
        if not 0 < self.webhook_secret_overlap_hours <= 720:
            raise ValueError("--webhook-secret-overlap-hours must be above 0 and at most 720")
        if self.max_records_per_org < 1:
            raise ValueError("max records per organization must be at least 1")
        if not 0 <= self.max_unplanned_metrics <= MAX_UNPLANNED_METRICS:
            raise ValueError(
                f"--max-unplanned-metrics must be between 0 and {MAX_UNPLANNED_METRICS}"
            )
        if not 1 <= self.max_document_types <= MAX_DOCUMENT_TYPES:
            raise ValueError(f"--max-document-types must be between 1 and {MAX_DOCUMENT_TYPES}")
        if self.usage_retention_days < 31:
            raise ValueError("usage retention must be at least 31 days")
        if not 0 < self.redis_timeout_seconds < math.inf:
            raise ValueError("Redis timeout must be positive (seconds)")
        if not 0 <= self.grace_period_seconds < math.inf:
            raise ValueError("grace period must be zero or a positive number of seconds")
        self._validate_replica_acks()
        self._validate_connection_limits()
        return self

    def _validate_replica_acks(self) -> None:
        if not 0 <= self.replica_acks <= 100:
            raise ValueError("--replica-acks must be between 0 (off) and 100 replicas")
        if not 0 < self.replica_ack_timeout_seconds < math.inf:
            raise ValueError("--replica-ack-timeout must be positive (seconds)")
        if self.replica_acks and self.replica_ack_timeout_seconds >= self.redis_timeout_seconds:
            raise ValueError(
                "--replica-ack-timeout must be below --redis-timeout "
                f"({self.redis_timeout_seconds} s), which bounds the wait on the connection"
            )

    def _validate_connection_limits(self) -> None:
        for flag, value in (
            ("--max-concurrent-streams", self.max_concurrent_streams),
            ("--max-connections", self.max_connections),
            ("--max-concurrent-rpcs", self.max_concurrent_rpcs),
            ("--max-health-watchers", self.max_health_watchers),
        ):
            if not 1 <= value <= 2**31 - 1:
                raise ValueError(f"{flag} must be at least 1")
        if self.max_health_watchers >= self.max_concurrent_rpcs:
            raise ValueError(
                "--max-health-watchers must be below --max-concurrent-rpcs, or Watch streams "
                "could take every RPC slot (health Check among them)"
            )
        for flag, seconds in (
            ("--max-connection-idle", self.max_connection_idle_seconds),
            ("--max-connection-age", self.max_connection_age_seconds),
            ("--max-connection-age-grace", self.max_connection_age_grace_seconds),
        ):
            if not 0 <= seconds <= 2**31 / 1000:
                raise ValueError(f"{flag} must be 0 (never) or a positive number of seconds")


@dataclass(frozen=True)
class SettingOption:
    """One setting as the command line and the environment see it, read from its declaration."""

    field: str
    flag: str
    value_type: type  # str, int, float or bool: the field's annotation
    default: object
    help: str

    @property
    def env(self) -> str:
        """Its environment variable: PAGEMETER_ and the flag (--hold-ttl: PAGEMETER_HOLD_TTL)."""
        return "PAGEMETER_" + self.flag.removeprefix("--").upper().replace("-", "_")

    def from_env(self, text: str) -> object:
        """The variable's value as the setting's type; ValueError if it is not one."""
        return _parse_bool(text) if self.value_type is bool else self.value_type(text)


def _declared_options(settings_class: type[Settings]) -> tuple[SettingOption, ...]:
    hints = typing.get_type_hints(settings_class)
    options = []
    for field in dataclasses.fields(settings_class):
        if _DECLARATION not in field.metadata or hints[field.name] not in (str, int, float, bool):
            raise TypeError(
                f"Settings.{field.name}: declare it with option() as str, int, float or bool"
            )
        flag, help_text = field.metadata[_DECLARATION]
        options.append(SettingOption(field.name, flag, hints[field.name], field.default, help_text))
    return tuple(options)


# Every setting, in the order of the Settings fields: the parser, the environment
# variables, --help and the check of docs/operations.md all read this.
SETTING_OPTIONS = _declared_options(Settings)

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagemeter-server",
        description="pagemeter quota enforcement service",
        epilog=(
            "pagemeter-server migrate-plans [flags] rewrites the stored plans as plan "
            "documents of schema 2, once no server of an earlier release uses the store "
            "(docs/operations.md, upgrading); pagemeter-server dispatch [flags] delivers "
            "webhooks (docs/webhooks.md)"
        ),
    )
    for option in SETTING_OPTIONS:
        help_text = f"{option.help} (env {option.env})"
        if option.value_type is bool:
            # None, not False: a switch left off must not hide its variable. A
            # switch that is on by default is turned off by --no-<flag>.
            action = argparse.BooleanOptionalAction if option.default else "store_true"
            parser.add_argument(
                option.flag, dest=option.field, action=action, default=None, help=help_text
            )
        else:
            parser.add_argument(
                option.flag, dest=option.field, type=option.value_type, help=help_text
            )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from flags and environment variables."""
    env = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for option in SETTING_OPTIONS:
        flag_value = getattr(args, option.field)
        if flag_value is not None:
            values[option.field] = flag_value
        elif option.env in env:
            try:
                values[option.field] = option.from_env(env[option.env])
            except ValueError:
                parser.error(
                    f"{option.env}={env[option.env]!r} is not a valid {option.value_type.__name__}"
                )
    try:
        return Settings(**values).validate()
    except ValueError as exc:
        parser.error(str(exc))
