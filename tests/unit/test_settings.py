"""Service configuration: defaults, environment variables, flags and readable errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import NamedTuple

import pytest

from pagemeter_server import settings as settings_module
from pagemeter_server.settings import (
    SETTING_OPTIONS,
    SettingOption,
    Settings,
    parse_settings,
    sentinel_url_options,
)


class Option(NamedTuple):
    flag: str
    env: str
    field: str
    # Two valid values (as typed on a command line) and what each parses to.
    first: str
    first_parsed: object
    second: str
    second_parsed: object


# The public face of the configuration: every flag and its environment variable.
OPTIONS = [
    Option(
        "--listen",
        "PAGEMETER_LISTEN",
        "listen",
        "0.0.0.0:7000",
        "0.0.0.0:7000",
        "[::1]:7001",
        "[::1]:7001",
    ),
    Option(
        "--metrics-listen",
        "PAGEMETER_METRICS_LISTEN",
        "metrics_listen",
        "127.0.0.1:9100",
        "127.0.0.1:9100",
        "",
        "",
    ),
    Option(
        "--http-listen",
        "PAGEMETER_HTTP_LISTEN",
        "http_listen",
        "0.0.0.0:8081",
        "0.0.0.0:8081",
        "",
        "",
    ),
    Option(
        "--http-cors-origins",
        "PAGEMETER_HTTP_CORS_ORIGINS",
        "http_cors_origins",
        "https://app.example.com",
        "https://app.example.com",
        "*",
        "*",
    ),
    Option(
        "--redis-url",
        "PAGEMETER_REDIS_URL",
        "redis_url",
        "redis://redis.internal:6380/1",
        "redis://redis.internal:6380/1",
        "rediss://user:pw@cache:6390/0",
        "rediss://user:pw@cache:6390/0",
    ),
    Option(
        "--data-dir", "PAGEMETER_DATA_DIR", "data_dir", "/var/lib/pm", "/var/lib/pm", "d2", "d2"
    ),
    Option(
        "--default-timezone",
        "PAGEMETER_DEFAULT_TIMEZONE",
        "default_timezone",
        "Europe/Berlin",
        "Europe/Berlin",
        "America/New_York",
        "America/New_York",
    ),
    Option("--hold-ttl", "PAGEMETER_HOLD_TTL", "hold_ttl_seconds", "60", 60.0, "2.5", 2.5),
    Option(
        "--max-hold-ttl",
        "PAGEMETER_MAX_HOLD_TTL",
        "max_hold_ttl_seconds",
        "3600",
        3600.0,
        "1e5",
        1e5,
    ),
    Option(
        "--record-retention-days",
        "PAGEMETER_RECORD_RETENTION_DAYS",
        "record_retention_days",
        "60",
        60,
        "90",
        90,
    ),
    Option(
        "--usage-retention-days",
        "PAGEMETER_USAGE_RETENTION_DAYS",
        "usage_retention_days",
        "31",
        31,
        "800",
        800,
    ),
    Option(
        "--max-record-age-days",
        "PAGEMETER_MAX_RECORD_AGE_DAYS",
        "max_record_age_days",
        "7",
        7,
        "0",
        0,
    ),
    Option(
        "--max-records-per-org",
        "PAGEMETER_MAX_RECORDS_PER_ORG",
        "max_records_per_org",
        "500",
        500,
        "20",
        20,
    ),
    Option(
        "--redis-timeout", "PAGEMETER_REDIS_TIMEOUT", "redis_timeout_seconds", "0.5", 0.5, "5", 5.0
    ),
    Option(
        "--redis-max-connections",
        "PAGEMETER_REDIS_MAX_CONNECTIONS",
        "redis_max_connections",
        "50",
        50,
        "300",
        300,
    ),
    Option("--replica-acks", "PAGEMETER_REPLICA_ACKS", "replica_acks", "1", 1, "2", 2),
    Option(
        "--replica-ack-timeout",
        "PAGEMETER_REPLICA_ACK_TIMEOUT",
        "replica_ack_timeout_seconds",
        "0.25",
        0.25,
        "1.5",
        1.5,
    ),
    Option("--grace-period", "PAGEMETER_GRACE_PERIOD", "grace_period_seconds", "3", 3.0, "0", 0.0),
    Option(
        "--log-level", "PAGEMETER_LOG_LEVEL", "log_level", "DEBUG", "DEBUG", "warning", "warning"
    ),
]

OPTIONS += [
    Option(
        "--admin-tokens-file",
        "PAGEMETER_ADMIN_TOKENS_FILE",
        "admin_tokens_file",
        "/etc/pm/admin",
        "/etc/pm/admin",
        "a2",
        "a2",
    ),
    Option(
        "--service-tokens-file",
        "PAGEMETER_SERVICE_TOKENS_FILE",
        "service_tokens_file",
        "/etc/pm/service",
        "/etc/pm/service",
        "s2",
        "s2",
    ),
    Option("--read-rate-limit", "PAGEMETER_READ_RATE_LIMIT", "read_rate_limit", "5", 5.0, "0", 0.0),
    Option("--read-burst", "PAGEMETER_READ_BURST", "read_burst", "3", 3, "0", 0),
    Option("--log-format", "PAGEMETER_LOG_FORMAT", "log_format", "text", "text", "json", "json"),
    Option(
        "--store-failure-policy",
        "PAGEMETER_STORE_FAILURE_POLICY",
        "store_failure_policy",
        "open",
        "open",
        "closed",
        "closed",
    ),
    Option("--clock", "PAGEMETER_CLOCK", "clock", "system", "system", "redis", "redis"),
    Option("--workers", "PAGEMETER_WORKERS", "workers", "4", 4, "1", 1),
    Option(
        "--sentinel-master",
        "PAGEMETER_SENTINEL_MASTER",
        "sentinel_master",
        "billing",
        "billing",
        "pm2",
        "pm2",
    ),
    Option(
        "--health-interval",
        "PAGEMETER_HEALTH_INTERVAL",
        "health_interval_seconds",
        "0.5",
        0.5,
        "5",
        5.0,
    ),
    Option(
        "--org-exporter-max-orgs",
        "PAGEMETER_ORG_EXPORTER_MAX_ORGS",
        "org_exporter_max_orgs",
        "0",
        0,
        "50",
        50,
    ),
    Option(
        "--audit-max-events",
        "PAGEMETER_AUDIT_MAX_EVENTS",
        "audit_max_events",
        "500",
        500,
        "100",
        100,
    ),
    Option(
        "--max-events-per-org",
        "PAGEMETER_MAX_EVENTS_PER_ORG",
        "max_events_per_org",
        "5000",
        5000,
        "0",
        0,
    ),
    Option(
        "--alert-sweep-interval",
        "PAGEMETER_ALERT_SWEEP_INTERVAL",
        "alert_sweep_seconds",
        "60",
        60.0,
        "0",
        0.0,
    ),
    Option(
        "--event-retention-days",
        "PAGEMETER_EVENT_RETENTION_DAYS",
        "event_retention_days",
        "30",
        30,
        "2",
        2,
    ),
    Option(
        "--webhook-retry-hours",
        "PAGEMETER_WEBHOOK_RETRY_HOURS",
        "webhook_retry_hours",
        "2",
        2.0,
        "48",
        48.0,
    ),
    Option(
        "--webhook-backoff-seconds",
        "PAGEMETER_WEBHOOK_BACKOFF_SECONDS",
        "webhook_backoff_seconds",
        "2",
        2.0,
        "0.1",
        0.1,
    ),
    Option(
        "--webhook-backoff-max-seconds",
        "PAGEMETER_WEBHOOK_BACKOFF_MAX_SECONDS",
        "webhook_backoff_max_seconds",
        "30",
        30.0,
        "1200",
        1200.0,
    ),
    Option(
        "--webhook-timeout",
        "PAGEMETER_WEBHOOK_TIMEOUT",
        "webhook_timeout_seconds",
        "5",
        5.0,
        "30",
        30.0,
    ),
    Option(
        "--webhook-lease-seconds",
        "PAGEMETER_WEBHOOK_LEASE_SECONDS",
        "webhook_lease_seconds",
        "10",
        10.0,
        "60",
        60.0,
    ),
    Option(
        "--webhook-poll-interval",
        "PAGEMETER_WEBHOOK_POLL_INTERVAL",
        "webhook_poll_interval_seconds",
        "1",
        1.0,
        "0.2",
        0.2,
    ),
    Option(
        "--webhook-scan-interval",
        "PAGEMETER_WEBHOOK_SCAN_INTERVAL",
        "webhook_scan_interval_seconds",
        "60",
        60.0,
        "600",
        600.0,
    ),
    Option(
        "--webhook-max-in-flight",
        "PAGEMETER_WEBHOOK_MAX_IN_FLIGHT",
        "webhook_max_in_flight",
        "8",
        8,
        "128",
        128,
    ),
    Option(
        "--webhook-secret-overlap-hours",
        "PAGEMETER_WEBHOOK_SECRET_OVERLAP_HOURS",
        "webhook_secret_overlap_hours",
        "1",
        1.0,
        "48",
        48.0,
    ),
    Option(
        "--max-unplanned-metrics",
        "PAGEMETER_MAX_UNPLANNED_METRICS",
        "max_unplanned_metrics",
        "4",
        4,
        "0",
        0,
    ),
    Option(
        "--max-document-types",
        "PAGEMETER_MAX_DOCUMENT_TYPES",
        "max_document_types",
        "200",
        200,
        "7",
        7,
    ),
    Option(
        "--max-concurrent-streams",
        "PAGEMETER_MAX_CONCURRENT_STREAMS",
        "max_concurrent_streams",
        "50",
        50,
        "1",
        1,
    ),
    Option(
        "--max-connections", "PAGEMETER_MAX_CONNECTIONS", "max_connections", "5", 5, "9000", 9000
    ),
    Option(
        "--max-concurrent-rpcs",
        "PAGEMETER_MAX_CONCURRENT_RPCS",
        "max_concurrent_rpcs",
        "500",
        500,
        "4000",
        4000,
    ),
    Option(
        "--max-health-watchers",
        "PAGEMETER_MAX_HEALTH_WATCHERS",
        "max_health_watchers",
        "1",
        1,
        "250",
        250,
    ),
    Option(
        "--max-connection-idle",
        "PAGEMETER_MAX_CONNECTION_IDLE",
        "max_connection_idle_seconds",
        "0",
        0.0,
        "12.5",
        12.5,
    ),
    Option(
        "--max-connection-age",
        "PAGEMETER_MAX_CONNECTION_AGE",
        "max_connection_age_seconds",
        "0",
        0.0,
        "3600",
        3600.0,
    ),
    Option(
        "--max-connection-age-grace",
        "PAGEMETER_MAX_CONNECTION_AGE_GRACE",
        "max_connection_age_grace_seconds",
        "0",
        0.0,
        "5",
        5.0,
    ),
]

# Options that cannot stand alone in the generic tests: a switch without a value,
# and the TLS files, which only make sense together (tested below).
SPECIAL = {
    "--dev-open-access": ("dev_open_access", "PAGEMETER_DEV_OPEN_ACCESS"),
    "--reuse-port": ("reuse_port", "PAGEMETER_REUSE_PORT"),
    "--allow-volatile-store": ("allow_volatile_store", "PAGEMETER_ALLOW_VOLATILE_STORE"),
    "--redis-pipelining": ("redis_pipelining", "PAGEMETER_REDIS_PIPELINING"),
    "--webhook-dispatch": ("webhook_dispatch", "PAGEMETER_WEBHOOK_DISPATCH"),
    "--tls-cert": ("tls_cert_file", "PAGEMETER_TLS_CERT"),
    # cluster mode needs a --redis-url: tested with one below
    "--redis-mode": ("redis_mode", "PAGEMETER_REDIS_MODE"),
    "--sentinels": ("sentinels", "PAGEMETER_SENTINELS"),
    # only in sentinel mode: tested below
    "--sentinel-url": ("sentinel_url", "PAGEMETER_SENTINEL_URL"),
    "--tls-key": ("tls_key_file", "PAGEMETER_TLS_KEY"),
    "--tls-client-ca": ("tls_client_ca_file", "PAGEMETER_TLS_CLIENT_CA"),
}

BY_FLAG = pytest.mark.parametrize("option", OPTIONS, ids=[o.flag for o in OPTIONS])


def parse_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]
) -> str:
    """Parse, expect argparse's usage error (exit code 2), and return its message."""
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, environ)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pagemeter-server"), err
    assert "Traceback" not in err
    return err


