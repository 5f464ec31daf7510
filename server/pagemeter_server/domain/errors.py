"""Every failure the rules and the store report, in one place.

api/status.py turns each into a gRPC status with google.rpc details; nothing
below the api layer knows about gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- refused configuration ------------------------------------------------------------


class ConfigurationError(RuntimeError):
    """Credentials or access settings that the server must not start with."""


# -- refused callers -------------------------------------------------------------------


class AuthError(Exception):
    """A refused caller; `reason` goes into a google.rpc.ErrorInfo."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unauthenticated(AuthError):
    """No credential, or one that is not valid."""


class PermissionDenied(AuthError):
    """A valid credential whose role may not make this call."""


class NotFound(AuthError):
    """The thing named by the request does not exist."""


class ReadRateLimited(Exception):
    """A tenant key over its read flood limit."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(retry_after_ms)
        self.retry_after_ms = retry_after_ms


# -- malformed requests ----------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


class InvalidArgument(Exception):
    """The request is malformed; nothing was changed.

    `reason`, when set, is a machine-readable code sent as a google.rpc.ErrorInfo
    (the statistics errors use the codes of the DocuRift page).
    """

    def __init__(self, violations: list[Violation], reason: str = "") -> None:
        super().__init__("; ".join(v.description for v in violations))
        self.violations = violations
        self.reason = reason


class BadPageToken(ValueError):
    """A page token this server did not issue for this list and organization."""


# -- refused by the store ----------------------------------------------------------------


class StoreError(Exception):
    """Base class of errors the store reports to the service."""


class RequestIdReused(StoreError):
    """The request_id (or grant_id) already belongs to a different payload."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class NegativeUnits(StoreError):
    """Negative units were sent for a metric that is not a lifetime gauge."""

    def __init__(self, metric: str) -> None:
        super().__init__(metric)
        self.metric = metric


class TooManyMetrics(StoreError):
    """A record names a metric not in the plan, and the org already uses the most allowed."""

    def __init__(self, metric: str, cap: int) -> None:
        super().__init__(metric)
        self.metric = metric
        self.cap = cap


class LimitReached(StoreError):
    """An organization has the most of something it may have; `reason` names what."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotReady(StoreError):
    """What was asked for cannot be done yet, or any more (a billing month that has
    not ended, or whose counters are gone); `reason` names why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PlansNotMigrated(StoreError):
    """A plan uses what only the current plan document can hold, and the deployment's
    plans are still written in schema 1 (store/plan_migration.py)."""


class PlanMissing(StoreError):
    """The organization has no plan (or the plan lacks the metric)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class PlanNotFound(StoreError):
    """A read of an organization's plan found none."""

    def __init__(self, org_id: str) -> None:
        super().__init__(org_id)
        self.org_id = org_id


class ItemFailed(StoreError):
    """A batch item whose script raised an error; the other items are unaffected."""
