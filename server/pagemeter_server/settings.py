"""Service configuration: command-line flags, each with an environment variable.

A flag wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Upper bounds of the name caps: the answers that list an organization's metrics
# and document types are sized for them (tests/test_answer_sizes.py).
MAX_UNPLANNED_METRICS = 32
MAX_DOCUMENT_TYPES = 200


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


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know at start-up."""

    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    # Empty: start the embedded Redis server in data_dir.
    # It may carry the primary's password: kept out of repr(), as sentinel_url.
    redis_url: str = dataclasses.field(default="", repr=False)
    # "single" (one Redis, --redis-url), "cluster" (Redis Cluster; --redis-url
    # names any node: the client discovers the others and follows redirections)
    # or "sentinel" (the primary that the sentinels name, followed on failover).
    redis_mode: str = "single"
    # Sentinel mode: the monitored primary's name and the sentinels' host:port list.
    sentinel_master: str = "pagemeter"
    sentinels: str = ""
    # Sentinel mode: the sentinels' own username, password and TLS, as a URL
    # without host (`rediss://user:password@?ssl_ca_certs=...`). Kept out of
    # repr: it may hold a password.
    sentinel_url: str = dataclasses.field(default="", repr=False)
    data_dir: str = ".pagemeter/data"
    default_timezone: str = "UTC"
    hold_ttl_seconds: float = 900.0
    max_hold_ttl_seconds: float = 86400.0
    # How long a request_id is remembered for idempotency (and its record kept).
    record_retention_days: int = 40
    # How long monthly counters are kept after their month ends.
    usage_retention_days: int = 400
    # RecordUsage refuses completed_at older than this (it must stay below
    # record_retention_days so that every accepted late retry is still deduplicated).
    max_record_age_days: int = 35
    # Most usage records one organization's records index lists (oldest leave
    # first); bounds its memory whatever its traffic.
    max_records_per_org: int = 100_000
    # Metrics not in its plan an organization may record within the usage
    # retention (work done is never dropped, but every name costs a counter
    # field and an answer row); RecordUsage refuses a new one past this.
    max_unplanned_metrics: int = 16
    # Document types an organization's statistics tell apart within the usage
    # retention; later ones are counted as "_other" (the record keeps its own).
    max_document_types: int = 100
    # Start (and report SERVING) on a store without an append-only file.
    allow_volatile_store: bool = False
    redis_timeout_seconds: float = 2.0
    # Replicas that must have a change before it is acknowledged (Redis WAIT
    # after each changing script; 0: acknowledge what the primary has), and how
    # long to wait for them before answering UNAVAILABLE.
    replica_acks: int = 0
    replica_ack_timeout_seconds: float = 0.5
    grace_period_seconds: float = 10.0
    log_level: str = "INFO"
    # Credentials: files of "name=token" lines (tokens may also come from the
    # PAGEMETER_ADMIN_TOKENS / PAGEMETER_SERVICE_TOKENS variables; never flags,
    # which other users of the machine could read).
    admin_tokens_file: str = ""
    service_tokens_file: str = ""
    # Serve callers without credentials as admins (loopback addresses only).
    dev_open_access: bool = False
    # Per tenant API key: reads per second and burst (0: no limit).
    read_rate_limit: float = 20.0
    read_burst: int = 40
    # TLS for the gRPC port; with a client CA, callers must present a
    # certificate it signed (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Audit trail entries kept per organization (about).
    audit_max_events: int = 10_000
    # "json" (one object per line) or "text".
    log_format: str = "json"
    # Seconds between health probes of Redis (grpc.health.v1 follows them).
    health_interval_seconds: float = 1.0
    # CheckQuota while Redis is unreachable: "closed" (UNAVAILABLE) or "open"
    # (admit, reason FAIL_OPEN); a plan may override it.
    store_failure_policy: str = "closed"
    # Where time comes from: "redis" (Redis TIME, one clock for every replica)
    # or "system" (this machine's clock).
    clock: str = "redis"
    # Server processes on the one gRPC port (SO_REUSEPORT), sharing one Redis.
    workers: int = 1
    # Send the script calls of one event-loop turn to Redis as one pipeline.
    redis_pipelining: bool = False
    # Bind the gRPC port with SO_REUSEPORT (set for the workers of --workers N;
    # also for several servers on one port under another process manager).
    reuse_port: bool = False
    # The per-organization usage exporter: most organizations per scrape;
    # 0 switches it off on this replica.
    org_exporter_max_orgs: int = 10_000
    # Connection and stream limits of this process (docs/security.md): HTTP/2
    # streams per connection (advertised in SETTINGS), connections, RPCs in
    # progress (beyond: RESOURCE_EXHAUSTED), health Watch streams; idle
    # connections and connections older than the age (plus its grace) are
    # closed (0: never).
    max_concurrent_streams: int = 100
    max_connections: int = 1000
    max_concurrent_rpcs: int = 1000
    max_health_watchers: int = 100
    max_connection_idle_seconds: float = 300.0
    max_connection_age_seconds: float = 1800.0
    max_connection_age_grace_seconds: float = 60.0

    def validate(self) -> Settings:
        """Raise ValueError with a readable message for inconsistent settings."""
        try:
            ZoneInfo(self.default_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"default timezone {self.default_timezone!r} is not an IANA timezone"
            ) from exc
        for flag, address in (("--listen", self.listen), ("--metrics-listen", self.metrics_listen)):
            if address or flag == "--listen":
                try:
                    split_host_port(address)
                except ValueError as exc:
                    raise ValueError(f"{flag}: {exc}") from exc
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