# -- defaults and precedence -------------------------------------------------------------


def test_defaults_without_flags_or_environment() -> None:
    """With no flags and no variables: gRPC 127.0.0.1:50051, metrics 127.0.0.1:9464, embedded Redis."""
    parsed = parse_settings([], {})
    assert parsed == Settings()
    assert parsed.listen == "127.0.0.1:50051"
    assert parsed.metrics_listen == "127.0.0.1:9464"
    assert parsed.redis_url == ""
    assert parsed.default_timezone == "UTC"
    assert parsed.max_record_age_days < parsed.record_retention_days


def test_unrelated_environment_is_ignored() -> None:
    """Variables outside the PAGEMETER_* options (or with a near-miss name) change nothing."""
    environ = {
        "REDIS_URL": "redis://elsewhere:1/0",
        "PAGEMETER_LISTENING": "0.0.0.0:1",
        "PORT": "80",
    }
    assert parse_settings([], environ) == Settings()


def test_process_environment_is_read_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """parse_settings reads os.environ when no mapping is passed."""
    monkeypatch.setenv("PAGEMETER_LISTEN", "127.0.0.1:7777")
    assert parse_settings([]).listen == "127.0.0.1:7777"


def test_table_covers_every_option_and_setting() -> None:
    """The table of this module names every declared flag, its variable, and every Settings field."""
    declared = {option.flag: (option.field, option.env) for option in SETTING_OPTIONS}
    assert declared == {o.flag: (o.field, o.env) for o in OPTIONS} | SPECIAL
    assert {o.field for o in OPTIONS} | {field for field, _ in SPECIAL.values()} == {
        f.name for f in dataclasses.fields(Settings)
    }


