"""Hostile input: malformed and boundary requests to every RPC, over a real gRPC channel.

Hypothesis sends ids with bad characters, empty, over-long, unicode and NUL
bytes; units maps with negative, zero, huge and too many metrics; timestamps and
durations far out of range; impossible year/month pairs, statistics enums and
dates; page tokens of random bytes; plans with bad timezones, prices, limits and
duplicate metrics; and, mixed in, values exactly at the documented limits.

Every request is tagged valid, invalid, or "either" (the contract does not say,
e.g. a garbage page token that happens to decode) and each answer is checked:

- it is one of the codes the RPC may answer (never UNKNOWN or INTERNAL):

  | RPC | codes |
  |---|---|
  | CheckQuota, RecordUsage | OK, INVALID_ARGUMENT, ALREADY_EXISTS |
  | ReleaseQuota, GetUsage, SetPlan | OK, INVALID_ARGUMENT |
  | GetPlan | OK, INVALID_ARGUMENT, NOT_FOUND |
  | GrantCredits, AdjustUsage | OK, INVALID_ARGUMENT, ALREADY_EXISTS, FAILED_PRECONDITION |
  | CreateApiKey, ListApiKeys, ListAuditEvents | OK, INVALID_ARGUMENT |
  | RevokeApiKey | OK, INVALID_ARGUMENT, NOT_FOUND |
  | GetUsageHistory, GetUsageStatistics, ListUsageRecords | OK, INVALID_ARGUMENT |
  | CloseBillingPeriod, ExportBillingPeriod | OK, INVALID_ARGUMENT, FAILED_PRECONDITION |
  | ListEvents, ListEventOrganizations | OK, INVALID_ARGUMENT |
  | ShouldRateLimit (Envoy's protocol) | OK, INVALID_ARGUMENT, ALREADY_EXISTS |

  and the one its tag calls for (invalid: INVALID_ARGUMENT; valid: an answer);
- INVALID_ARGUMENT has a readable message and a google.rpc.BadRequest;
- a refused call (any code but OK) leaves every Redis key's DUMP and TTL
  presence as it was;
- after each request the server still answers grpc.health.v1 SERVING and a
  normal CheckQuota.

The regression tests at the end pin down the server bugs these requests found
(all fixed). The server here runs with open access, as an admin caller sees it;
who may call what is tested in tests/grpc/test_access.py.
"""

from __future__ import annotations

