"""The typed shapes of calls to the rules and of their answers.

Handlers build a call object once; the store turns it into a script call and
the script's reply back into these answers (store/replies.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pagemeter_server.domain.periods import Month, WindowSpan
from pagemeter_server.domain.plans import PlanDoc


@dataclass(frozen=True)
class WindowState:
    """One window of a metric as a script found it (see decide_windows in _lib.lua)."""

    window: str  # "minute" | "hour" | "day" | "week"
    limit: int
    soft: bool
    # CheckQuota: committed in the window plus live holds, before the call.
    # RecordUsage: committed in the window after the record.
    used: int
    exceeded: bool
    shadow: bool = False


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    allowed: bool
    reason: int
    requested: int
    committed: int
    held: int
    contract_quota: int | None
    hard_limit: int | None
    overage_allowed: bool
    max_admissible: int | None
    remaining: int | None
    included: int
    prepaid: int
    overage: int
    overage_price: str
    prepaid_available: int
    lifetime: bool
    # Decisions stored before windows existed (a held job's first answer) have none.
    windows: tuple[WindowState, ...] = ()
    denied_by: str = ""  # the hard window that denied, for WINDOW_LIMIT_EXCEEDED
    # What a shadow limit would answer (a DecisionReason), and its window.
    would_deny: int | None = None
    would_deny_window: str = ""


@dataclass(frozen=True)
class CheckResult:
    outcome: Literal["ok", "no_plan", "rate_limited"]
    allowed: bool
    held: bool
    hold_expires_ms: int
    duplicate: bool
    retry_after_ms: int
    month: Month
    metrics: list[MetricCheck]
    # Units of holds this call found expired, per metric.
    expired: dict[str, int] = field(default_factory=dict)
    # The instant the windows were decided at, and the windows that contain it
    # (minute, hour, day, week; empty when no metric of the answer has windows).
    now_ms: int = 0
    spans: tuple[WindowSpan, ...] = ()


@dataclass(frozen=True)
class MetricRecord:
    metric: str
    units: int
    included: int
    prepaid: int
    overage: int
    committed: int
    contract_quota: int | None
    hard_limit: int | None
    over_contract_quota: bool
    over_hard_limit: bool
    overage_not_allowed: bool
    lifetime: bool
    overage_price: str
    # In the plan when it was recorded (results stored before this column
    # existed read as planned).
    planned: bool = True
    windows: tuple[WindowState, ...] = ()
    over_spend_cap: bool = False


@dataclass(frozen=True)
class RecordResult:
    duplicate: bool
    status: Literal["completed", "failed"]
    hold_released: bool
    hold_expired: bool
    over_limit: bool
    month_id: str
    completed_ms: int
    metrics: list[MetricRecord]
    expired: dict[str, int] = field(default_factory=dict)
    # The job's document type counted as '_other' in the statistics (the org
    # uses the most document types allowed).
    document_type_folded: bool = False
    # The windows that contain completed_ms (empty when no metric has windows).
    spans: tuple[WindowSpan, ...] = ()


@dataclass(frozen=True)
class ReleaseResult:
    outcome: Literal["released", "already_released", "expired", "already_recorded", "not_found"]
    released: dict[str, int]
    expired: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredPlan:
    """A plan as stored: the server-built document and its version."""

    doc: PlanDoc
    version: int
    updated_ms: int


@dataclass(frozen=True)
class PlanVersion:
    """One version of an organization's plan, as kept in its plan log."""

    version: int
    updated_ms: int
    doc: PlanDoc


@dataclass(frozen=True)
class UsageSnapshot:
    """One month of an organization, read atomically.

    `plan` is the plan version whose terms applied to the month (for a past
    month the one in effect at its end; None when there was none yet).
    """

    plan: StoredPlan | None
    timezone: str  # the calendar token (domain/periods.py)
    month: Month
    month_fields: dict[str, int]
    lifetime_fields: dict[str, int]
    held_fields: dict[str, int]
    credits: dict[str, int]
    previous_month_fields: dict[str, int]
    expired: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckCall:
    """One CheckQuota's inputs, as the store needs them."""

    units: Mapping[str, int]
    request_id: str = ""
    hold: bool = False
    hold_ttl_ms: int = 0
    # How long the job's record outlives its hold; None: the service's
    # --record-retention-days (Envoy's calls keep theirs shorter, api/ratelimit.py).
    record_ttl_ms: int | None = None


@dataclass(frozen=True)
class RecordCall:
    """One RecordUsage's inputs, as the store needs them."""

    request_id: str
    units: Mapping[str, int]
    completed_ms: int
    completed_given: bool
    success: bool
    requested_ms: int | None = None
    document_type: str = ""
    # How long the job's record is kept; None: --record-retention-days.
    record_ttl_ms: int | None = None