def test_declarations_give_each_field_its_type_and_default() -> None:
    """Each setting's declaration carries the field's annotated type and its default; the secrets stay out of repr."""
    defaults = Settings()
    for option in SETTING_OPTIONS:
        assert type(getattr(defaults, option.field)) is option.value_type, option.flag
        assert getattr(defaults, option.field) == option.default, option.flag
        assert option.help, option.flag
    hidden = {f.name for f in dataclasses.fields(Settings) if not f.repr}
    assert hidden == {"redis_url", "sentinel_url"}


def test_a_field_without_a_declaration_is_refused() -> None:
    """A Settings field not declared with option() (so without a flag and a variable) fails at import, not silently."""

    @dataclasses.dataclass(frozen=True)
    class Undeclared(Settings):
        extra: int = 3

    with pytest.raises(TypeError, match=r"Settings\.extra: declare it with option"):
        settings_module._declared_options(Undeclared)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, False),
        (["--dev-open-access"], {}, True),
        ([], {"PAGEMETER_DEV_OPEN_ACCESS": "1"}, True),
        ([], {"PAGEMETER_DEV_OPEN_ACCESS": "yes"}, True),
        ([], {"PAGEMETER_DEV_OPEN_ACCESS": "false"}, False),
        ([], {"PAGEMETER_DEV_OPEN_ACCESS": "0"}, False),
    ],
)
def test_dev_open_access_switch(argv: list[str], environ: dict[str, str], expected: bool) -> None:
    """--dev-open-access is a switch; its variable reads 1/true/yes as on and 0/false/no as off."""
    assert parse_settings(argv, environ).dev_open_access is expected