import base64
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, TypeVar, cast

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2, text_format, timestamp_pb2
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import UInt64Value
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagemeter.v1 import (
    admin_pb2,
    billing_pb2,
    billing_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    plan_pb2,
    quota_pb2,
    reporting_pb2,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from pagemeter_server.domain.events import EVENT_TYPES
from tests.conftest import START_MS, RunningServer, examples, metric_limits

T = TypeVar("T")

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

ALLOWED: dict[str, frozenset[grpc.StatusCode]] = {
    "CheckQuota": frozenset({OK, INVALID, EXISTS}),
    "RecordUsage": frozenset({OK, INVALID, EXISTS, PRECONDITION}),
    "ReleaseQuota": frozenset({OK, INVALID}),
    "CheckQuotaBatch": frozenset({OK, INVALID}),
    "RecordUsageBatch": frozenset({OK, INVALID}),
    "GetUsage": frozenset({OK, INVALID}),
    "SetPlan": frozenset({OK, INVALID}),
    "GetPlan": frozenset({OK, INVALID, NOT_FOUND}),
    "GrantCredits": frozenset({OK, INVALID, EXISTS, PRECONDITION}),
    "CreateApiKey": frozenset({OK, INVALID}),
    "ListApiKeys": frozenset({OK, INVALID}),
    "RevokeApiKey": frozenset({OK, INVALID, NOT_FOUND}),
    "AdjustUsage": frozenset({OK, INVALID, EXISTS, PRECONDITION}),
    "ListAuditEvents": frozenset({OK, INVALID}),
    "GetUsageHistory": frozenset({OK, INVALID}),
    "GetUsageStatistics": frozenset({OK, INVALID}),
    "ListUsageRecords": frozenset({OK, INVALID}),
    "VoidCreditGrant": frozenset({OK, INVALID, NOT_FOUND}),
    "ListCreditGrants": frozenset({OK, INVALID}),
    "CloseBillingPeriod": frozenset({OK, INVALID, PRECONDITION}),
    "ExportBillingPeriod": frozenset({OK, INVALID, PRECONDITION}),
    "ListEvents": frozenset({OK, INVALID}),
    "ListEventOrganizations": frozenset({OK, INVALID}),
    "CreateWebhookEndpoint": frozenset({OK, INVALID}),
    "GetWebhookEndpoint": frozenset({OK, INVALID, NOT_FOUND}),
    "ListWebhookEndpoints": frozenset({OK, INVALID}),
    "UpdateWebhookEndpoint": frozenset({OK, INVALID, NOT_FOUND}),
    "DeleteWebhookEndpoint": frozenset({OK, INVALID}),
    "RotateWebhookSecret": frozenset({OK, INVALID, NOT_FOUND}),
    "ListWebhookDeliveries": frozenset({OK, INVALID, NOT_FOUND}),
    "ListWebhookDeadLetters": frozenset({OK, INVALID, NOT_FOUND}),
    "ReplayWebhookEvents": frozenset({OK, INVALID, NOT_FOUND, PRECONDITION}),
    "ShouldRateLimit": frozenset({OK, INVALID, EXISTS}),
}
SERVICE_OF = {
    "CheckQuota": "QuotaService",
    "RecordUsage": "QuotaService",
    "ReleaseQuota": "QuotaService",
    "CheckQuotaBatch": "QuotaService",
    "RecordUsageBatch": "QuotaService",
    "GetUsage": "QuotaService",
    "SetPlan": "AdminService",
    "GetPlan": "AdminService",
    "GrantCredits": "AdminService",
    "CreateApiKey": "AdminService",
    "ListApiKeys": "AdminService",
    "RevokeApiKey": "AdminService",
    "AdjustUsage": "AdminService",
    "ListAuditEvents": "AdminService",
    "GetUsageHistory": "ReportingService",
    "GetUsageStatistics": "ReportingService",
    "ListUsageRecords": "ReportingService",
    "VoidCreditGrant": "AdminService",
    "ListCreditGrants": "AdminService",
    "CloseBillingPeriod": "BillingService",
    "ExportBillingPeriod": "BillingService",
    "ListEvents": "EventService",
    "ListEventOrganizations": "EventService",
    "CreateWebhookEndpoint": "WebhookService",
    "GetWebhookEndpoint": "WebhookService",
    "ListWebhookEndpoints": "WebhookService",
    "UpdateWebhookEndpoint": "WebhookService",
    "DeleteWebhookEndpoint": "WebhookService",
    "RotateWebhookSecret": "WebhookService",
    "ListWebhookDeliveries": "WebhookService",
    "ListWebhookDeadLetters": "WebhookService",
    "ReplayWebhookEvents": "WebhookService",
    "ShouldRateLimit": "envoy.service.ratelimit.v3.RateLimitService",
}


def method_path(rpc: str) -> str:
    """The RPC's full method name: pagemeter's services are named without their package."""
    service = SERVICE_OF[rpc]
    return f"/{service if '.' in service else 'pagemeter.v1.' + service}/{rpc}"


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1
MAX_UNITS = 10**9
MAX_LIMIT = 10**15
DAY_MS = 86_400_000
# RecordUsage's completed_at window with the service defaults (35 days back, 5 minutes ahead).
OLDEST_COMPLETED_MS = START_MS - 35 * DAY_MS
NEWEST_COMPLETED_MS = START_MS + 5 * 60_000
TODAY = date(2026, 3, 15)  # START_MS in UTC, the timezone of every organization here
RPC_TIMEOUT = 10.0

ORG = "acme"  # has a plan (pages, documents, and the lifetime gauge apps)
NO_PLAN_ORG = "nobody"
SENTINEL_ORG = "zz.sentinel-org"  # only the still-serving check touches it
ACME_METRICS = ("pages", "documents", "apps")
KNOWN_REQUEST_IDS = ("held-1", "released-1", "done-1", "apps-1", "grant-1")

SENT: dict[str, int] = dict.fromkeys(ALLOWED, 0)
"""Requests sent per RPC by this module (hostile ones, not the still-serving probes)."""

# -- verdicts -------------------------------------------------------------------------------

VALID, BAD, EITHER = "valid", "invalid", "either"
"""What the contract says of a value: accepted, refused, or not specified."""

Tagged = tuple[Any, str]


@dataclass(frozen=True)
class Rule:
    """The values of one field that the contract accepts, refuses, and leaves open."""

    valid: st.SearchStrategy[Any] | None
    invalid: st.SearchStrategy[Any] | None = None
    either: st.SearchStrategy[Any] | None = None

    def of(self, verdict: str) -> st.SearchStrategy[Tagged]:
        strategy = {VALID: self.valid, BAD: self.invalid, EITHER: self.either}[verdict]
        assert strategy is not None
        return strategy.map(lambda value: (value, verdict))

    def acceptable(self) -> st.SearchStrategy[Tagged]:
        """A value that must not be refused, or that the contract leaves open."""
        return st.one_of([self.of(v) for v in (VALID, EITHER) if self._has(v)])

    def tagged(self) -> st.SearchStrategy[Tagged]:
        return st.one_of([self.of(v) for v in (VALID, BAD, EITHER) if self._has(v)])

    def _has(self, verdict: str) -> bool:
        return {VALID: self.valid, BAD: self.invalid, EITHER: self.either}[verdict] is not None


@st.composite
def requests(draw: st.DrawFn, rules: dict[str, Rule], most_broken: int = 3) -> dict[str, Tagged]:
    """One value per field, with 0 to `most_broken` fields broken (a third of requests none).

    Few broken fields per request keep the answers readable (see the trailer
    regression test at the end) and leave most rules checked one at a time.
    """
    breakable = sorted(name for name, rule in rules.items() if rule.invalid is not None)
    count = min(draw(st.sampled_from([0, 0, 1, 1, 2, most_broken])), len(breakable))
    broken = draw(st.sets(st.sampled_from(breakable), min_size=count, max_size=count))
    return {
        name: draw(rule.of(BAD) if name in broken else rule.acceptable())
        for name, rule in rules.items()
    }


def worst(*verdicts: str) -> str:
    if BAD in verdicts:
        return BAD
    if EITHER in verdicts:
        return EITHER
    return VALID


def verdict_of(fields: dict[str, Tagged]) -> str:
    return worst(*(verdict for _, verdict in fields.values()))


def expect(verdict: str, *accepted: grpc.StatusCode) -> set[grpc.StatusCode]:
    """The codes a request of this verdict may get, given the answers of an accepted one."""
    if verdict == BAD:
        return {INVALID}
    codes = set(accepted)
    if verdict == EITHER:
        codes.add(INVALID)
    return codes


# -- identifiers ----------------------------------------------------------------------------

ORG_CHARS = string.ascii_letters + string.digits + "._-"
REQUEST_CHARS = ORG_CHARS + ":"
METRIC_HEAD = string.ascii_lowercase
METRIC_CHARS = string.ascii_lowercase + string.digits + "_"

SPECIAL_CHARS = (
    *"\x00 \t\n\r\x7f/\\{}[*?'\";,%@#+:.-_A",
    "\u00e9",  # e acute
    "\u00df",  # sharp s
    "\u0130",  # dotted capital I
    "\u212a",  # Kelvin sign
    "\uff41",  # fullwidth a
    "\u0661",  # Arabic-Indic digit one
    "\U0001f4a5",  # an emoji
    "\u202e",  # right-to-left override
    "\ufeff",  # byte order mark
    "\u200b",  # zero width space
)


def outside(allowed: str) -> st.SearchStrategy[str]:
    """One character that is not in `allowed`: specials first, then any code point but surrogates."""
    specials = [c for c in SPECIAL_CHARS if c not in allowed]
    return st.one_of(
        st.sampled_from(specials), st.characters(codec="utf-8", exclude_characters=allowed)
    )


def identifiers(
    allowed: str, limit: int, *, known: Iterable[str] = (), allow_empty: bool = False
) -> Rule:
    """Strings over `allowed` of 1 (or 0) to `limit` characters, and ones that break the rule.

    Hostile unicode stays short: error messages quote at most 40 characters of a
    value, so a few broken fields keep the error trailers far below gRPC's
    default metadata limit.
    """
    low = 0 if allow_empty else 1
    known = tuple(known)
    valid_options = [
        st.text(allowed, min_size=low, max_size=limit),
        st.sampled_from(["a" * limit, "Z9" * (limit // 2), "._-", allowed[-1]]),
    ]
    if known:
        valid_options.insert(0, st.sampled_from(known))
    chunk = st.text(allowed, max_size=10)
    invalid_options = [
        st.text(allowed, min_size=limit + 1, max_size=limit + 2),
        st.sampled_from(["a" * (limit + 1), "a" * (4 * limit), "\u00e9" * (limit + 1)]),
        st.tuples(chunk, outside(allowed), chunk).map("".join),
        st.text(outside(allowed), min_size=1, max_size=8),
    ]
    if not allow_empty:
        invalid_options.append(st.just(""))
    return Rule(st.one_of(valid_options), st.one_of(invalid_options))


# Known ids come up often: the organization with a plan, one without, the seeded jobs.
ORG_IDS = identifiers(ORG_CHARS, 64, known=(ORG, ORG, ORG, NO_PLAN_ORG))
REQUEST_IDS = identifiers(REQUEST_CHARS, 128, known=KNOWN_REQUEST_IDS)
DOCUMENT_TYPES = identifiers(ORG_CHARS, 64, known=("invoice", ""), allow_empty=True)

METRIC_NAMES = Rule(
    st.one_of(
        st.sampled_from(ACME_METRICS),
        st.sampled_from(["credits", "a", "a" + "_" * 31, "z" * 32, "x9_"]),
        st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True),
    ),
    st.one_of(
        st.sampled_from(
            [
                "",
                "Pages",
                "PAGES",
                "1pages",
                "_pages",
                "pages-x",
                "pages.x",
                "pages:x",
                "a" * 33,
                "pag\u00e9s",
                "\uff50\uff41\uff47\uff45\uff53",  # fullwidth "pages"
                "pages\x00",
                " pages",
                "pages ",
                "\u00e9" * 40,
            ]
        ),
        st.tuples(
            st.text(METRIC_HEAD, max_size=5),
            outside(METRIC_CHARS),
            st.text(METRIC_CHARS, max_size=5),
        ).map("".join),
    ),
)


def units_amounts(low: int) -> Rule:
    """Units of one metric: `low`..10^9 are valid (mostly not negative), the rest of int64 is not."""
    return Rule(
        st.one_of(
            st.sampled_from([low, 0, 1, MAX_UNITS]),
            st.integers(0, 1000),
            st.integers(0, MAX_UNITS),
            st.integers(low, MAX_UNITS),
        ),
        st.one_of(
            st.sampled_from(
                [low - 1, MAX_UNITS + 1, 2**53, 2**53 + 1, -(2**53), INT64_MIN, INT64_MAX]
            ),
            st.integers(MAX_UNITS + 1, INT64_MAX),
            st.integers(INT64_MIN, low - 1),
        ),
    )


def units_maps(low: int) -> Rule:
    """1 to 3 metrics, or exactly 32; refused: a bad name or amount, no metric, or 33 metrics."""
    amounts = units_amounts(low)
    assert amounts.valid is not None and amounts.invalid is not None
    assert METRIC_NAMES.valid is not None and METRIC_NAMES.invalid is not None

    def full(count: int) -> st.SearchStrategy[dict[str, int]]:
        names = ["pages", *(f"m{i}" for i in range(count - 1))]
        return st.lists(st.integers(0, MAX_UNITS), min_size=count, max_size=count).map(
            lambda values: dict(zip(names, values, strict=True))
        )

    bad_entry = st.one_of(
        st.tuples(METRIC_NAMES.invalid, st.one_of(amounts.valid, amounts.invalid)),
        st.tuples(METRIC_NAMES.valid, amounts.invalid),
    )
    valid_maps = st.dictionaries(METRIC_NAMES.valid, amounts.valid, min_size=1, max_size=3)
    return Rule(
        st.one_of(valid_maps, valid_maps, full(32)),
        st.one_of(
            st.tuples(
                st.dictionaries(METRIC_NAMES.valid, amounts.valid, max_size=2), bad_entry
            ).map(lambda pair: {**pair[0], pair[1][0]: pair[1][1]}),
            st.just({}),
            full(33),
        ),
    )


CHECK_UNITS = units_maps(0)
RECORD_UNITS = units_maps(-MAX_UNITS)

# -- times ----------------------------------------------------------------------------------


def ts(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


FIRST_TIMESTAMP_MS = -62_135_596_800_000  # 0001-01-01
LAST_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999

HOLD_TTLS = Rule(
    st.one_of(
        st.none(),
        st.sampled_from([1000, 86_400_000]).map(duration),
        st.integers(1000, 86_400_000).map(duration),
    ),
    st.one_of(
        st.one_of(
            st.sampled_from([0, 1, 999, 86_400_001, -1, -1000]),
            st.integers(86_400_001, 10**15),
            st.integers(-(10**15), 999),
        ).map(duration),
        st.sampled_from(
            [
                duration_pb2.Duration(seconds=INT64_MAX, nanos=999_999_999),
                duration_pb2.Duration(seconds=INT64_MIN, nanos=-999_999_999),
                duration_pb2.Duration(seconds=0, nanos=999_999_999),
                duration_pb2.Duration(seconds=86_400, nanos=1_000_000),
                duration_pb2.Duration(seconds=-1, nanos=-999_999_999),
                # Not Durations at all, though they read as lengths in range.
                duration_pb2.Duration(seconds=0, nanos=2**31 - 1),
                duration_pb2.Duration(seconds=2, nanos=2**31 - 1),
                duration_pb2.Duration(seconds=60, nanos=-1),
                duration_pb2.Duration(seconds=3, nanos=-500_000_000),
                duration_pb2.Duration(seconds=100, nanos=1_000_000_000),
            ]
        ),
    ),
    # Outside protobuf's own Duration rules (nanos out of range, mixed signs).
    st.sampled_from(
        [
            duration_pb2.Duration(seconds=2, nanos=-1_000_000_000),
            duration_pb2.Duration(seconds=1, nanos=-1),
            duration_pb2.Duration(seconds=0, nanos=INT32_MAX),
        ]
    ),
)

COMPLETED_ATS = Rule(
    st.one_of(
        st.none(),
        st.sampled_from([OLDEST_COMPLETED_MS, NEWEST_COMPLETED_MS, START_MS]).map(ts),
        st.integers(OLDEST_COMPLETED_MS, NEWEST_COMPLETED_MS).map(ts),
    ),
    st.one_of(
        st.one_of(
            st.sampled_from([OLDEST_COMPLETED_MS - 1, NEWEST_COMPLETED_MS + 1, 0, -1]),
            st.integers(NEWEST_COMPLETED_MS + 1, LAST_TIMESTAMP_MS),
            st.integers(FIRST_TIMESTAMP_MS, OLDEST_COMPLETED_MS - 1),
        ).map(ts),
        st.sampled_from(
            [
                timestamp_pb2.Timestamp(seconds=INT64_MAX, nanos=999_999_999),
                timestamp_pb2.Timestamp(seconds=INT64_MIN),
                timestamp_pb2.Timestamp(seconds=-1),
            ]
        ),
    ),
)

REQUESTED_ATS = Rule(
    st.one_of(st.none(), st.integers(START_MS - 40 * DAY_MS, NEWEST_COMPLETED_MS).map(ts)),
    st.one_of(
        st.integers(FIRST_TIMESTAMP_MS, -1).map(ts),
        st.just(timestamp_pb2.Timestamp(seconds=INT64_MIN)),
    ),
    # Valid only up to completed_at + 5 minutes: see requested_after_completion().
    st.integers(0, LAST_TIMESTAMP_MS).map(ts),
)


def requested_after_completion(case: dict[str, Tagged]) -> dict[str, Tagged]:
    """Tag a requested_at later than completed_at (+5 minutes of clock skew) invalid."""
    requested, verdict = case["requested_at"]
    if requested is None or verdict == BAD or not 0 <= requested.nanos < 1_000_000_000:
        return case
    completed, completed_verdict = case["completed_at"]
    if completed_verdict == BAD:
        return case  # refused anyway
    completed_ms = START_MS if completed is None else completed.ToMilliseconds()
    if requested.ToMilliseconds() > completed_ms + 300_000:
        return {**case, "requested_at": (requested, BAD)}
    return case


YEARS = Rule(
    st.one_of(st.sampled_from([2020, 2100]), st.integers(2020, 2100)),
    st.one_of(
        st.sampled_from([2019, 2101, 0, -1, INT32_MIN, INT32_MAX]),
        st.integers(INT32_MIN, 2019),
        st.integers(2101, INT32_MAX),
    ),
)
MONTHS = Rule(
    st.one_of(st.sampled_from([1, 12]), st.integers(1, 12)),
    st.one_of(
        st.sampled_from([0, 13, -1, INT32_MIN, INT32_MAX]),
        st.integers(INT32_MIN, 0),
        st.integers(13, INT32_MAX),
    ),
)

# -- the harness ----------------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    response: Any = None
    message: str = ""
    bad_request: error_details_pb2.BadRequest | None = None
    error_infos: list[error_details_pb2.ErrorInfo] = field(default_factory=list)


Snapshot = dict[str, tuple[bytes | None, bool]]


def show(request: Message) -> str:
    return text_format.MessageToString(request, as_one_line=True, as_utf8=True)[:800]


class Hostile:
    """Sends requests over the real channel and checks every answer against the contract."""

    def __init__(self, server: RunningServer, redis_sync: redis.Redis) -> None:
        self.server = server
        self.redis = redis_sync
        self.page_token = ""
        self.health = health_pb2_grpc.HealthStub(server.channel)

    def snapshot(self) -> Snapshot:
        """Every key's DUMP and whether it has a TTL."""
        keys = sorted(cast(list[str], self.redis.keys("*")))  # decode_responses=True
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.dump(key)
                pipe.pttl(key)
            replies = pipe.execute()
        return {key: (replies[2 * i], replies[2 * i + 1] >= 0) for i, key in enumerate(keys)}

    def same(self, key: str, before: Snapshot, after: Snapshot) -> bool:
        """Whether a key is unchanged: same TTL presence and the same DUMP or, when a hash,
        set or sorted set is dumped in another order (Redis rehashes its tables on reads
        and in the background), the same contents as its old DUMP restored aside."""
        if before.get(key) == after.get(key):
            return True
        if key not in before or key not in after or before[key][1] != after[key][1]:
            return False
        old_dump = before[key][0]
        if old_dump is None:
            return False
        self.redis.restore(RESTORED, 0, old_dump, replace=True)
        try:
            return _contents(self.redis, RESTORED) == _contents(self.redis, key)
        finally:
            self.redis.delete(RESTORED)

    def stub_method(self, rpc: str) -> Callable[..., Any]:
        stub = {
            "QuotaService": self.server.quota,
            "AdminService": self.server.admin,
            "ReportingService": self.server.reporting,
            "BillingService": billing_pb2_grpc.BillingServiceStub(self.server.channel),
            "EventService": events_pb2_grpc.EventServiceStub(self.server.channel),
            "WebhookService": webhooks_pb2_grpc.WebhookServiceStub(self.server.channel),
            SERVICE_OF["ShouldRateLimit"]: rls_pb2_grpc.RateLimitServiceStub(self.server.channel),
        }[SERVICE_OF[rpc]]
        return getattr(stub, rpc)  # type: ignore[no-any-return]

    async def send(self, rpc: str, request: Message, expected: Iterable[grpc.StatusCode]) -> Answer:
        expected = set(expected)
        assert expected <= ALLOWED[rpc], f"test bug: {expected} for {rpc}"
        before = self.snapshot()
        SENT[rpc] += 1
        where = f"{rpc}({show(request)})"
        try:
            response = await self.stub_method(rpc)(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            answer = _refusal(error, where)
        else:
            answer = Answer(OK, response)
        assert answer.code in ALLOWED[rpc], (
            f"{where} was answered {answer.code.name} {answer.message!r}"
        )
        assert answer.code in expected, (
            f"{where} was answered {answer.code.name} {answer.message!r}, "
            f"expected one of {sorted(c.name for c in expected)}"
        )
        if answer.code is not OK:
            after = self.snapshot()
            changed = [
                key for key in before.keys() | after.keys() if not self.same(key, before, after)
            ]
            assert not changed, f"refused {where} changed Redis keys " + "; ".join(
                f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(changed)
            )
        return answer

    async def assert_still_serving(self) -> None:
        """grpc.health.v1 answers SERVING and a normal CheckQuota is decided."""
        health = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        decision = await self.server.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(org_id=SENTINEL_ORG, units={"pages": 1}),
            timeout=RPC_TIMEOUT,
        )
        assert decision.allowed
        assert decision.reason == quota_pb2.DECISION_REASON_WITHIN_QUOTA


RESTORED = "hostile-input:restored"
"""Scratch key (outside pagemeter's pm: keys) where an old DUMP is restored to compare."""


def _contents(client: redis.Redis, key: str) -> object:
    kind = client.type(key)
    if kind == "hash":
        return client.hgetall(key)
    if kind == "set":
        return client.smembers(key)
    if kind == "zset":
        return client.zrange(key, 0, -1, withscores=True)
    return client.dump(key)


def _refusal(error: grpc.aio.AioRpcError, where: str) -> Answer:
    """The answer of a failed call; an INVALID_ARGUMENT must explain itself."""
    answer = Answer(error.code(), message=error.details() or "")
    if answer.code is not INVALID:
        return answer
    message = answer.message
    assert message.strip(), f"{where}: INVALID_ARGUMENT without a message"
    assert message.isprintable(), f"{where}: message with control characters {message!r}"
    # An AioRpcError carries what from_call reads: code, details, trailing metadata.
    status = rpc_status.from_call(cast(grpc.Call, error))  # also checks code and message agree
    assert status is not None, f"{where}: INVALID_ARGUMENT without google.rpc details"
    assert status.code == code_pb2.INVALID_ARGUMENT
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            answer.bad_request = bad_request
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            answer.error_infos.append(info)
    assert answer.bad_request is not None, f"{where}: INVALID_ARGUMENT without a BadRequest"
    assert answer.bad_request.field_violations, f"{where}: BadRequest without violations"
    for violation in answer.bad_request.field_violations:
        assert violation.field and violation.description.strip(), f"{where}: {violation}"
    return answer


ACME_PLAN = plan_pb2.Plan(
    org_id=ORG,
    name="Business",
    timezone="UTC",
    metrics=[
        metric_limits(
            "pages",
            contract_quota=2000,
            overage_allowed=True,
            hard_limit=2500,
            price_per_unit="0.03",
            overage_price_per_unit="0.028",
        ),
        metric_limits("documents", contract_quota=500, overage_allowed=False),
        metric_limits("apps", contract_quota=10, period=plan_pb2.PERIOD_NONE),
    ],
)


@pytest.fixture
async def hostile(pagemeter_server: RunningServer, redis_sync: redis.Redis) -> Hostile:
    """A flushed Redis with one organization's plan, credits, a held, a released and recorded jobs."""
    quota, admin = pagemeter_server.quota, pagemeter_server.admin
    await admin.SetPlan(admin_pb2.SetPlanRequest(plan=ACME_PLAN))
    await admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=plan_pb2.Plan(
                org_id=SENTINEL_ORG, timezone="UTC", metrics=[metric_limits("pages")]
            )
        )
    )
    await admin.GrantCredits(
        admin_pb2.GrantCreditsRequest(org_id=ORG, metric="pages", units=100, grant_id="grant-1")
    )
    for request_id in ("held-1", "released-1"):
        await quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id=ORG, units={"pages": 10}, hold=True, request_id=request_id
            )
        )
    await quota.ReleaseQuota(quota_pb2.ReleaseQuotaRequest(org_id=ORG, request_id="released-1"))
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(
            org_id=ORG,
            request_id="done-1",
            units={"pages": 5, "documents": 1},
            document_type="invoice",
        )
    )
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id=ORG, request_id="apps-1", units={"apps": 3})
    )
    page = await pagemeter_server.reporting.ListUsageRecords(
        reporting_pb2.ListUsageRecordsRequest(org_id=ORG, page_size=1)
    )
    harness = Hostile(pagemeter_server, redis_sync)
    harness.page_token = page.next_page_token
    assert harness.page_token
    return harness