# flag name -> (settings field, environment variable, help)
_OPTIONS: dict[str, tuple[str, str, str]] = {
    "--listen": ("listen", "PAGEMETER_LISTEN", "gRPC host:port"),
    "--metrics-listen": (
        "metrics_listen",
        "PAGEMETER_METRICS_LISTEN",
        "Prometheus host:port; empty disables the exporter",
    ),
    "--redis-url": (
        "redis_url",
        "PAGEMETER_REDIS_URL",
        "redis:// or rediss:// URL; empty starts the embedded Redis server (sentinel mode: only "
        "its credentials, database and scheme are used)",
    ),
    "--redis-mode": (
        "redis_mode",
        "PAGEMETER_REDIS_MODE",
        "single; cluster (Redis Cluster; --redis-url names any node); or sentinel",
    ),
    "--sentinel-master": (
        "sentinel_master",
        "PAGEMETER_SENTINEL_MASTER",
        "sentinel mode: the name the sentinels monitor the primary under",
    ),
    "--sentinels": (
        "sentinels",
        "PAGEMETER_SENTINELS",
        "sentinel mode: the sentinels, host:port separated by commas",
    ),
    "--sentinel-url": (
        "sentinel_url",
        "PAGEMETER_SENTINEL_URL",
        "sentinel mode: the sentinels' own credentials and TLS, redis://user:password@ or "
        "rediss://user:password@?ssl_ca_certs=FILE (no host: --sentinels lists them); "
        "better as the variable, out of the process list",
    ),
    "--data-dir": ("data_dir", "PAGEMETER_DATA_DIR", "embedded Redis data directory"),
    "--default-timezone": (
        "default_timezone",
        "PAGEMETER_DEFAULT_TIMEZONE",
        "IANA timezone for plans that name none",
    ),
    "--hold-ttl": ("hold_ttl_seconds", "PAGEMETER_HOLD_TTL", "default hold TTL, seconds"),
    "--max-hold-ttl": (
        "max_hold_ttl_seconds",
        "PAGEMETER_MAX_HOLD_TTL",
        "longest hold TTL a caller may ask for, seconds",
    ),
    "--record-retention-days": (
        "record_retention_days",
        "PAGEMETER_RECORD_RETENTION_DAYS",
        "days a request_id is remembered",
    ),
    "--usage-retention-days": (
        "usage_retention_days",
        "PAGEMETER_USAGE_RETENTION_DAYS",
        "days monthly counters are kept after their month",
    ),
    "--max-record-age-days": (
        "max_record_age_days",
        "PAGEMETER_MAX_RECORD_AGE_DAYS",
        "oldest completed_at RecordUsage accepts, days",
    ),
    "--max-records-per-org": (
        "max_records_per_org",
        "PAGEMETER_MAX_RECORDS_PER_ORG",
        "most usage records listed per organization",
    ),
    "--redis-timeout": (
        "redis_timeout_seconds",
        "PAGEMETER_REDIS_TIMEOUT",
        "timeout of each Redis call, seconds",
    ),
    "--replica-acks": (
        "replica_acks",
        "PAGEMETER_REPLICA_ACKS",
        "replicas that must have a change before it is acknowledged (Redis WAIT); 0: off",
    ),
    "--replica-ack-timeout": (
        "replica_ack_timeout_seconds",
        "PAGEMETER_REPLICA_ACK_TIMEOUT",
        "seconds to wait for --replica-acks replicas before answering UNAVAILABLE",
    ),
    "--grace-period": (
        "grace_period_seconds",
        "PAGEMETER_GRACE_PERIOD",
        "seconds in-flight calls may finish after SIGTERM",
    ),
    "--log-level": ("log_level", "PAGEMETER_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
    "--admin-tokens-file": (
        "admin_tokens_file",
        "PAGEMETER_ADMIN_TOKENS_FILE",
        "file of admin tokens, one 'name=token' a line",
    ),
    "--service-tokens-file": (
        "service_tokens_file",
        "PAGEMETER_SERVICE_TOKENS_FILE",
        "file of service tokens, one 'name=token' a line",
    ),
    "--dev-open-access": (
        "dev_open_access",
        "PAGEMETER_DEV_OPEN_ACCESS",
        "serve callers without credentials as admins; loopback only, for development",
    ),
    "--read-rate-limit": (
        "read_rate_limit",
        "PAGEMETER_READ_RATE_LIMIT",
        "reads per second per tenant API key (0: no limit)",
    ),
    "--read-burst": ("read_burst", "PAGEMETER_READ_BURST", "burst of reads per tenant API key"),
    "--tls-cert": ("tls_cert_file", "PAGEMETER_TLS_CERT", "server certificate chain (PEM)"),
    "--tls-key": ("tls_key_file", "PAGEMETER_TLS_KEY", "server private key (PEM)"),
    "--tls-client-ca": (
        "tls_client_ca_file",
        "PAGEMETER_TLS_CLIENT_CA",
        "CA (PEM) that client certificates must be signed by: mutual TLS",
    ),
    "--workers": (
        "workers",
        "PAGEMETER_WORKERS",
        "server processes on the one gRPC port (SO_REUSEPORT); metrics on port + i",
    ),
    "--redis-pipelining": (
        "redis_pipelining",
        "PAGEMETER_REDIS_PIPELINING",
        "send concurrent script calls to Redis as one pipeline (each stays atomic)",
    ),
    "--reuse-port": (
        "reuse_port",
        "PAGEMETER_REUSE_PORT",
        "bind the gRPC port with SO_REUSEPORT, so that several servers can share it",
    ),
    "--store-failure-policy": (
        "store_failure_policy",
        "PAGEMETER_STORE_FAILURE_POLICY",
        "CheckQuota while Redis is unreachable: closed (UNAVAILABLE) or open (admit)",
    ),
    "--clock": (
        "clock",
        "PAGEMETER_CLOCK",
        "redis (Redis TIME, shared by all replicas) or system",
    ),
    "--log-format": ("log_format", "PAGEMETER_LOG_FORMAT", "json (one object a line) or text"),
    "--health-interval": (
        "health_interval_seconds",
        "PAGEMETER_HEALTH_INTERVAL",
        "seconds between health probes of Redis",
    ),
    "--org-exporter-max-orgs": (
        "org_exporter_max_orgs",
        "PAGEMETER_ORG_EXPORTER_MAX_ORGS",
        "organizations per scrape of the per-org usage gauges; 0 turns them off here",
    ),
    "--allow-volatile-store": (
        "allow_volatile_store",
        "PAGEMETER_ALLOW_VOLATILE_STORE",
        "serve on a Redis without an append-only file (records are lost at its restart)",
    ),
    "--max-unplanned-metrics": (
        "max_unplanned_metrics",
        "PAGEMETER_MAX_UNPLANNED_METRICS",
        "metrics not in its plan one organization may record (0: none)",
    ),
    "--max-document-types": (
        "max_document_types",
        "PAGEMETER_MAX_DOCUMENT_TYPES",
        "document types one organization's statistics tell apart; later ones count as _other",
    ),
    "--audit-max-events": (
        "audit_max_events",
        "PAGEMETER_AUDIT_MAX_EVENTS",
        "audit trail entries kept per organization",
    ),
    "--max-concurrent-streams": (
        "max_concurrent_streams",
        "PAGEMETER_MAX_CONCURRENT_STREAMS",
        "HTTP/2 streams per connection (advertised; extra streams are refused)",
    ),
    "--max-connections": (
        "max_connections",
        "PAGEMETER_MAX_CONNECTIONS",
        "gRPC connections this process accepts at once (extra ones are closed)",
    ),
    "--max-concurrent-rpcs": (
        "max_concurrent_rpcs",
        "PAGEMETER_MAX_CONCURRENT_RPCS",
        "RPCs in progress in this process; beyond, RESOURCE_EXHAUSTED",
    ),
    "--max-health-watchers": (
        "max_health_watchers",
        "PAGEMETER_MAX_HEALTH_WATCHERS",
        "grpc.health.v1 Watch streams at once; beyond, RESOURCE_EXHAUSTED",
    ),
    "--max-connection-idle": (
        "max_connection_idle_seconds",
        "PAGEMETER_MAX_CONNECTION_IDLE",
        "seconds a connection without calls stays open (0: for ever)",
    ),
    "--max-connection-age": (
        "max_connection_age_seconds",
        "PAGEMETER_MAX_CONNECTION_AGE",
        "seconds before a connection is asked to close (GOAWAY; 0: never)",
    ),
    "--max-connection-age-grace": (
        "max_connection_age_grace_seconds",
        "PAGEMETER_MAX_CONNECTION_AGE_GRACE",
        "seconds calls may go on after that GOAWAY before the connection is closed",
    ),
}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(text)


def _field_types() -> dict[str, type]:
    defaults = Settings()
    return {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(Settings)}


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from flags and environment variables."""
    env = os.environ if environ is None else environ
    types = _field_types()
    parser = argparse.ArgumentParser(
        prog="pagemeter-server", description="pagemeter quota enforcement service"
    )
    for flag, (field, var, help_text) in _OPTIONS.items():
        if types[field] is bool:
            parser.add_argument(
                flag, dest=field, action="store_true", default=None, help=f"{help_text} (env {var})"
            )
        else:
            parser.add_argument(
                flag, dest=field, type=types[field], help=f"{help_text} (env {var})"
            )
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for field, var, _ in _OPTIONS.values():
        flag_value = getattr(args, field)
        if flag_value is not None:
            values[field] = flag_value
        elif var in env:
            convert = _parse_bool if types[field] is bool else types[field]
            try:
                values[field] = convert(env[var])
            except ValueError:
                parser.error(f"{var}={env[var]!r} is not a valid {types[field].__name__}")
    try:
        return Settings(**values).validate()  # type: ignore[arg-type]
    except ValueError as exc:
        parser.error(str(exc))