def test_dev_open_access_variable_must_be_a_boolean(capsys: pytest.CaptureFixture[str]) -> None:
    """PAGEMETER_DEV_OPEN_ACCESS=maybe is refused, not read as on."""
    err = parse_error(capsys, [], {"PAGEMETER_DEV_OPEN_ACCESS": "maybe"})
    assert "PAGEMETER_DEV_OPEN_ACCESS='maybe'" in err


def test_tls_files_by_flag_and_environment() -> None:
    """--tls-cert, --tls-key and --tls-client-ca (and their variables) set the TLS files."""
    parsed = parse_settings(
        ["--tls-cert", "c.pem", "--tls-key", "k.pem"], {"PAGEMETER_TLS_CLIENT_CA": "ca.pem"}
    )
    assert (parsed.tls_cert_file, parsed.tls_key_file, parsed.tls_client_ca_file) == (
        "c.pem",
        "k.pem",
        "ca.pem",
    )


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
    ],
)
def test_incomplete_tls_settings_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str
) -> None:
    """A certificate without its key (or the reverse), or a client CA without a server certificate, is refused at start-up."""
    assert mentions in parse_error(capsys, argv, {})


@BY_FLAG
def test_variable_name_follows_flag(option: Option) -> None:
    """Each flag --some-name has the environment variable PAGEMETER_SOME_NAME."""
    assert option.env == "PAGEMETER_" + option.flag.removeprefix("--").upper().replace("-", "_")