def hostile_settings(max_examples: int) -> Callable[[T], T]:
    return settings(
        max_examples=examples(max_examples),
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


# -- QuotaService -----------------------------------------------------------------------------


@hostile_settings(220)
@given(
    case=requests(
        {
            "org_id": ORG_IDS,
            "units": CHECK_UNITS,
            "request_id": REQUEST_IDS,
            "hold_ttl": HOLD_TTLS,
        }
    ),
    hold=st.booleans(),
    with_id=st.booleans(),
)
async def test_check_quota_refuses_malformed_input_and_decides_the_rest(
    hostile: Hostile, case: dict[str, Tagged], hold: bool, with_id: bool
) -> None:
    """CheckQuota answers malformed ids, units maps and hold TTLs with INVALID_ARGUMENT and a BadRequest, changing nothing, and decides every valid request (ALREADY_EXISTS only for a reused hold id)."""
    request_id, id_verdict = case["request_id"]
    if not (hold or with_id or id_verdict == BAD):
        request_id = ""  # a decision without a hold needs no id
    if not request_id:
        id_verdict = BAD if hold else VALID  # the id is required only with a hold
    request = quota_pb2.CheckQuotaRequest(
        org_id=case["org_id"][0], units=case["units"][0], hold=hold, request_id=request_id
    )
    if case["hold_ttl"][0] is not None:
        request.hold_ttl.CopyFrom(case["hold_ttl"][0])
    verdict = worst(case["org_id"][1], case["units"][1], id_verdict, case["hold_ttl"][1])
    accepted = (OK, EXISTS) if hold else (OK,)
    await hostile.send("CheckQuota", request, expect(verdict, *accepted))
    await hostile.assert_still_serving()


@hostile_settings(60)
@given(
    cases=st.lists(
        st.tuples(
            requests(
                {
                    "org_id": ORG_IDS,
                    "units": CHECK_UNITS,
                    "request_id": REQUEST_IDS,
                    "hold_ttl": HOLD_TTLS,
                }
            ),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
async def test_check_quota_batch_answers_each_item_on_its_own(
    hostile: Hostile, cases: list[tuple[dict[str, Tagged], bool]]
) -> None:
    """A batch of malformed and valid checks is answered item by item: each malformed item with INVALID_ARGUMENT and its violations, each valid one with a decision (or ALREADY_EXISTS for a reused hold id), never UNKNOWN or INTERNAL."""
    items, verdicts = [], []
    for case, hold in cases:
        request_id, id_verdict = case["request_id"]
        if not request_id:
            id_verdict = BAD if hold else VALID
        request = quota_pb2.CheckQuotaRequest(
            org_id=case["org_id"][0], units=case["units"][0], hold=hold, request_id=request_id
        )
        if case["hold_ttl"][0] is not None:
            request.hold_ttl.CopyFrom(case["hold_ttl"][0])
        items.append(request)
        verdicts.append(worst(case["org_id"][1], case["units"][1], id_verdict, case["hold_ttl"][1]))
    answer = await hostile.send(
        "CheckQuotaBatch", quota_pb2.CheckQuotaBatchRequest(items=items), {OK}
    )
    for item, verdict in zip(answer.response.items, verdicts, strict=True):
        code = item.error.code if item.WhichOneof("result") == "error" else "OK"
        assert code in {"OK", "INVALID_ARGUMENT", "ALREADY_EXISTS"}, item
        if verdict == BAD:
            assert code == "INVALID_ARGUMENT" and item.error.field_violations, item
        elif verdict == VALID:
            assert code != "INVALID_ARGUMENT", item
    await hostile.assert_still_serving()


@hostile_settings(220)
@given(
    case=requests(
        {
            "org_id": ORG_IDS,
            "request_id": REQUEST_IDS,
            "units": RECORD_UNITS,
            "document_type": DOCUMENT_TYPES,
            "requested_at": REQUESTED_ATS,
            "completed_at": COMPLETED_ATS,
        }
    ),
    success=st.sampled_from([None, True, False]),
)
async def test_record_usage_refuses_malformed_input_and_records_the_rest(
    hostile: Hostile, case: dict[str, Tagged], success: bool | None
) -> None:
    """RecordUsage refuses malformed ids, units, document types and times (and negative units of a monthly metric) with INVALID_ARGUMENT, changing nothing, and records every valid job once."""
    case = requested_after_completion(case)
    org_id, units = case["org_id"][0], case["units"][0]
    request = quota_pb2.RecordUsageRequest(
        org_id=org_id,
        request_id=case["request_id"][0],
        units=units,
        document_type=case["document_type"][0],
    )
    if success is not None:
        request.success = success
    for name in ("requested_at", "completed_at"):
        if case[name][0] is not None:
            getattr(request, name).CopyFrom(case[name][0])
    verdict = verdict_of(case)
    lowers_monthly = any(
        amount < 0 and not (org_id == ORG and metric == "apps") for metric, amount in units.items()
    )
    if verdict != BAD and lowers_monthly:
        # Only a lifetime gauge can be lowered; an id recorded before answers ALREADY_EXISTS first.
        expected = {INVALID, EXISTS}
    else:
        expected = expect(verdict, OK, EXISTS)
    planned = ACME_METRICS if org_id == ORG else ()
    if verdict != BAD and any(metric not in planned for metric in units):
        # Metrics outside the plan: recorded until the org uses the most allowed.
        expected = expected | {PRECONDITION}
    await hostile.send("RecordUsage", request, expected)
    await hostile.assert_still_serving()


@hostile_settings(120)
@given(case=requests({"org_id": ORG_IDS, "request_id": REQUEST_IDS}))
async def test_release_quota_refuses_malformed_ids(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """ReleaseQuota answers a malformed organization or request id with INVALID_ARGUMENT, changing nothing, and any valid pair with an outcome."""
    request = quota_pb2.ReleaseQuotaRequest(
        org_id=case["org_id"][0], request_id=case["request_id"][0]
    )
    await hostile.send("ReleaseQuota", request, expect(verdict_of(case), OK))
    await hostile.assert_still_serving()


@hostile_settings(150)
@given(
    case=requests({"org_id": ORG_IDS, "year": YEARS, "month": MONTHS}),
    given_fields=st.sampled_from(["none", "both", "both", "both", "year", "month"]),
)
async def test_get_usage_refuses_malformed_ids_and_months(
    hostile: Hostile, case: dict[str, Tagged], given_fields: str
) -> None:
    """GetUsage answers a malformed organization id, a year without a month (or the reverse) and years outside 2020-2100 or months outside 1-12 with INVALID_ARGUMENT, and every valid month with its usage."""
    request = quota_pb2.GetUsageRequest(org_id=case["org_id"][0])
    verdicts = [case["org_id"][1]]
    for name in ("year", "month"):
        if given_fields in ("both", name):
            setattr(request, name, case[name][0])
            verdicts.append(case[name][1])
    if given_fields in ("year", "month"):
        verdicts.append(BAD)
    await hostile.send("GetUsage", request, expect(worst(*verdicts), OK))
    await hostile.assert_still_serving()


# -- AdminService -----------------------------------------------------------------------------

VALID_TIMEZONES = (
    "",
    "UTC",
    "Europe/Berlin",
    "Asia/Tokyo",
    "America/New_York",
    "America/Argentina/Buenos_Aires",
    "Australia/Lord_Howe",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
)
INVALID_TIMEZONES = (
    "Mars/Olympus_Mons",
    "UTC ",
    " UTC",
    "Europe/Berlin\x00",
    "../../etc/passwd",
    "/etc/localtime",
    "Europe//Berlin",
    "Europe/Berlin/",
    "zone.tab",
    "+01:00",
    "\u00dcTC",
    "Europe/B\u00e9rlin",
)
TIMEZONES = Rule(
    st.sampled_from(VALID_TIMEZONES),
    st.one_of(
        st.sampled_from(INVALID_TIMEZONES),
        # Never a file or folder of the timezone database (folders: see the regression tests at the end).
        st.text(st.characters(codec="utf-8", exclude_characters="/."), min_size=1, max_size=20).map(
            lambda name: f"Mars/{name}"
        ),
    ),
)
PRICES = Rule(
    st.one_of(
        st.sampled_from(
            ["", "0", "1", "0.03", "0.028", "0.000000001", "999999999999", "999999999999.999999999"]
        ),
        st.from_regex(r"[0-9]{1,12}(\.[0-9]{1,9})?", fullmatch=True),
    ),
    # Digits other than 0-9 are left out: the server takes them (see the regression tests at the end).
    st.sampled_from(
        [
            "1e3",
            "1E3",
            "1e-9",
            "-1",
            "-0",
            "+1",
            "0.0000000001",
            "9999999999999",
            "NaN",
            "nan",
            "Infinity",
            "inf",
            "1,5",
            " 1",
            "1 ",
            "1.",
            ".5",
            "1.5.5",
            "0x10",
            "1_000",
            "\x00",
            "1\u00a0000",
        ]
    ),
)
LIMITS = Rule(
    st.one_of(st.none(), st.sampled_from([0, 1, MAX_LIMIT]), st.integers(0, MAX_LIMIT)),
    st.one_of(
        st.sampled_from([-1, MAX_LIMIT + 1, INT64_MIN, INT64_MAX]),
        st.integers(INT64_MIN, -1),
        st.integers(MAX_LIMIT + 1, INT64_MAX),
    ),
)
PERIODS = Rule(st.sampled_from([0, 1, 2]), st.sampled_from([3, -1, INT32_MAX, INT32_MIN]))
CURRENCIES = Rule(
    st.one_of(
        st.sampled_from(["", "USD", "EUR", "JPY"]), st.from_regex(r"[A-Z]{3}", fullmatch=True)
    ),
    st.sampled_from(["usd", "US", "USDD", "\u20ac", "US D", "\uff35SD", "\x00\x00\x00"]),
)
METRIC_FIELDS = (
    "metric",
    "contract_quota",
    "hard_limit",
    "price_per_unit",
    "overage_price_per_unit",
    "period",
)
PLAN_SLOTS = (
    "org_id",
    "name",
    "timezone",
    "currency",
    "processing_priority",
    "support_level",
    "metrics",
    *(f"{i}.{name}" for i in range(3) for name in METRIC_FIELDS),
)


def text_up_to(limit: int) -> Rule:
    """Free text: valid up to `limit` characters (unicode and NUL included), invalid past it."""
    return Rule(
        st.one_of(st.text(max_size=20), st.sampled_from(["", "x" * limit, "\u00e9" * limit])),
        st.sampled_from(["x" * (limit + 1), "\u00e9" * (limit + 1), "\x00" * (limit + 1)]),
    )


@st.composite
def set_plan_requests(draw: st.DrawFn) -> tuple[admin_pb2.SetPlanRequest, str]:
    """A SetPlanRequest with at most three broken fields, and its verdict."""
    if draw(st.integers(0, 19)) == 0:
        return admin_pb2.SetPlanRequest(), BAD
    count = draw(st.sampled_from([0, 0, 1, 1, 2, 3]))
    broken = draw(st.sets(st.sampled_from(PLAN_SLOTS), min_size=count, max_size=count))
    verdicts: list[str] = []

    def pick(slot: str, rule: Rule) -> Any:
        value, verdict = draw(rule.of(BAD if slot in broken else VALID))
        verdicts.append(verdict)
        return value

    plan = plan_pb2.Plan(
        org_id=pick("org_id", ORG_IDS),
        name=pick("name", text_up_to(128)),
        timezone=pick("timezone", TIMEZONES),
        currency=pick("currency", CURRENCIES),
        processing_priority=pick("processing_priority", text_up_to(64)),
        support_level=pick("support_level", text_up_to(64)),
        api_rate_limit=draw(
            st.one_of(st.sampled_from([0, 1, UINT32_MAX]), st.integers(0, UINT32_MAX))
        ),
        api_burst=draw(st.one_of(st.sampled_from([0, 1, UINT32_MAX]), st.integers(0, UINT32_MAX))),
    )
    if "metrics" in broken:
        kind = draw(st.sampled_from(["33", "duplicate"]))
        verdicts.append(BAD)
    else:
        kind = draw(st.sampled_from(["list", "list", "list", "32"]))
    if kind in ("32", "33"):
        plan.metrics.extend(metric_limits(f"m{i}") for i in range(int(kind)))
    elif kind == "duplicate":
        plan.metrics.extend([metric_limits("pages"), metric_limits("pages", contract_quota=1)])
    else:
        for i in range(draw(st.integers(0, 3))):
            limits = plan_pb2.MetricLimits(
                metric=pick(f"{i}.metric", METRIC_NAMES),
                overage_allowed=draw(st.booleans()),
                price_per_unit=pick(f"{i}.price_per_unit", PRICES),
                overage_price_per_unit=pick(f"{i}.overage_price_per_unit", PRICES),
                period=pick(f"{i}.period", PERIODS),
            )
            for name in ("contract_quota", "hard_limit"):
                value = pick(f"{i}.{name}", LIMITS)
                if value is not None:
                    setattr(limits, name, value)
            plan.metrics.append(limits)
        names = [limits.metric for limits in plan.metrics]
        if len(set(names)) != len(names):
            verdicts.append(BAD)
    return admin_pb2.SetPlanRequest(plan=plan), worst(*verdicts)


@hostile_settings(250)
@given(case=set_plan_requests())
async def test_set_plan_refuses_malformed_plans_and_stores_the_rest(
    hostile: Hostile, case: tuple[admin_pb2.SetPlanRequest, str]
) -> None:
    """SetPlan refuses a missing plan, bad ids, timezones, currencies, prices, limits, periods, over-long names and too many or duplicate metrics with INVALID_ARGUMENT, changing nothing, and stores every valid plan."""
    request, verdict = case
    await hostile.send("SetPlan", request, expect(verdict, OK))
    await hostile.assert_still_serving()


@hostile_settings(80)
@given(org=ORG_IDS.tagged())
async def test_get_plan_refuses_malformed_ids(hostile: Hostile, org: Tagged) -> None:
    """GetPlan answers a malformed organization id with INVALID_ARGUMENT, an organization without a plan with NOT_FOUND, and the one with a plan with it."""
    accepted = OK if org[0] in (ORG, SENTINEL_ORG) else NOT_FOUND
    await hostile.send("GetPlan", admin_pb2.GetPlanRequest(org_id=org[0]), expect(org[1], accepted))
    await hostile.assert_still_serving()


GRANT_UNITS = Rule(
    st.one_of(st.sampled_from([1, MAX_UNITS]), st.integers(1, MAX_UNITS)),
    st.one_of(
        st.sampled_from([0, -1, MAX_UNITS + 1, 2**53, INT64_MIN, INT64_MAX]),
        st.integers(INT64_MIN, 0),
        st.integers(MAX_UNITS + 1, INT64_MAX),
    ),
)


GRANT_PRIORITIES = Rule(
    st.one_of(st.sampled_from([0, 50, 100]), st.integers(0, 100)),
    st.one_of(
        st.sampled_from([-1, 101, INT32_MAX, INT32_MIN]),
        st.integers(INT32_MIN, -1),
        st.integers(101, INT32_MAX),
    ),
)
BROKEN_TIMESTAMPS = st.sampled_from(
    [
        timestamp_pb2.Timestamp(seconds=INT64_MAX, nanos=999_999_999),
        timestamp_pb2.Timestamp(seconds=INT64_MIN),
        timestamp_pb2.Timestamp(seconds=-1),
        timestamp_pb2.Timestamp(seconds=1, nanos=-1),
    ]
)
# Effective up to a day after the server's now; expiring two days after it or
# later, so that every valid pair expires after it becomes effective.
GRANT_EFFECTIVE_ATS = Rule(
    st.one_of(st.none(), st.integers(0, START_MS + DAY_MS).map(ts)),
    BROKEN_TIMESTAMPS,
)
GRANT_EXPIRES_ATS = Rule(
    st.one_of(st.none(), st.integers(START_MS + 2 * DAY_MS, LAST_TIMESTAMP_MS).map(ts)),
    st.one_of(BROKEN_TIMESTAMPS, st.integers(0, START_MS).map(ts)),
)


@hostile_settings(200)
@given(
    case=requests(
        {
            "org_id": ORG_IDS,
            "metric": METRIC_NAMES,
            "units": GRANT_UNITS,
            "grant_id": REQUEST_IDS,
            "reason": text_up_to(256),
            "priority": GRANT_PRIORITIES,
            "effective_at": GRANT_EFFECTIVE_ATS,
            "expires_at": GRANT_EXPIRES_ATS,
        }
    )
)
async def test_grant_credits_refuses_malformed_grants(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """GrantCredits refuses bad ids, metric names, units outside 1-10^9, over-long reasons, priorities outside 0-100, broken times and expiries not after now with INVALID_ARGUMENT, a grant outside the plan with FAILED_PRECONDITION, and reused grant ids with ALREADY_EXISTS, each changing nothing."""
    request = admin_pb2.GrantCreditsRequest(**{name: value for name, (value, _) in case.items()})
    in_plan = request.org_id == ORG and request.metric in ACME_METRICS
    accepted = (OK, EXISTS) if in_plan else (PRECONDITION,)
    await hostile.send("GrantCredits", request, expect(verdict_of(case), *accepted))
    await hostile.assert_still_serving()


# -- ReportingService -------------------------------------------------------------------------

HISTORY_MONTHS = Rule(
    st.one_of(st.sampled_from([0, 1, 24]), st.integers(0, 24)),
    st.one_of(
        st.sampled_from([-1, 25, INT32_MIN, INT32_MAX]),
        st.integers(INT32_MIN, -1),
        st.integers(25, INT32_MAX),
    ),
)


@hostile_settings(120)
@given(case=requests({"org_id": ORG_IDS, "months": HISTORY_MONTHS}))
async def test_get_usage_history_refuses_malformed_requests(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """GetUsageHistory answers a malformed organization id or months outside 0-24 with INVALID_ARGUMENT and every valid request with its months."""
    request = reporting_pb2.GetUsageHistoryRequest(
        org_id=case["org_id"][0], months=case["months"][0]
    )
    await hostile.send("GetUsageHistory", request, expect(verdict_of(case), OK))
    await hostile.assert_still_serving()


EARLIEST, LATEST = date(2000, 1, 1), date(2100, 12, 31)
STATISTICS_ENUM = Rule(
    st.sampled_from([0, 1, 2, 3]), st.sampled_from([4, -1, 99, INT32_MIN, INT32_MAX])
)
ParsedDate = tuple[str, date | None]
"""A date parameter and the day (in UTC) it names; None when it is not ISO 8601."""


def iso(day: date, form: int, offset_minutes: int) -> ParsedDate:
    """One of the ISO 8601 spellings of a day, and the UTC date it stands for."""
    if form == 0:
        return day.isoformat(), day
    if form == 1:
        year, week, weekday = day.isocalendar()
        return f"{year:04d}-W{week:02d}-{weekday}", day
    moment = datetime(day.year, day.month, day.day, 13, 30, tzinfo=UTC)
    if form == 2:
        return moment.replace(tzinfo=None).isoformat(), day  # naive: its own date
    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    local += timedelta(hours=offset_minutes % 11)
    return local.isoformat(), local.astimezone(UTC).date()


def spelled(days: st.SearchStrategy[date]) -> st.SearchStrategy[ParsedDate]:
    """Days spelled as dates, week dates, naive date-times or date-times with an offset."""
    offsets = st.integers(-14 * 60 + 1, 14 * 60 - 1)
    return st.builds(iso, days, st.integers(0, 3), offsets)


IN_RANGE_DAYS = st.one_of(st.sampled_from([EARLIEST, LATEST, TODAY]), st.dates(EARLIEST, LATEST))
MALFORMED_DATES = st.one_of(
    st.sampled_from(
        [
            "2024-13-01",
            "2024-02-30",
            "2024-00-10",
            "19-01-2024",
            "2024/01/19",
            "20240119x",
            "2024-1-9",
            "yesterday",
            "\uff12\uff10\uff12\uff14-01-19",  # fullwidth digits
            "2024-01-19\x00",
            " 2024-01-19",
            "2024-01-19T25:00:00",
            "2024-01-19T10:00:00+25:00",
            "-2024-01-19",
        ]
    ),
    st.text(max_size=30).map(lambda text: "x" + text),
).map(lambda text: (text, None))
# Out of 2000-2100, in every spelling but one with an offset (see the regression tests at the end).
OUT_OF_RANGE_DATES = st.builds(
    iso,
    st.one_of(
        st.sampled_from([date(1999, 12, 31), date(2101, 1, 1), date(1, 1, 1), date(9999, 12, 31)]),
        st.dates(date(1, 1, 1), date(1999, 12, 31)),
        st.dates(date(2101, 1, 1), date(9999, 12, 31)),
    ),
    st.integers(0, 2),
    st.just(0),
)


@st.composite
def date_ranges(draw: st.DrawFn) -> tuple[ParsedDate, ParsedDate]:
    """A start and end date: often a valid range (up to and just past 366 days), else anything."""
    if draw(st.booleans()):
        end_day = draw(IN_RANGE_DAYS)
        span = draw(st.one_of(st.sampled_from([0, 365, 366, -1]), st.integers(-3, 400)))
        start_day = max(EARLIEST, min(LATEST, end_day - timedelta(days=span)))
        spelling = st.integers(0, 2)
        start = iso(start_day, draw(spelling), 0)
        end = (
            ("", end_day)
            if end_day == TODAY and draw(st.booleans())
            else iso(end_day, draw(spelling), 0)
        )
        return start, end
    one_date = st.one_of(
        st.just(("", None)),
        spelled(IN_RANGE_DAYS),
        OUT_OF_RANGE_DATES,
        MALFORMED_DATES,
    )
    return draw(one_date), draw(one_date)


def statistics_reasons(
    period: Tagged, group_by: Tagged, start: ParsedDate, end: ParsedDate
) -> set[str]:
    """The ErrorInfo reasons the documented rules give these parameters (empty: valid)."""
    reasons = set()
    if BAD in (period[1], group_by[1]):
        reasons.add("INVALID_PARAMETER")

    def day_of(text: str, parsed: date | None, default: date) -> date | None:
        if not text:
            return default
        if parsed is None or not EARLIEST <= parsed <= LATEST:
            reasons.add("INVALID_DATE_FORMAT")
            return None
        return parsed

    end_day = day_of(end[0], end[1], TODAY)
    if end_day is not None:
        start_day = day_of(start[0], start[1], end_day - timedelta(days=30))
        if start_day is not None:
            if start_day > end_day:
                reasons.add("INVALID_DATE_RANGE")
            elif (end_day - start_day).days >= 366:
                reasons.add("DATE_RANGE_TOO_LARGE")
    return reasons


@hostile_settings(250)
@given(
    case=requests(
        {"org_id": ORG_IDS, "period": STATISTICS_ENUM, "group_by": STATISTICS_ENUM}, most_broken=2
    ),
    dates=date_ranges(),
)
async def test_get_usage_statistics_refuses_malformed_parameters_with_their_reason(
    hostile: Hostile, case: dict[str, Tagged], dates: tuple[ParsedDate, ParsedDate]
) -> None:
    """GetUsageStatistics answers out-of-range enums, malformed or out-of-range dates, reversed and over-long ranges with INVALID_ARGUMENT carrying the documented ErrorInfo reason, and every valid range with its figures."""
    start, end = dates
    request = reporting_pb2.GetUsageStatisticsRequest(
        org_id=case["org_id"][0],
        period=case["period"][0],
        group_by=case["group_by"][0],
        start_date=start[0],
        end_date=end[0],
    )
    reasons = statistics_reasons(case["period"], case["group_by"], start, end)
    if case["org_id"][1] == BAD:
        await hostile.send("GetUsageStatistics", request, {INVALID})
    elif reasons:
        answer = await hostile.send("GetUsageStatistics", request, {INVALID})
        assert [(i.domain, i.reason in reasons) for i in answer.error_infos] == [
            ("pagemeter", True)
        ], f"{show(request)}: {answer.error_infos} for {reasons}"
    else:
        answer = await hostile.send("GetUsageStatistics", request, {OK})
        assert answer.response.summary.start_date <= answer.response.summary.end_date
    await hostile.assert_still_serving()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


PAGE_TOKENS = Rule(
    st.sampled_from(["", "REAL"]),
    None,
    # Not tokens this service issued: refused or read as some cursor, never a failure.
    st.one_of(
        st.binary(max_size=64).map(_b64),
        st.binary(max_size=64).map(lambda raw: _b64(raw).rstrip("=")),
        st.text(max_size=64),
        st.tuples(st.integers(), st.text(max_size=20)).map(
            lambda pair: _b64(f"{pair[0]}:{pair[1]}".encode())
        ),
        st.sampled_from(
            [
                _b64(b"9" * 300 + b":x"),
                _b64(b"-" + b"9" * 300 + b":x"),
                _b64(b"1e400:x"),
                _b64(b"nan:x"),
                _b64(b"12:"),
                _b64(b":x"),
                _b64(b"12:\x00"),
                _b64("\uff11\uff12:x".encode()),
                "!!!!",
                "a",
                "\x00",
                "a" * 512,
                "a" * 513,
                "A" * 4000,
            ]
        ),
    ),
)
PAGE_SIZES = Rule(
    st.one_of(st.sampled_from([0, 1, 1000]), st.integers(0, 1000)),
    st.one_of(
        st.sampled_from([-1, 1001, INT32_MIN, INT32_MAX]),
        st.integers(INT32_MIN, -1),
        st.integers(1001, INT32_MAX),
    ),
)


@hostile_settings(200)
@given(case=requests({"org_id": ORG_IDS, "page_size": PAGE_SIZES, "page_token": PAGE_TOKENS}))
async def test_list_usage_records_refuses_malformed_pages(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """ListUsageRecords answers a malformed organization id or a page size outside 0-1000 with INVALID_ARGUMENT, a page token it did not issue (or issued for another organization) with INVALID_ARGUMENT, and valid requests with a page."""
    token = case["page_token"][0]
    request = reporting_pb2.ListUsageRecordsRequest(
        org_id=case["org_id"][0],
        page_size=case["page_size"][0],
        page_token=hostile.page_token if token == "REAL" else token,
    )
    verdict = verdict_of(case)
    if token == "REAL" and case["org_id"][0] != ORG:
        verdict = BAD  # the token pages ORG's records, and only those
    await hostile.send("ListUsageRecords", request, expect(verdict, OK))
    await hostile.assert_still_serving()


# -- BillingService -----------------------------------------------------------------------------

_MONTH_FORM = re.compile(r"[0-9]{4}-[0-9]{2}")
BILLING_MONTHS = Rule(
    st.one_of(
        st.sampled_from(["2026-02", "2026-01", "2025-03", "2026-03", "2030-12"]),
        st.tuples(st.integers(2000, 2100), st.integers(1, 12)).map(
            lambda ym: f"{ym[0]:04d}-{ym[1]:02d}"
        ),
    ),
    st.one_of(
        st.text(max_size=12).filter(lambda text: not _MONTH_FORM.fullmatch(text)),
        st.tuples(st.integers(0, 9999), st.integers(0, 99))
        .filter(lambda ym: not (2000 <= ym[0] <= 2100 and 1 <= ym[1] <= 12))
        .map(lambda ym: f"{ym[0]:04d}-{ym[1]:02d}"),
        st.sampled_from(
            [
                "",
                "2026-2",
                "2026-02-01",
                "2026/02",
                " 2026-02",
                "2026-02\n",
                "\uff12\uff10\uff12\uff16-02",
                "\u0662\u0660\u0662\u0666-\u0660\u0662",
                "9" * 100_000,
            ]
        ),
    ),
)


@hostile_settings(80)
@given(case=requests({"billing_month": BILLING_MONTHS}))
async def test_close_billing_period_refuses_malformed_months(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """CloseBillingPeriod answers a billing month other than YYYY-MM of 2000-2100 with INVALID_ARGUMENT, a month not ended yet or past the usage retention with FAILED_PRECONDITION, each changing nothing, and a closable month with its counts."""
    request = billing_pb2.CloseBillingPeriodRequest(billing_month=case["billing_month"][0])
    await hostile.send("CloseBillingPeriod", request, expect(verdict_of(case), OK, PRECONDITION))
    await hostile.assert_still_serving()


@hostile_settings(120)
@given(
    case=requests(
        {"billing_month": BILLING_MONTHS, "page_size": PAGE_SIZES, "page_token": PAGE_TOKENS}
    )
)
async def test_export_billing_period_refuses_malformed_requests(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """ExportBillingPeriod answers a malformed billing month, a page size outside 0-1000 or a page token it did not issue with INVALID_ARGUMENT (before any FAILED_PRECONDITION of the month), and valid requests with a page."""
    token = case["page_token"][0]
    request = billing_pb2.ExportBillingPeriodRequest(
        billing_month=case["billing_month"][0],
        page_size=case["page_size"][0],
        page_token=hostile.page_token if token == "REAL" else token,
    )
    verdict = verdict_of(case)
    if token == "REAL" or (token and verdict == EITHER):
        verdict = BAD  # the records list's token, or one no export issued
    await hostile.send("ExportBillingPeriod", request, expect(verdict, OK, PRECONDITION))
    await hostile.assert_still_serving()


# -- EventService -------------------------------------------------------------------------------

EVENT_TYPE_LISTS = Rule(
    st.lists(st.sampled_from(sorted(EVENT_TYPES)), max_size=4),
    st.one_of(
        st.lists(st.text(max_size=40), min_size=1, max_size=3).filter(
            lambda types: any(kind not in EVENT_TYPES for kind in types)
        ),
        st.sampled_from([["USAGE.RECORDED"], ["usage.recorded", ""], ["x" * 100_000]]),
        st.just(sorted(EVENT_TYPES) * 2),
    ),
)
SINCES = Rule(
    st.one_of(st.none(), st.integers(0, LAST_TIMESTAMP_MS).map(ts)),
    BROKEN_TIMESTAMPS,
)


@hostile_settings(150)
@given(
    case=requests(
        {
            "org_id": ORG_IDS,
            "types": EVENT_TYPE_LISTS,
            "since": SINCES,
            "page_size": PAGE_SIZES,
            "page_token": PAGE_TOKENS,
        }
    )
)
async def test_list_events_refuses_malformed_requests(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """ListEvents answers a malformed organization id, an unknown event type, a time out of range, a page size outside 0-1000 or a page token it did not issue with INVALID_ARGUMENT, and valid requests with a page."""
    token = case["page_token"][0]
    request = events_pb2.ListEventsRequest(
        org_id=case["org_id"][0],
        types=case["types"][0],
        page_size=case["page_size"][0],
        page_token=hostile.page_token if token == "REAL" else token,
    )
    if case["since"][0] is not None:
        request.since.CopyFrom(case["since"][0])
    verdict = verdict_of(case)
    if token == "REAL" or (token and verdict == EITHER):
        verdict = BAD  # the records list's token, or one no event list issued
    await hostile.send("ListEvents", request, expect(verdict, OK))
    await hostile.assert_still_serving()


@hostile_settings(60)
@given(case=requests({"since": SINCES, "page_size": PAGE_SIZES, "page_token": PAGE_TOKENS}))
async def test_list_event_organizations_refuses_malformed_requests(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """ListEventOrganizations answers a time out of range, a page size outside 0-1000 or a page token it did not issue with INVALID_ARGUMENT, and valid requests with a page."""
    token = case["page_token"][0]
    request = events_pb2.ListEventOrganizationsRequest(
        page_size=case["page_size"][0],
        page_token=hostile.page_token if token == "REAL" else token,
    )
    if case["since"][0] is not None:
        request.since.CopyFrom(case["since"][0])
    verdict = verdict_of(case)
    if token == "REAL" or (token and verdict == EITHER):
        verdict = BAD
    await hostile.send("ListEventOrganizations", request, expect(verdict, OK))
    await hostile.assert_still_serving()


# -- Envoy's rate-limit protocol ---------------------------------------------------------------

UINT64_MAX = 2**64 - 1
# A descriptor's hits_addend (UInt64Value, None: unset) and the request's (uint32):
# the hits of one call are at most 10^9, like any units.
DESCRIPTOR_HITS = Rule(
    st.one_of(st.none(), st.sampled_from([0, 1, MAX_UNITS]), st.integers(0, MAX_UNITS)),
    st.one_of(
        st.sampled_from([MAX_UNITS + 1, UINT32_MAX, UINT64_MAX]),
        st.integers(MAX_UNITS + 1, UINT64_MAX),
    ),
)
REQUEST_HITS = Rule(
    st.one_of(st.sampled_from([0, 1, MAX_UNITS]), st.integers(0, MAX_UNITS)),
    st.one_of(st.just(UINT32_MAX), st.integers(MAX_UNITS + 1, UINT32_MAX)),
)
# Keys pagemeter does not read: a typo must not leave a call decided wrongly.
STRAY_KEYS = Rule(
    st.none(),
    st.sampled_from(["org", "ORG_ID", "generic_key", "remote_address", "", "metric ", "\x00"]),
)


@hostile_settings(120)
@given(
    case=requests(
        {
            "org_id": ORG_IDS,
            "metric": METRIC_NAMES,
            "request_id": REQUEST_IDS,
            "hits": DESCRIPTOR_HITS,
            "request_hits": REQUEST_HITS,
            "stray_key": STRAY_KEYS,
        }
    ),
    with_id=st.booleans(),
)
async def test_should_rate_limit_refuses_malformed_descriptors_and_decides_the_rest(
    hostile: Hostile, case: dict[str, Tagged], with_id: bool
) -> None:
    """ShouldRateLimit answers a malformed organization, metric or request id, too many hits or an unknown key with INVALID_ARGUMENT, changing nothing, and decides every valid request (ALREADY_EXISTS only for an id of another job)."""
    entries = [("org_id", case["org_id"][0]), ("metric", case["metric"][0])]
    if with_id:
        entries.append(("request_id", case["request_id"][0]))
    else:
        case["request_id"] = ("", VALID)  # no id: pagemeter makes one
    if case["stray_key"][0] is not None:
        entries.append((case["stray_key"][0], "x"))
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if case["hits"][0] is not None:
        descriptor.hits_addend.CopyFrom(UInt64Value(value=case["hits"][0]))
        case["request_hits"] = (0, VALID)  # the descriptor's hits are the ones counted
    request = rls_pb2.RateLimitRequest(
        domain="edge", descriptors=[descriptor], hits_addend=case["request_hits"][0]
    )
    await hostile.send("ShouldRateLimit", request, expect(verdict_of(case), OK, EXISTS))
    await hostile.assert_still_serving()


# -- AdminService: keys, corrections, audit --------------------------------------------------


@hostile_settings(80)
@given(case=requests({"org_id": ORG_IDS, "name": text_up_to(128)}))
async def test_create_api_key_refuses_malformed_requests(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """CreateApiKey refuses a malformed organization id or a name over 128 characters with INVALID_ARGUMENT, changing nothing."""
    request = admin_pb2.CreateApiKeyRequest(org_id=case["org_id"][0], name=case["name"][0])
    await hostile.send("CreateApiKey", request, expect(verdict_of(case), OK))
    await hostile.assert_still_serving()


@hostile_settings(60)
@given(org=ORG_IDS.tagged())
async def test_list_api_keys_refuses_malformed_ids(hostile: Hostile, org: Tagged) -> None:
    """ListApiKeys refuses a malformed organization id with INVALID_ARGUMENT."""
    request = admin_pb2.ListApiKeysRequest(org_id=org[0])
    await hostile.send("ListApiKeys", request, expect(org[1], OK))


KEY_IDS = Rule(
    st.one_of(st.text("0123456789abcdef", min_size=16, max_size=16), st.just("a" * 64)),
    st.one_of(
        st.sampled_from(["", "a" * 65, "../x", "key id", "k\x00", "\u00e9t\u00e9"]),
        st.text(min_size=1, max_size=80).filter(lambda t: not (t.isalnum() and len(t) <= 64)),
    ),
)


@hostile_settings(80)
@given(case=requests({"org_id": ORG_IDS, "key_id": KEY_IDS}))
async def test_revoke_api_key_refuses_malformed_ids(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """RevokeApiKey refuses malformed organization or key ids with INVALID_ARGUMENT and unknown keys with NOT_FOUND, changing nothing."""
    request = admin_pb2.RevokeApiKeyRequest(org_id=case["org_id"][0], key_id=case["key_id"][0])
    await hostile.send("RevokeApiKey", request, expect(verdict_of(case), NOT_FOUND))


ADJUST_UNITS = Rule(
    st.one_of(
        st.sampled_from([1, -1, MAX_UNITS, -MAX_UNITS]),
        st.integers(1, MAX_UNITS),
        st.integers(-MAX_UNITS, -1),
    ),
    st.one_of(
        st.sampled_from([0, MAX_UNITS + 1, -MAX_UNITS - 1, INT64_MIN, INT64_MAX, 2**53]),
        st.integers(MAX_UNITS + 1, INT64_MAX),
        st.integers(INT64_MIN, -MAX_UNITS - 1),
    ),
)
REASONS = Rule(
    st.one_of(st.text(min_size=1, max_size=20).filter(str.strip), st.just("r" * 256)),
    st.sampled_from(["", " ", "\t\n", "r" * 257, "\u00e9" * 257]),
)


@hostile_settings(150)
@given(
    case=requests(
        {
            "org_id": ORG_IDS,
            "metric": METRIC_NAMES,
            "units": ADJUST_UNITS,
            "reason": REASONS,
            "adjustment_id": REQUEST_IDS,
        }
    )
)
async def test_adjust_usage_refuses_malformed_corrections(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """AdjustUsage refuses bad ids, metric names, units of 0 or beyond 10^9 and blank or over-long reasons with INVALID_ARGUMENT, a metric outside the plan with FAILED_PRECONDITION, and a reused id with ALREADY_EXISTS, each changing nothing."""
    request = admin_pb2.AdjustUsageRequest(**{name: value for name, (value, _) in case.items()})
    in_plan = request.org_id == ORG and request.metric in ACME_METRICS
    accepted = (OK, EXISTS) if in_plan else (PRECONDITION,)
    await hostile.send("AdjustUsage", request, expect(verdict_of(case), *accepted))
    await hostile.assert_still_serving()


@hostile_settings(100)
@given(case=requests({"org_id": ORG_IDS, "grant_id": REQUEST_IDS, "reason": REASONS}))
async def test_void_credit_grant_refuses_malformed_requests(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """VoidCreditGrant refuses bad ids and blank or over-long reasons with INVALID_ARGUMENT and answers a grant the organization does not have with NOT_FOUND, each changing nothing."""
    request = admin_pb2.VoidCreditGrantRequest(**{name: value for name, (value, _) in case.items()})
    await hostile.send("VoidCreditGrant", request, expect(verdict_of(case), OK, NOT_FOUND))
    await hostile.assert_still_serving()


# Empty: every metric's grants.
GRANT_METRICS = Rule(
    st.one_of(st.just(""), METRIC_NAMES.valid),  # type: ignore[arg-type]
    METRIC_NAMES.invalid.filter(bool),  # type: ignore[union-attr]
)


@hostile_settings(60)
@given(case=requests({"org_id": ORG_IDS, "metric": GRANT_METRICS}))
async def test_list_credit_grants_refuses_malformed_requests(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """ListCreditGrants refuses a bad organization id or metric name with INVALID_ARGUMENT and changes nothing."""
    request = admin_pb2.ListCreditGrantsRequest(
        **{name: value for name, (value, _) in case.items()}
    )
    await hostile.send("ListCreditGrants", request, expect(verdict_of(case), OK))
    await hostile.assert_still_serving()


AUDIT_TOKENS = Rule(
    st.just(""),
    None,
    # Not a token this service issued: refused, or read as some position in the trail.
    st.one_of(
        st.text(max_size=64),
        st.tuples(st.integers(), st.integers()).map(lambda pair: f"{pair[0]}-{pair[1]}"),
        st.sampled_from(["0-0", "9" * 40 + "-1", "1-" + "9" * 40, "-", "1-", "-1", "a" * 600]),
    ),
)


@hostile_settings(100)
@given(case=requests({"org_id": ORG_IDS, "page_size": PAGE_SIZES, "page_token": AUDIT_TOKENS}))
async def test_list_audit_events_refuses_malformed_pages(
    hostile: Hostile, case: dict[str, Tagged]
) -> None:
    """ListAuditEvents answers a malformed organization id or page size with INVALID_ARGUMENT and a token it did not issue with INVALID_ARGUMENT or a page."""
    request = admin_pb2.ListAuditEventsRequest(**{name: value for name, (value, _) in case.items()})
    await hostile.send("ListAuditEvents", request, expect(verdict_of(case), OK))


# -- exactly at the limits ------------------------------------------------------------------


def _units(count: int) -> dict[str, int]:
    return {f"m{i}": 1 for i in range(count)}


def _plan(**fields: Any) -> admin_pb2.SetPlanRequest:
    base: dict[str, Any] = {"org_id": "limits", "timezone": "UTC"}
    base.update(fields)
    return admin_pb2.SetPlanRequest(plan=plan_pb2.Plan(**base))


def _stats(start: str, end: str) -> reporting_pb2.GetUsageStatisticsRequest:
    return reporting_pb2.GetUsageStatisticsRequest(org_id=ORG, start_date=start, end_date=end)


def _check(**fields: Any) -> quota_pb2.CheckQuotaRequest:
    base: dict[str, Any] = {"org_id": ORG, "units": {"pages": 1}}
    base.update(fields)
    return quota_pb2.CheckQuotaRequest(**base)


def _record(request_id: str, **fields: Any) -> quota_pb2.RecordUsageRequest:
    base: dict[str, Any] = {"org_id": ORG, "request_id": request_id, "units": {"pages": 1}}
    base.update(fields)
    return quota_pb2.RecordUsageRequest(**base)


def _rolling(**fields: Any) -> plan_pb2.MetricLimits:
    """A metric with a quota, which a rollover needs, and the rollover terms given."""
    return metric_limits("pages", contract_quota=100, **fields)


def _alerting(**alerts: Any) -> plan_pb2.MetricLimits:
    """A metric with a quota and the notification thresholds given."""
    return metric_limits("pages", contract_quota=100, alerts=plan_pb2.MetricAlerts(**alerts))


def _grant(grant_id: str, **fields: Any) -> admin_pb2.GrantCreditsRequest:
    base: dict[str, Any] = {"org_id": ORG, "metric": "pages", "units": 1, "grant_id": grant_id}
    base.update(fields)
    return admin_pb2.GrantCreditsRequest(**base)


LIMIT_CASES: list[tuple[str, Message, grpc.StatusCode]] = [
    ("CheckQuota", _check(org_id="o" * 64), OK),
    ("CheckQuota", _check(org_id="o" * 65), INVALID),
    ("CheckQuota", _check(hold=True, request_id="r" * 128), OK),
    ("CheckQuota", _check(hold=True, request_id="r" * 129), INVALID),
    ("CheckQuota", _check(units=_units(32)), OK),
    ("CheckQuota", _check(units=_units(33)), INVALID),
    ("CheckQuota", _check(units={"pages": 0}), OK),
    ("CheckQuota", _check(units={"pages": MAX_UNITS}), OK),
    ("CheckQuota", _check(units={"pages": MAX_UNITS + 1}), INVALID),
    ("CheckQuota", _check(units={"pages": -1}), INVALID),
    ("CheckQuota", _check(units={"m" * 32: 1}), OK),
    ("CheckQuota", _check(units={"m" * 33: 1}), INVALID),
    ("CheckQuota", _check(hold=True, request_id="ttl-1", hold_ttl=duration(1000)), OK),
    ("CheckQuota", _check(hold=True, request_id="ttl-2", hold_ttl=duration(86_400_000)), OK),
    ("CheckQuota", _check(hold=True, request_id="ttl-3", hold_ttl=duration(999)), INVALID),
    ("CheckQuota", _check(hold=True, request_id="ttl-4", hold_ttl=duration(86_400_001)), INVALID),
    ("RecordUsage", _record("apps-low", units={"apps": -MAX_UNITS}), OK),
    ("RecordUsage", _record("apps-lower", units={"apps": -MAX_UNITS - 1}), INVALID),
    ("RecordUsage", _record("pages-negative", units={"pages": -1}), INVALID),
    ("RecordUsage", _record("pages-max", units={"pages": MAX_UNITS}), OK),
    ("RecordUsage", _record("pages-over", units={"pages": MAX_UNITS + 1}), INVALID),
    ("RecordUsage", _record("type-64", document_type="d" * 64), OK),
    ("RecordUsage", _record("type-65", document_type="d" * 65), INVALID),
    ("RecordUsage", _record("newest", completed_at=ts(NEWEST_COMPLETED_MS)), OK),
    ("RecordUsage", _record("too-new", completed_at=ts(NEWEST_COMPLETED_MS + 1)), INVALID),
    ("RecordUsage", _record("oldest", completed_at=ts(OLDEST_COMPLETED_MS)), OK),
    ("RecordUsage", _record("too-old", completed_at=ts(OLDEST_COMPLETED_MS - 1)), INVALID),
    ("RecordUsage", _record("epoch", requested_at=ts(0)), OK),
    ("RecordUsage", _record("pre-epoch", requested_at=ts(-1000)), INVALID),
    ("RecordUsage", _record("q" * 128), OK),
    ("RecordUsage", _record("q" * 129), INVALID),
    ("ReleaseQuota", quota_pb2.ReleaseQuotaRequest(org_id=ORG, request_id="s" * 128), OK),
    ("ReleaseQuota", quota_pb2.ReleaseQuotaRequest(org_id=ORG, request_id="s" * 129), INVALID),
    ("ReleaseQuota", quota_pb2.ReleaseQuotaRequest(org_id=ORG, request_id=""), INVALID),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, year=2020, month=1), OK),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, year=2100, month=12), OK),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, year=2019, month=12), INVALID),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, year=2101, month=1), INVALID),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, year=2024, month=0), INVALID),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, year=2024, month=13), INVALID),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, year=2024), INVALID),
    ("GetUsage", quota_pb2.GetUsageRequest(org_id=ORG, month=3), INVALID),
    ("SetPlan", _plan(name="n" * 128), OK),
    ("SetPlan", _plan(name="n" * 129), INVALID),
    ("SetPlan", _plan(processing_priority="p" * 64, support_level="s" * 64), OK),
    ("SetPlan", _plan(processing_priority="p" * 65), INVALID),
    ("SetPlan", _plan(support_level="s" * 65), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits(f"m{i}") for i in range(32)]), OK),
    ("SetPlan", _plan(metrics=[metric_limits(f"m{i}") for i in range(33)]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages"), metric_limits("pages")]), INVALID),
    (
        "SetPlan",
        _plan(metrics=[metric_limits("pages", contract_quota=MAX_LIMIT, hard_limit=MAX_LIMIT)]),
        OK,
    ),
    ("SetPlan", _plan(metrics=[metric_limits("pages", contract_quota=MAX_LIMIT + 1)]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages", hard_limit=MAX_LIMIT + 1)]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages", contract_quota=-1)]), INVALID),
    (
        "SetPlan",
        _plan(metrics=[metric_limits("pages", price_per_unit="999999999999.999999999")]),
        OK,
    ),
    ("SetPlan", _plan(metrics=[metric_limits("pages", price_per_unit="9999999999999")]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages", price_per_unit="0.000000001")]), OK),
    ("SetPlan", _plan(metrics=[metric_limits("pages", price_per_unit="0.0000000001")]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages", overage_price_per_unit="1e3")]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages", overage_price_per_unit="NaN")]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages", overage_price_per_unit="-1")]), INVALID),
    ("SetPlan", _plan(metrics=[_rolling(rollover_percent=0)]), INVALID),
    ("SetPlan", _plan(metrics=[_rolling(rollover_percent=101)]), INVALID),
    ("SetPlan", _plan(metrics=[_rolling(rollover_percent=-1)]), INVALID),
    ("SetPlan", _plan(metrics=[_rolling(rollover_percent=2**31 - 1)]), INVALID),
    ("SetPlan", _plan(metrics=[_rolling(rollover_percent=5, rollover_cap=-1)]), INVALID),
    ("SetPlan", _plan(metrics=[_rolling(rollover_percent=5, rollover_cap=MAX_LIMIT + 1)]), INVALID),
    ("SetPlan", _plan(metrics=[_rolling(rollover_cap=5)]), INVALID),
    ("SetPlan", _plan(metrics=[metric_limits("pages", rollover_percent=5)]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(quota_percents=[0])]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(quota_percents=[1001])]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(quota_percents=[-80])]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(quota_percents=list(range(1, 12)))]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(hard_limit_percents=[101])]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(hard_limit_percents=[2**31 - 1])]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(credits_below=-1)]), INVALID),
    ("SetPlan", _plan(metrics=[_alerting(credits_below=MAX_LIMIT + 1)]), INVALID),
    (
        "SetPlan",
        _plan(metrics=[_alerting(grant_expiring_within=duration_pb2.Duration(seconds=0))]),
        INVALID,
    ),
    (
        "SetPlan",
        _plan(
            metrics=[
                _alerting(grant_expiring_within=duration_pb2.Duration(seconds=366 * 86_400 + 1))
            ]
        ),
        INVALID,
    ),
    (
        "SetPlan",
        _plan(metrics=[_alerting(grant_expiring_within=duration_pb2.Duration(seconds=-5))]),
        INVALID,
    ),
    (
        "SetPlan",
        _plan(
            metrics=[_alerting(grant_expiring_within=duration_pb2.Duration(seconds=1, nanos=-1))]
        ),
        INVALID,
    ),
    ("SetPlan", _plan(timezone="Europe/Berlin"), OK),
    ("SetPlan", _plan(timezone="Mars/Olympus_Mons"), INVALID),
    ("SetPlan", admin_pb2.SetPlanRequest(), INVALID),
    ("GetPlan", admin_pb2.GetPlanRequest(org_id="g" * 64), NOT_FOUND),
    ("GetPlan", admin_pb2.GetPlanRequest(org_id="g" * 65), INVALID),
    ("GetPlan", admin_pb2.GetPlanRequest(org_id=""), INVALID),
    ("GrantCredits", _grant("grant-max", units=MAX_UNITS), OK),
    ("GrantCredits", _grant("grant-over", units=MAX_UNITS + 1), INVALID),
    ("GrantCredits", _grant("grant-zero", units=0), INVALID),
    ("GrantCredits", _grant("grant-reason", reason="r" * 256), OK),
    ("GrantCredits", _grant("grant-long-reason", reason="r" * 257), INVALID),
    ("GrantCredits", _grant("g" * 128), OK),
    ("GrantCredits", _grant("g" * 129), INVALID),
    ("GrantCredits", _grant("grant-no-plan", org_id=NO_PLAN_ORG), PRECONDITION),
    ("GrantCredits", _grant("grant-other-metric", metric="credits"), PRECONDITION),
    ("GrantCredits", _grant("grant-1", units=2), EXISTS),
    ("GrantCredits", _grant("rollover-2026-03-pages"), INVALID),
    ("GrantCredits", _grant("prepaid-pages"), INVALID),
    ("GrantCredits", _grant("my-rollover-prepaid-"), OK),
    ("GetUsageHistory", reporting_pb2.GetUsageHistoryRequest(org_id=ORG, months=24), OK),
    ("GetUsageHistory", reporting_pb2.GetUsageHistoryRequest(org_id=ORG, months=1), OK),
    ("GetUsageHistory", reporting_pb2.GetUsageHistoryRequest(org_id=ORG, months=25), INVALID),
    ("GetUsageHistory", reporting_pb2.GetUsageHistoryRequest(org_id=ORG, months=-1), INVALID),
    ("GetUsageStatistics", _stats("2024-01-01", "2024-12-31"), OK),
    ("GetUsageStatistics", _stats("2024-01-01", "2025-01-01"), INVALID),
    ("GetUsageStatistics", _stats("2024-01-02", "2024-01-01"), INVALID),
    ("GetUsageStatistics", _stats("2000-01-01", "2000-01-01"), OK),
    ("GetUsageStatistics", _stats("1999-12-31", "2000-01-01"), INVALID),
    ("GetUsageStatistics", _stats("2100-12-31", "2100-12-31"), OK),
    ("GetUsageStatistics", _stats("2100-12-31", "2101-01-01"), INVALID),
    ("ListUsageRecords", reporting_pb2.ListUsageRecordsRequest(org_id=ORG, page_size=1000), OK),
    ("ListUsageRecords", reporting_pb2.ListUsageRecordsRequest(org_id=ORG, page_size=1), OK),
    (
        "ListUsageRecords",
        reporting_pb2.ListUsageRecordsRequest(org_id=ORG, page_size=1001),
        INVALID,
    ),
    ("ListUsageRecords", reporting_pb2.ListUsageRecordsRequest(org_id=ORG, page_size=-1), INVALID),
]