@BY_FLAG
def test_environment_variable_overrides_default(option: Option) -> None:
    """Each option's environment variable replaces the default and touches no other setting."""
    parsed = parse_settings([], {option.env: option.first})
    assert getattr(parsed, option.field) == option.first_parsed
    assert getattr(Settings(), option.field) != option.first_parsed
    assert dataclasses.replace(parsed, **{option.field: getattr(Settings(), option.field)}) == (
        Settings()
    )


@BY_FLAG
def test_flag_overrides_default(option: Option) -> None:
    """Each option's flag replaces the default (both --flag value and --flag=value forms)."""
    assert getattr(parse_settings([option.flag, option.first], {}), option.field) == (
        option.first_parsed
    )
    assert getattr(parse_settings([f"{option.flag}={option.second}"], {}), option.field) == (
        option.second_parsed
    )


@BY_FLAG
def test_flag_overrides_environment_variable(option: Option) -> None:
    """When both are given, the flag wins over the environment variable, even an empty flag value."""
    parsed = parse_settings([f"{option.flag}={option.second}"], {option.env: option.first})
    assert getattr(parsed, option.field) == option.second_parsed


def test_empty_metrics_listen_disables_exporter_from_environment() -> None:
    """PAGEMETER_METRICS_LISTEN set to the empty string turns the exporter off (it is not the default)."""
    assert parse_settings([], {"PAGEMETER_METRICS_LISTEN": ""}).metrics_listen == ""


def test_help_names_every_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists every flag with its environment variable."""
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--help"], {})
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    for option in SETTING_OPTIONS:
        assert option.flag in out and f"env {option.env}" in out, option.flag
        assert " ".join(option.help.split()) in out, option.flag


# -- readable errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "mentions"),
    [
        (
            [],
            {"PAGEMETER_DEFAULT_TIMEZONE": "Mars/Olympus"},
            "'Mars/Olympus' is not an IANA timezone",
        ),
        (["--default-timezone", "Mars/Olympus"], {}, "'Mars/Olympus' is not an IANA timezone"),
        ([], {"PAGEMETER_DEFAULT_TIMEZONE": "../../etc/passwd"}, "is not an IANA timezone"),
        ([], {"PAGEMETER_DEFAULT_TIMEZONE": ""}, "is not an IANA timezone"),
        ([], {"PAGEMETER_HOLD_TTL": "abc"}, "PAGEMETER_HOLD_TTL='abc' is not a valid float"),
        (["--hold-ttl", "abc"], {}, "argument --hold-ttl: invalid float value: 'abc'"),
        ([], {"PAGEMETER_HOLD_TTL": ""}, "PAGEMETER_HOLD_TTL='' is not a valid float"),
        (
            [],
            {"PAGEMETER_RECORD_RETENTION_DAYS": "1.5"},
            "PAGEMETER_RECORD_RETENTION_DAYS='1.5' is not a valid int",
        ),
        (["--usage-retention-days", "ten"], {}, "argument --usage-retention-days: invalid int"),
        (["--hold-ttl", "0"], {}, "hold TTL must be positive"),
        ([], {"PAGEMETER_HOLD_TTL": "-5"}, "hold TTL must be positive"),
        ([], {"PAGEMETER_HOLD_TTL": "nan"}, "hold TTL must be positive"),
        (["--hold-ttl", "7200", "--max-hold-ttl", "3600"], {}, "at most the maximum hold TTL"),
        ([], {"PAGEMETER_MAX_RECORD_AGE_DAYS": "40"}, "max record age must be shorter"),
        (
            ["--max-record-age-days", "20"],
            {"PAGEMETER_RECORD_RETENTION_DAYS": "20"},
            "max record age must be shorter than record retention",
        ),
        (["--usage-retention-days", "30"], {}, "usage retention must be at least 31 days"),
        (["--redis-timeout", "0"], {}, "Redis timeout must be positive"),
        (["--redis-max-connections", "0"], {}, "--redis-max-connections must be between 1"),
        (["--replica-acks", "-1"], {}, "--replica-acks must be between 0"),
        (["--replica-acks", "101"], {}, "--replica-acks must be between 0"),
        (["--replica-ack-timeout", "0"], {}, "--replica-ack-timeout must be positive"),
        (
            ["--replica-acks", "1", "--replica-ack-timeout", "2", "--redis-timeout", "2"],
            {},
            "--replica-ack-timeout must be below --redis-timeout",
        ),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
        (["--max-unplanned-metrics", "33"], {}, "--max-unplanned-metrics must be between 0 and 32"),
        ([], {"PAGEMETER_MAX_DOCUMENT_TYPES": "0"}, "--max-document-types must be between 1"),
    ],
    ids=[
        "env-timezone",
        "flag-timezone",
        "path-timezone",
        "empty-timezone",
        "env-hold-ttl-text",
        "flag-hold-ttl-text",
        "env-hold-ttl-empty",
        "env-retention-float",
        "flag-usage-retention-text",
        "hold-ttl-zero",
        "hold-ttl-negative",
        "hold-ttl-nan",
        "hold-ttl-over-max",
        "age-over-retention",
        "age-equals-retention",
        "usage-retention-short",
        "redis-timeout-zero",
        "redis-max-connections-zero",
        "replica-acks-negative",
        "replica-acks-over-100",
        "replica-ack-timeout-zero",
        "replica-ack-timeout-not-below-redis-timeout",
        "unknown-flag",
        "unplanned-metrics-over-32",
        "document-types-zero",
    ],
)
def test_invalid_values_exit_with_readable_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], mentions: str
) -> None:
    """An invalid flag or variable exits with code 2 and an argparse message naming the value and what is wrong."""
    err = parse_error(capsys, argv, environ)
    assert "pagemeter-server: error:" in err
    assert mentions in err, err


def test_invalid_flag_value_is_reported_even_when_environment_is_valid(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad flag is an error although its environment variable holds a good value."""
    err = parse_error(
        capsys, ["--default-timezone", "Mars/Olympus"], {"PAGEMETER_DEFAULT_TIMEZONE": "UTC"}
    )
    assert "Mars/Olympus" in err


def test_valid_flag_rescues_invalid_environment_variable() -> None:
    """A good flag wins over a bad environment variable: the variable is not even parsed."""
    parsed = parse_settings(["--hold-ttl", "30"], {"PAGEMETER_HOLD_TTL": "abc"})
    assert parsed.hold_ttl_seconds == 30.0


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--log-level", "LOUD"], "--log-level"),
        (["--metrics-listen", "nonsense"], "--metrics-listen"),
        (["--metrics-listen", "127.0.0.1:99999"], "--metrics-listen"),
        (["--listen", "nonsense"], "--listen"),
    ],
    ids=["log-level", "metrics-no-port", "metrics-port-range", "listen-no-port"],
)
def test_unusable_log_level_or_address_is_an_argparse_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str
) -> None:
    """An unknown log level or a listen address without a valid port is refused at parse time, not by a start-up traceback."""
    err = parse_error(capsys, argv, {})
    assert mentions in err or argv[1] in err, err


def test_cluster_mode_needs_a_node_url(capsys: pytest.CaptureFixture[str]) -> None:
    """--redis-mode cluster takes --redis-url as one node of the cluster, and refuses to start without one."""
    parsed = parse_settings(["--redis-mode", "cluster", "--redis-url", "redis://n1:7000/0"], {})
    assert (parsed.redis_mode, parsed.redis_url) == ("cluster", "redis://n1:7000/0")
    assert "needs --redis-url" in parse_error(capsys, [], {"PAGEMETER_REDIS_MODE": "cluster"})
    assert "single, cluster or sentinel" in parse_error(capsys, ["--redis-mode", "ha"], {})


def test_sentinel_mode_needs_sentinel_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    """--redis-mode sentinel takes the sentinels as host:port,... and refuses to start without a valid list."""
    parsed = parse_settings(
        ["--redis-mode", "sentinel", "--sentinels", "10.0.0.1:26379, 10.0.0.2:26379"], {}
    )
    assert parsed.sentinels == "10.0.0.1:26379, 10.0.0.2:26379"
    assert "needs --sentinels" in parse_error(capsys, ["--redis-mode", "sentinel"], {})
    err = parse_error(capsys, ["--redis-mode", "sentinel", "--sentinels", "nohost"], {})
    assert "--sentinels" in err