async def test_values_exactly_at_the_limits_are_accepted_and_one_past_refused(
    hostile: Hostile,
) -> None:
    """Every RPC accepts each documented limit exactly (64/128 characters, 32 metrics, 10^9 units, 10^15 limits, 12+9 price digits, 1 s and 24 h holds, the record window, 2020-2100, 24 months, 366 days, 1000 records) and refuses one past it."""
    for rpc, request, code in LIMIT_CASES:
        await hostile.send(rpc, request, {code})
    await hostile.assert_still_serving()


# -- server bugs these requests found, now fixed: each stays as a regression test --


@pytest.mark.parametrize(
    "name",
    [
        *(pytest.param(zone) for zone in ("America", "Etc", "US", "America/Argentina")),
        pytest.param("A" * 256, id="256-characters"),
    ],
)
async def test_timezone_that_is_no_zone_file_is_invalid_argument(
    hostile: Hostile, name: str
) -> None:
    """SetPlan refuses a timezone that names no zone file (a folder, an over-long name) with INVALID_ARGUMENT."""
    await hostile.send("SetPlan", _plan(timezone=name), {INVALID})


@pytest.mark.parametrize("field_name", ["start_date", "end_date"])
@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_date_times_at_the_calendar_edges_are_invalid_date_format(
    hostile: Hostile, field_name: str, text: str
) -> None:
    """GetUsageStatistics answers a date-time at the edge of the calendar with INVALID_ARGUMENT and INVALID_DATE_FORMAT."""
    request = reporting_pb2.GetUsageStatisticsRequest(org_id=ORG)
    setattr(request, field_name, text)
    answer = await hostile.send("GetUsageStatistics", request, {INVALID})
    assert [info.reason for info in answer.error_infos] == ["INVALID_DATE_FORMAT"]