SENTINEL_MODE = ["--redis-mode", "sentinel", "--sentinels", "10.0.0.1:26379"]


def test_sentinel_url_by_variable_or_flag() -> None:
    """The sentinels' credentials come from PAGEMETER_SENTINEL_URL (out of the process list) or --sentinel-url, which wins; they stay out of the settings' repr."""
    url = "rediss://pagemeter:s3cr3t@?ssl_ca_certs=/etc/pm/ca.pem"
    parsed = parse_settings(SENTINEL_MODE, {"PAGEMETER_SENTINEL_URL": url})
    assert parsed.sentinel_url == url
    assert "s3cr3t" not in repr(parsed)
    flag = parse_settings([*SENTINEL_MODE, "--sentinel-url", "redis://:other@"], {})
    assert flag.sentinel_url == "redis://:other@"
    both = parse_settings(
        [*SENTINEL_MODE, "--sentinel-url=redis://:other@"], {"PAGEMETER_SENTINEL_URL": url}
    )
    assert both.sentinel_url == "redis://:other@"
    assert parse_settings(SENTINEL_MODE, {}).sentinel_url == ""


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("", {}),
        ("redis://:s3cr3t@", {"password": "s3cr3t"}),
        ("redis://pagemeter:s3cr3t@/", {"username": "pagemeter", "password": "s3cr3t"}),
        ("redis://pagemeter:p%40ss%3Aw%2Fd@", {"username": "pagemeter", "password": "p@ss:w/d"}),
        ("rediss://", {"ssl": True}),
        (
            "rediss://:s3cr3t@?ssl_ca_certs=/etc/pm/ca.pem",
            {"password": "s3cr3t", "ssl": True, "ssl_ca_certs": "/etc/pm/ca.pem"},
        ),
        (
            "rediss://u:pw@?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/c.key"
            "&ssl_check_hostname=false",
            {
                "username": "u",
                "password": "pw",
                "ssl": True,
                "ssl_ca_certs": "/ca.pem",
                "ssl_certfile": "/c.pem",
                "ssl_keyfile": "/c.key",
                "ssl_check_hostname": False,
            },
        ),
        (
            "rediss://?ssl_cert_reqs=none",
            {"ssl": True, "ssl_cert_reqs": "none", "ssl_check_hostname": False},
        ),
    ],
    ids=[
        "empty",
        "password",
        "acl-user",
        "percent-encoded",
        "tls-system-cas",
        "tls-ca",
        "mutual-tls",
        "tls-unchecked",
    ],
)
def test_sentinel_url_options(url: str, options: dict[str, object]) -> None:
    """--sentinel-url becomes redis-py's connection options for each sentinel: username, password and redis-py's own TLS parameters."""
    assert sentinel_url_options(url) == options


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--sentinel-url", "redis://:s3cr3t@"], "--sentinel-url (the sentinels' credentials"),
        ([*SENTINEL_MODE, "--sentinel-url", "http://:s3cr3t@"], "redis:// or rediss://"),
        ([*SENTINEL_MODE, "--sentinel-url", "redis://:s3cr3t@s1"], "names no host or port"),
        ([*SENTINEL_MODE, "--sentinel-url", "redis://:s3cr3t@:26379"], "names no host or port"),
        ([*SENTINEL_MODE, "--sentinel-url", "redis://:s3cr3t@/0"], "takes no database"),
        ([*SENTINEL_MODE, "--sentinel-url", "redis://:s3cr3t@[::1"], "is not a URL"),
        (
            [*SENTINEL_MODE, "--sentinel-url", "redis://:s3cr3t@?ssl_ca_certs=/ca.pem"],
            "need the rediss:// scheme",
        ),
        (
            [*SENTINEL_MODE, "--sentinel-url", "rediss://:s3cr3t@?password=s3cr3t"],
            "takes each of these query parameters at most once and no others",
        ),
        (
            [*SENTINEL_MODE, "--sentinel-url", "rediss://:s3cr3t@?s3cr3t"],
            "takes each of these query parameters at most once and no others",
        ),
        (
            [*SENTINEL_MODE, "--sentinel-url", "rediss://:s3cr3t@?ssl_ca_certs=/a&ssl_ca_certs=/b"],
            "at most once",
        ),
        (
            [*SENTINEL_MODE, "--sentinel-url", "rediss://:s3cr3t@?ssl_keyfile=/c.key"],
            "ssl_keyfile needs ssl_certfile",
        ),
        (
            [*SENTINEL_MODE, "--sentinel-url", "rediss://:s3cr3t@?ssl_ca_certs="],
            "ssl_ca_certs needs a file name",
        ),
        (
            [*SENTINEL_MODE, "--sentinel-url", "rediss://:s3cr3t@?ssl_cert_reqs=maybe"],
            "ssl_cert_reqs is one of none, optional, required",
        ),
        (
            [*SENTINEL_MODE, "--sentinel-url", "rediss://:s3cr3t@?ssl_check_hostname=perhaps"],
            "ssl_check_hostname is true or false",
        ),
        (
            [
                *SENTINEL_MODE,
                "--sentinel-url",
                "rediss://:s3cr3t@?ssl_cert_reqs=none&ssl_check_hostname=true",
            ],
            "ssl_check_hostname=true needs a checked certificate",
        ),
    ],
    ids=[
        "not-sentinel-mode",
        "scheme",
        "host",
        "port",
        "database",
        "malformed",
        "tls-parameter-without-rediss",
        "unknown-parameter",
        "parameter-named-like-a-secret",
        "repeated-parameter",
        "key-without-certificate",
        "empty-file-name",
        "cert-reqs",
        "check-hostname",
        "unchecked-certificate-with-hostname-check",
    ],
)
def test_unusable_sentinel_url_is_refused_without_quoting_it(
    capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str
) -> None:
    """A --sentinel-url pagemeter cannot use is refused at start with what is wrong, and the message never quotes the URL (it may hold the password)."""
    err = parse_error(capsys, argv, {})
    assert mentions in err, err
    assert "s3cr3t" not in err
    env_err = parse_error(capsys, argv[:-2], {"PAGEMETER_SENTINEL_URL": argv[-1]})
    assert mentions in env_err, env_err
    assert "s3cr3t" not in env_err