@pytest.mark.parametrize("rpc", ["CheckQuota", "SetPlan"])
async def test_many_violations_still_arrive_as_a_bad_request(hostile: Hostile, rpc: str) -> None:
    """A request breaking a hundred rules is still answered INVALID_ARGUMENT with a readable BadRequest."""
    if rpc == "CheckQuota":
        request: Message = _check(units={f"Bad{i}": 1 for i in range(100)})
    else:
        request = _plan(metrics=[metric_limits(f"m{i}", price_per_unit="x") for i in range(100)])
    await hostile.send(rpc, request, {INVALID})


async def test_an_out_of_range_requested_at_never_breaks_the_records_list(
    hostile: Hostile,
) -> None:
    """After a RecordUsage with requested_at far outside the Timestamp range, ListUsageRecords still answers a page."""
    record = _record(
        "far-requested", requested_at=timestamp_pb2.Timestamp(seconds=INT64_MAX, nanos=INT32_MAX)
    )
    await hostile.send("RecordUsage", record, {OK, INVALID})
    listing = reporting_pb2.ListUsageRecordsRequest(org_id=ORG)
    await hostile.send("ListUsageRecords", listing, {OK})


@pytest.mark.parametrize(
    "requested_at",
    [
        pytest.param(
            timestamp_pb2.Timestamp(seconds=0, nanos=-1_000_000), id="before-1970-by-nanos"
        ),
        pytest.param(
            timestamp_pb2.Timestamp(seconds=LAST_TIMESTAMP_MS // 1000 + 1), id="year-10000"
        ),
    ],
)
async def test_requested_at_outside_the_timestamp_range_is_invalid_argument(
    hostile: Hostile, requested_at: timestamp_pb2.Timestamp
) -> None:
    """RecordUsage refuses a requested_at outside protobuf's Timestamp range (before 1970 or after 9999) with INVALID_ARGUMENT."""
    await hostile.send(
        "RecordUsage", _record("odd-requested", requested_at=requested_at), {INVALID}
    )


@pytest.mark.parametrize("price", ["\u0661\u0662", "\uff11.5"])
async def test_prices_with_non_ascii_digits_are_invalid_argument(
    hostile: Hostile, price: str
) -> None:
    """SetPlan refuses a price written with digits other than 0-9 with INVALID_ARGUMENT."""
    request = _plan(metrics=[metric_limits("pages", price_per_unit=price)])
    await hostile.send("SetPlan", request, {INVALID})


@pytest.mark.parametrize("rpc", sorted(ALLOWED))
async def test_undecodable_request_bytes_are_invalid_argument(hostile: Hostile, rpc: str) -> None:
    """Every RPC answers request bytes that do not decode (invalid UTF-8, corrupt wire format) with INVALID_ARGUMENT and changes nothing."""
    call = hostile.server.channel.unary_unary(method_path(rpc), None, None)
    before = hostile.snapshot()
    SENT[rpc] += 1
    try:
        await call(b"\x0a\x02\xff\xfe", timeout=RPC_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        code, message = error.code(), error.details()
    else:
        code, message = OK, ""
    assert hostile.snapshot() == before
    await hostile.assert_still_serving()
    assert code is INVALID, f"{rpc} answered undecodable bytes with {code.name} {message!r}"


# -- webhooks -------------------------------------------------------------------------

_UNKNOWN_ENDPOINT = "we_" + "0" * 24
_W = webhooks_pb2
_WEBHOOK_CASES: list[tuple[str, Message, frozenset[grpc.StatusCode]]] = [
    ("CreateWebhookEndpoint", _W.CreateWebhookEndpointRequest(url=""), frozenset({INVALID})),
    *(
        ("CreateWebhookEndpoint", _W.CreateWebhookEndpointRequest(url=url), frozenset({INVALID}))
        for url in (
            "ftp://example.com/hook",
            "javascript:alert(1)",
            "http://",
            "http:///path",
            "https://example.com/a b",
            "https://example.com/\x00",
            "https://exa\u0301mple.com/",
            "https://example.com:99999/",
            "https://example.com/#frag",
            "https://example.com/" + "a" * 2100,
        )
    ),
    (
        "CreateWebhookEndpoint",
        _W.CreateWebhookEndpointRequest(org_id="a b", url="https://example.com/h"),
        frozenset({INVALID}),
    ),
    (
        "CreateWebhookEndpoint",
        _W.CreateWebhookEndpointRequest(url="https://example.com/h", event_types=["nope"]),
        frozenset({INVALID}),
    ),
    (
        "CreateWebhookEndpoint",
        _W.CreateWebhookEndpointRequest(
            url="https://example.com/h", event_types=["plan.changed", "plan.changed"]
        ),
        frozenset({INVALID}),
    ),
    (
        "CreateWebhookEndpoint",
        _W.CreateWebhookEndpointRequest(url="https://example.com/h", description="d" * 300),
        frozenset({INVALID}),
    ),
    ("GetWebhookEndpoint", _W.GetWebhookEndpointRequest(endpoint_id="x"), frozenset({INVALID})),
    (
        "GetWebhookEndpoint",
        _W.GetWebhookEndpointRequest(endpoint_id=_UNKNOWN_ENDPOINT),
        frozenset({NOT_FOUND}),
    ),
    ("ListWebhookEndpoints", _W.ListWebhookEndpointsRequest(org_id="/"), frozenset({INVALID})),
    ("ListWebhookEndpoints", _W.ListWebhookEndpointsRequest(page_size=-1), frozenset({INVALID})),
    (
        "ListWebhookEndpoints",
        _W.ListWebhookEndpointsRequest(page_token="garbage"),
        frozenset({INVALID}),
    ),
    (
        "UpdateWebhookEndpoint",
        _W.UpdateWebhookEndpointRequest(endpoint_id=_UNKNOWN_ENDPOINT),
        frozenset({INVALID}),
    ),
    (
        "UpdateWebhookEndpoint",
        _W.UpdateWebhookEndpointRequest(endpoint_id=_UNKNOWN_ENDPOINT, update_mask=["org_id"]),
        frozenset({INVALID}),
    ),
    (
        "UpdateWebhookEndpoint",
        _W.UpdateWebhookEndpointRequest(
            endpoint_id=_UNKNOWN_ENDPOINT, url="gopher://x", update_mask=["url"]
        ),
        frozenset({INVALID}),
    ),
    (
        "UpdateWebhookEndpoint",
        _W.UpdateWebhookEndpointRequest(
            endpoint_id=_UNKNOWN_ENDPOINT, enabled=True, update_mask=["enabled"]
        ),
        frozenset({NOT_FOUND}),
    ),
    (
        "DeleteWebhookEndpoint",
        _W.DeleteWebhookEndpointRequest(endpoint_id="we_x"),
        frozenset({INVALID}),
    ),
    (
        "RotateWebhookSecret",
        _W.RotateWebhookSecretRequest(endpoint_id=_UNKNOWN_ENDPOINT, overlap_seconds=-1),
        frozenset({INVALID}),
    ),
    (
        "RotateWebhookSecret",
        _W.RotateWebhookSecretRequest(endpoint_id=_UNKNOWN_ENDPOINT, overlap_seconds=INT64_MAX),
        frozenset({INVALID}),
    ),
    (
        "RotateWebhookSecret",
        _W.RotateWebhookSecretRequest(endpoint_id=_UNKNOWN_ENDPOINT),
        frozenset({NOT_FOUND}),
    ),
    (
        "ListWebhookDeliveries",
        _W.ListWebhookDeliveriesRequest(endpoint_id=_UNKNOWN_ENDPOINT, page_size=5000),
        frozenset({INVALID}),
    ),
    (
        "ListWebhookDeliveries",
        _W.ListWebhookDeliveriesRequest(endpoint_id=_UNKNOWN_ENDPOINT, page_token="x"),
        frozenset({INVALID}),
    ),
    (
        "ListWebhookDeadLetters",
        _W.ListWebhookDeadLettersRequest(endpoint_id=_UNKNOWN_ENDPOINT),
        frozenset({NOT_FOUND}),
    ),
    (
        "ReplayWebhookEvents",
        _W.ReplayWebhookEventsRequest(endpoint_id=_UNKNOWN_ENDPOINT, event_id="acme:notanid"),
        frozenset({INVALID}),
    ),
    (
        "ReplayWebhookEvents",
        _W.ReplayWebhookEventsRequest(endpoint_id=_UNKNOWN_ENDPOINT),
        frozenset({INVALID}),
    ),
    (
        "ReplayWebhookEvents",
        _W.ReplayWebhookEventsRequest(
            endpoint_id=_UNKNOWN_ENDPOINT,
            org_id=ORG,
            start_time=timestamp_pb2.Timestamp(seconds=2000),
            end_time=timestamp_pb2.Timestamp(seconds=1000),
        ),
        frozenset({INVALID}),
    ),
    (
        "ReplayWebhookEvents",
        _W.ReplayWebhookEventsRequest(
            endpoint_id=_UNKNOWN_ENDPOINT,
            org_id=ORG,
            start_time=timestamp_pb2.Timestamp(seconds=-(10**12)),
            end_time=timestamp_pb2.Timestamp(seconds=1000),
        ),
        frozenset({INVALID}),
    ),
    (
        "ReplayWebhookEvents",
        _W.ReplayWebhookEventsRequest(endpoint_id=_UNKNOWN_ENDPOINT, event_id=ORG + ":1-0"),
        frozenset({NOT_FOUND}),
    ),
]


@pytest.mark.parametrize(
    ("rpc", "request_", "expected"),
    _WEBHOOK_CASES,
    ids=[f"{rpc}-{n}" for n, (rpc, _, _) in enumerate(_WEBHOOK_CASES)],
)
async def test_webhook_rpcs_refuse_hostile_input_and_write_nothing(
    hostile: Hostile, rpc: str, request_: Message, expected: frozenset[grpc.StatusCode]
) -> None:
    """WebhookService refuses malformed endpoints, ids, masks, pages and replays with INVALID_ARGUMENT (unknown endpoints NOT_FOUND) and changes no key."""
    await hostile.send(rpc, request_, expected)
    await hostile.assert_still_serving()