def test_the_primary_password_stays_out_of_the_settings_repr() -> None:
    """--redis-url may carry the primary's password (PAGEMETER_REDIS_URL): the settings' repr, which a traceback or a debug log could show, does not."""
    parsed = parse_settings([], {"PAGEMETER_REDIS_URL": "redis://:pr1mary-s3cret@10.0.0.5:6379/0"})
    assert parsed.redis_url.endswith("@10.0.0.5:6379/0")
    assert "pr1mary-s3cret" not in repr(parsed)


# -- docs/operations.md ------------------------------------------------------------------

OPERATIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_settings() -> dict[str, tuple[str, str]]:
    """Flag -> (variable, default cell) from the table of flags in docs/operations.md."""
    rows: dict[str, tuple[str, str]] = {}
    for line in OPERATIONS_DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `--"):
            continue
        flags_cell, variables_cell, default_cell = line.strip("|").split("|")[:3]
        flags = re.findall(r"`(--[a-z0-9-]+)`", flags_cell)
        variables = re.findall(r"`(PAGEMETER_[A-Z0-9_]+)`", variables_cell)
        for flag, variable in zip(flags, variables, strict=True):
            rows[flag] = (variable, default_cell.strip())
    return rows


def documented_default(option: SettingOption, cell: str) -> object:
    """What the table's default cell says: empty, off/on, or a value in backticks."""
    if cell == "empty":
        return ""
    if cell in ("off", "on"):
        return cell == "on"
    assert cell.startswith("`") and cell.endswith("`"), cell
    return option.from_env(cell.strip("`"))


@pytest.mark.parametrize("option", SETTING_OPTIONS, ids=[o.flag for o in SETTING_OPTIONS])
def test_operations_doc_lists_the_setting(option: SettingOption) -> None:
    """docs/operations.md lists every declared setting with its variable and its default: a new setting cannot go undocumented."""
    documented = documented_settings()
    assert option.flag in documented, f"{option.flag} is missing from docs/operations.md"
    variable, default_cell = documented[option.flag]
    assert variable == option.env
    assert documented_default(option, default_cell) == option.default


def test_operations_doc_lists_no_other_flag() -> None:
    """The table of flags in docs/operations.md names no flag that is not declared (a renamed or removed one)."""
    assert set(documented_settings()) == {option.flag for option in SETTING_OPTIONS}
