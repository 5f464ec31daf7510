# Generated from client/pagemeter_client/_async/client.py by `make unasync`; do not edit.
"""The pagemeter client on `grpc`, and its reservations.

Written once, as the async client: `make unasync` (tools/unasync.py) generates
the blocking client from it, and the first line of a generated module says so.
Both clients send every call with a deadline and let gRPC itself retry UNAVAILABLE
with the same request message (see pagemeter_client.sdk for the whole story).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Self

import grpc

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    plan_pb2,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from pagemeter_client._channel import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    ChannelOptions,
    Metadata,
    Stubs,
    _ClientConfig,
)
from pagemeter_client._coalesce import (
    DEFAULT_LINGER,
    DEFAULT_MAX_ITEMS,
    RECORD,
    Batching,
    Coalescer,
)
from pagemeter_client._concurrency import (
    Lock,
    StateLock,
    StopFlag,
    Worker,
    run_blocking_sync,
    sleep_sync,
)
from pagemeter_client._errors import (
    QuotaDenied,
    UsageQueued,
    _forget_delivered,
    _note_outbox_unusable,
    _release_quietly,
    _retry_seconds,
    _settle_first_attempt,
    error_details,
)
from pagemeter_client._jobs import (
    RELEASE_RETRY_PAUSE,
    RELEASE_WINDOW,
    _note_settle_failure,
    _note_settle_queued,
    _outcome_unknown,
    _ReservationState,
)
from pagemeter_client._messages import (
    StatisticsGroupingName,
    StatisticsPeriodName,
    _next_token,
    adjust_usage_request,
    check_quota_request,
    get_usage_history_request,
    get_usage_request,
    get_usage_statistics_request,
    grant_credits_request,
    joined_statistics,
    list_usage_records_request,
    new_request_id,
    record_usage_request,
    replay_webhook_events_request,
    rotate_webhook_secret_request,
    update_webhook_endpoint_request,
)
from pagemeter_client._sync.replay import replay_sync
from pagemeter_client.outbox import DeliveryPass, FlushResult, Outbox, OutboxEntry, OutboxError
from pagemeter_client.replay import (
    AcknowledgedLog,
    Observer,
    ReplayResult,
    ReplayStats,
    ReplayWindow,
)

log = logging.getLogger("pagemeter_client")

# Seconds between the background flusher's delivery passes, by default.
DEFAULT_FLUSH_INTERVAL = 15.0


class Reservation(_ReservationState):
    """Units held for one job by `PagemeterClient.reserve`."""

    def __init__(
        self,
        client: PagemeterClient,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        decision: quota_pb2.CheckQuotaResponse,
    ) -> None:
        super().__init__(org_id, request_id, units, decision)
        self._client = client

    def commit(
        self,
        units: Mapping[str, int] | None = None,
        *,
        document_type: str = "",
        completed_at: datetime | None = None,
    ) -> quota_pb2.RecordUsageResponse:
        """Record the job as done with `units` (default: the reserved units); frees the hold.

        With the client's outbox, raises UsageQueued when the record is stored for later.
        """
        self.settled = True
        return self._client.record_usage(
            self.org_id,
            self.request_id,
            self.units if units is None else units,
            document_type=document_type,
            completed_at=completed_at,
        )

    def fail(
        self, *, document_type: str = "", completed_at: datetime | None = None
    ) -> quota_pb2.RecordUsageResponse:
        """Record the job as failed: counted as a failed job, consumes nothing, frees the hold.

        With the client's outbox, raises UsageQueued when the record is stored for later.
        """
        self.settled = True
        return self._client.record_usage(
            self.org_id,
            self.request_id,
            self.units,
            success=False,
            document_type=document_type,
            completed_at=completed_at,
        )

    def release(self) -> quota_pb2.ReleaseQuotaResponse:
        """Drop the hold of a job that will not run; nothing is recorded."""
        self.settled = True
        return self._client.release_quota(self.org_id, self.request_id)


class PagemeterClient:
    """pagemeter on `grpc`. Use as `with PagemeterClient(...) as client:`.

    Every call has a deadline (`timeout` seconds, or the call's own `timeout`), and
    UNAVAILABLE is retried by gRPC with the same request message, up to
    `max_attempts` attempts in all. Failed calls raise `grpc.RpcError`.
    The async client opens its channel on the first call, in that call's event
    loop: use one async client per event loop. The blocking client opens its
    channel at once and may be shared by threads; its background work (outbox
    flusher, replay) runs in daemon threads instead of tasks.

    `token` is sent as `authorization: Bearer <token>` with every call (admin or
    service token, or tenant API key; with a tenant key, call the reads with
    org_id "", their default). `tls=True` turns on TLS: `root_certificates` is the
    PEM CA (None: the system's roots), `client_certificate` and `client_key` (both
    or neither) a client certificate for mutual TLS, `tls_server_name` the name the
    server's certificate is checked against instead of the target's host.

    `outbox` (an Outbox) makes RecordUsage durable: see `record_usage`,
    `flush_outbox` and `start_outbox_flusher`; close() delivers its due records
    unless flush_outbox_on_close=False. The client does not close the outbox.

    `batching` (on by default) sends concurrent check_quota and record_usage
    calls of the async client together as CheckQuotaBatch and RecordUsageBatch
    RPCs: the first call of a batch waits up to `batch_linger` seconds (0 to 1)
    for others, a batch holds up to `batch_max_items` calls (1 to 1,000), and
    each caller gets what its single RPC would have answered
    (pagemeter_client._coalesce). The blocking client sends each call alone.
    With batching, the outbox's delivery passes send records in batches of
    `batch_max_items`. batching=False: one RPC per call, everywhere.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = 5,
        initial_backoff: float = 0.2,
        max_backoff: float = 2.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        options: ChannelOptions = (),
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        tls_server_name: str | None = None,
        outbox: Outbox | None = None,
        flush_outbox_on_close: bool = True,
        replay_after_failover: ReplayWindow | None = None,
        batching: bool = True,
        batch_linger: float = DEFAULT_LINGER,
        batch_max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        batch_settings = Batching(batching, batch_linger, batch_max_items)
        self._outbox = outbox
        self._flush_outbox_on_close = flush_outbox_on_close
        self._acknowledged = (
            None if replay_after_failover is None else AcknowledgedLog(replay_after_failover)
        )
        self._config = _ClientConfig(
            target,
            timeout=timeout,
            max_attempts=max_attempts,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            credentials=credentials,
            metadata=metadata,
            options=options,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
        )
        observer = (
            None if self._acknowledged is None else Observer(self._acknowledged, self._replay_soon)
        )
        self._stubs = Stubs(self._config, observer)
        self._coalescer = Coalescer(self._stubs, self._config, batch_settings)
        self._flusher: tuple[Worker, StopFlag] | None = None
        self._flusher_lock = StateLock()
        self._replayer: Worker | None = None
        self._replay_again = False
        self._replay_stop = StopFlag()
        self._replay_state = StateLock()  # guards _replayer and _replay_again
        self._replay_pass = Lock()  # one pass at a time

    def __repr__(self) -> str:
        return self._config.describe(type(self).__name__)

    @property
    def target(self) -> str:
        return self._config.target

    @property
    def _quota(self) -> quota_pb2_grpc.QuotaServiceStub:
        return self._stubs.quota

    @property
    def _admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return self._stubs.admin

    @property
    def _reporting(self) -> reporting_pb2_grpc.ReportingServiceStub:
        return self._stubs.reporting

    @property
    def _billing(self) -> billing_pb2_grpc.BillingServiceStub:
        return self._stubs.billing

    @property
    def _events(self) -> events_pb2_grpc.EventServiceStub:
        return self._stubs.events

    @property
    def _webhooks(self) -> webhooks_pb2_grpc.WebhookServiceStub:
        return self._stubs.webhooks

    def close(self) -> None:
        """Stop the outbox flusher, deliver the outbox's due records, close the channel.

        The delivery pass runs only with an outbox and flush_outbox_on_close
        (the default); it stops at the first sign that pagemeter is unreachable.
        """
        try:
            self._stop_replayer()
            self.stop_outbox_flusher()
            if self._outbox is not None and self._flush_outbox_on_close:
                try:
                    self._flush(self._outbox, force=False, limit=None, timeout=None)
                except (sqlite3.Error, OutboxError) as problem:
                    log.warning("outbox %s: delivery on close failed: %s", self._outbox, problem)
        finally:
            self._coalescer.close()
            self._stubs.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # QuotaService

    def check_quota(
        self,
        org_id: str,
        units: Mapping[str, int],
        *,
        request_id: str | None = None,
        hold: bool = False,
        hold_ttl: float | timedelta | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.CheckQuotaResponse:
        """May `units` be used now? With hold=True, reserve them for request_id (made if None)."""
        request = check_quota_request(
            org_id, units, request_id=request_id, hold=hold, hold_ttl=hold_ttl
        )
        return self._coalescer.check_quota(request, timeout)

    def record_usage(
        self,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        *,
        success: bool = True,
        document_type: str = "",
        requested_at: datetime | None = None,
        completed_at: datetime | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.RecordUsageResponse:
        """Record a finished job (idempotent by request_id); frees its hold.

        With an outbox the request is stored before it is sent, with completed_at
        fixed (the caller's, else that of the job's first attempt); a transient
        failure leaves it stored and raises UsageQueued, a refusal leaves it as a
        dead letter and raises the error.
        """
        request = record_usage_request(
            org_id,
            request_id,
            units,
            success=success,
            document_type=document_type,
            requested_at=requested_at,
            completed_at=completed_at,
        )
        if self._outbox is not None:
            return self._record_durably(self._outbox, request, self._config.deadline(timeout))
        return self._coalescer.record_usage(request, timeout)

    def _record_durably(
        self, outbox: Outbox, request: quota_pb2.RecordUsageRequest, deadline: float
    ) -> quota_pb2.RecordUsageResponse:
        # Stored (on disk) before it is sent, held for the call: a crash at any
        # point leaves it delivered, or in the outbox, or both (then the
        # redelivery is a duplicate, counted once).
        try:
            entry = run_blocking_sync(
                outbox._store, request, claim_for=deadline + outbox.lease_margin
            )
        except (sqlite3.Error, OutboxError) as problem:
            log.warning("outbox %s: cannot store a record, sending it without: %s", outbox, problem)
            try:
                return self._quota.RecordUsage(
                    request, timeout=deadline, metadata=self._config.call_metadata()
                )
            except grpc.RpcError as error:
                _note_outbox_unusable(error, outbox, problem)
                raise
        try:
            response = self._coalescer.record_usage(entry.request, deadline)
        except grpc.RpcError as error:
            queued = run_blocking_sync(_settle_first_attempt, outbox, entry, error)
            if queued is None:
                raise
            raise queued from error
        except BaseException:
            _release_quietly(outbox, entry.id)
            raise
        run_blocking_sync(_forget_delivered, outbox, entry.id)
        return response

    def release_quota(
        self, org_id: str, request_id: str, *, timeout: float | None = None
    ) -> quota_pb2.ReleaseQuotaResponse:
        """Free the hold of a job that will not run (idempotent)."""
        request = quota_pb2.ReleaseQuotaRequest(org_id=org_id, request_id=request_id)
        return self._quota.ReleaseQuota(request, **self._config.call_options(timeout))

    def check_quota_batch(
        self, items: Sequence[quota_pb2.CheckQuotaRequest], *, timeout: float | None = None
    ) -> quota_pb2.CheckQuotaBatchResponse:
        """Up to 1,000 checks in one call, answered item by item (build items with
        check_quota_request). Retrying the call is safe for holds with request ids."""
        request = quota_pb2.CheckQuotaBatchRequest(items=list(items))
        return self._quota.CheckQuotaBatch(request, **self._config.call_options(timeout))

    def record_usage_batch(
        self, items: Sequence[quota_pb2.RecordUsageRequest], *, timeout: float | None = None
    ) -> quota_pb2.RecordUsageBatchResponse:
        """Up to 1,000 records in one call, answered item by item (build items with
        record_usage_request); retrying the call counts nothing twice."""
        request = quota_pb2.RecordUsageBatchRequest(items=list(items))
        return self._quota.RecordUsageBatch(request, **self._config.call_options(timeout))

    def get_usage(
        self,
        org_id: str = "",
        *,
        year: int | None = None,
        month: int | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.GetUsageResponse:
        """One billing period's usage: a calendar month in the plan's timezone, or a
        month or year from its billing_anchor (default: the period in progress; with
        year and month, the period that starts in that month)."""
        request = get_usage_request(org_id, year=year, month=month)
        return self._quota.GetUsage(request, **self._config.call_options(timeout))

    # AdminService

    def set_plan(
        self, plan: plan_pb2.Plan, *, validate_only: bool = False, timeout: float | None = None
    ) -> admin_pb2.SetPlanResponse:
        """Create or replace plan.org_id's whole plan; with validate_only, only check
        it and answer it as it would be stored."""
        return self._admin.SetPlan(
            admin_pb2.SetPlanRequest(plan=plan, validate_only=validate_only),
            **self._config.call_options(timeout),
        )

    def list_plans(
        self, page_size: int = 0, page_token: str = "", *, timeout: float | None = None
    ) -> admin_pb2.ListPlansResponse:
        """One page of every organization's plan, by organization id."""
        return self._admin.ListPlans(
            admin_pb2.ListPlansRequest(page_size=page_size, page_token=page_token),
            **self._config.call_options(timeout),
        )

    def get_plan(self, org_id: str, *, timeout: float | None = None) -> admin_pb2.GetPlanResponse:
        """Read an organization's plan (NOT_FOUND when it has none)."""
        return self._admin.GetPlan(
            admin_pb2.GetPlanRequest(org_id=org_id),
            **self._config.call_options(timeout),
        )

    def grant_credits(
        self,
        org_id: str,
        metric: str,
        units: int,
        grant_id: str,
        reason: str = "",
        *,
        effective_at: datetime | None = None,
        expires_at: datetime | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> admin_pb2.GrantCreditsResponse:
        """Grant prepaid credits for one metric, once per grant_id: usable from
        effective_at (None: now) until expires_at (None: never), drawn by priority
        (0-100, lower first; None: 50). Times must be timezone-aware. The answer's
        balance is the metric's balance usable now."""
        request = grant_credits_request(
            org_id,
            metric,
            units,
            grant_id,
            reason,
            effective_at=effective_at,
            expires_at=expires_at,
            priority=priority,
        )
        return self._admin.GrantCredits(request, **self._config.call_options(timeout))

    def void_credit_grant(
        self, org_id: str, grant_id: str, reason: str, *, timeout: float | None = None
    ) -> admin_pb2.VoidCreditGrantResponse:
        """Void a credit grant: what is left of it stops counting at once (holds on it
        included). Idempotent: a repeat answers already_voided. NOT_FOUND (reason
        GRANT_NOT_FOUND) when the organization has no such grant."""
        return self._admin.VoidCreditGrant(
            admin_pb2.VoidCreditGrantRequest(org_id=org_id, grant_id=grant_id, reason=reason),
            **self._config.call_options(timeout),
        )

    def list_credit_grants(
        self, org_id: str, metric: str = "", *, timeout: float | None = None
    ) -> admin_pb2.ListCreditGrantsResponse:
        """An organization's credit grants (only `metric`'s, if given), per metric in
        the order they are drawn, each with its status now."""
        return self._admin.ListCreditGrants(
            admin_pb2.ListCreditGrantsRequest(org_id=org_id, metric=metric),
            **self._config.call_options(timeout),
        )

    def create_api_key(
        self, org_id: str, name: str = "", *, timeout: float | None = None
    ) -> admin_pb2.CreateApiKeyResponse:
        """Make a tenant API key; its `secret` is in this answer only. Never retried."""
        return self._admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(org_id=org_id, name=name),
            **self._config.call_options(timeout),
        )

    def list_api_keys(
        self, org_id: str, *, timeout: float | None = None
    ) -> admin_pb2.ListApiKeysResponse:
        """An organization's API keys, newest first (ids, names and times; never secrets)."""
        return self._admin.ListApiKeys(
            admin_pb2.ListApiKeysRequest(org_id=org_id),
            **self._config.call_options(timeout),
        )

    def revoke_api_key(
        self, org_id: str, key_id: str, *, timeout: float | None = None
    ) -> admin_pb2.RevokeApiKeyResponse:
        """Revoke an API key: its next call is refused (idempotent)."""
        return self._admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(org_id=org_id, key_id=key_id),
            **self._config.call_options(timeout),
        )

    def adjust_usage(
        self,
        org_id: str,
        metric: str,
        units: int,
        *,
        reason: str,
        adjustment_id: str,
        year: int | None = None,
        month: int | None = None,
        timeout: float | None = None,
    ) -> admin_pb2.AdjustUsageResponse:
        """Correct a billing period's committed units (negative: remove), once per
        adjustment_id; year and month pick the period as for get_usage."""
        request = adjust_usage_request(
            org_id,
            metric,
            units,
            reason=reason,
            adjustment_id=adjustment_id,
            year=year,
            month=month,
        )
        return self._admin.AdjustUsage(request, **self._config.call_options(timeout))

    def list_audit_events(
        self,
        org_id: str,
        page_size: int = 0,
        page_token: str = "",
        *,
        timeout: float | None = None,
    ) -> admin_pb2.ListAuditEventsResponse:
        """One page of the audit trail, newest first; pass next_page_token on for the next."""
        request = admin_pb2.ListAuditEventsRequest(
            org_id=org_id, page_size=page_size, page_token=page_token
        )
        return self._admin.ListAuditEvents(request, **self._config.call_options(timeout))

    def iter_audit_events(
        self, org_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[admin_pb2.AuditEvent]:
        """Every audit event, newest first, fetching page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_audit_events(org_id, page_size, token, timeout=timeout)
            yield from page.events
            token = _next_token(page, seen, "ListAuditEvents")
            if not token:
                return

    # ReportingService

    def get_usage_history(
        self, org_id: str = "", *, months: int = 0, timeout: float | None = None
    ) -> reporting_pb2.GetUsageHistoryResponse:
        """The last `months` billing periods (0: the server's 12), newest first, with
        each period's terms."""
        request = get_usage_history_request(org_id, months=months)
        return self._reporting.GetUsageHistory(request, **self._config.call_options(timeout))

    def get_usage_statistics(
        self,
        org_id: str = "",
        *,
        period: StatisticsPeriodName | None = None,
        start_date: str | date | None = None,
        end_date: str | date | None = None,
        group_by: StatisticsGroupingName | None = None,
        timeout: float | None = None,
    ) -> reporting_pb2.GetUsageStatisticsResponse:
        """Usage between two dates of the plan's timezone, by period and/or by document type.

        A large answer (daily rows split by many document types) comes from the
        server in pages; they are fetched here and returned as one answer.
        """
        request = get_usage_statistics_request(
            org_id, period=period, start_date=start_date, end_date=end_date, group_by=group_by
        )
        answer: reporting_pb2.GetUsageStatisticsResponse = self._reporting.GetUsageStatistics(
            request, **self._config.call_options(timeout)
        )
        while answer.next_page_token:
            request.page_token = answer.next_page_token
            page = self._reporting.GetUsageStatistics(request, **self._config.call_options(timeout))
            answer = joined_statistics(answer, page)
        return answer

    def list_usage_records(
        self,
        org_id: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> reporting_pb2.ListUsageRecordsResponse:
        """One page of usage records, newest first; pass next_page_token on for the next."""
        request = list_usage_records_request(org_id, page_size=page_size, page_token=page_token)
        return self._reporting.ListUsageRecords(request, **self._config.call_options(timeout))

    def iter_usage_records(
        self, org_id: str = "", *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[reporting_pb2.UsageRecord]:
        """Every usage record, newest first, fetching page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_usage_records(
                org_id, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.records
            token = _next_token(page, seen)
            if not token:
                return

    # BillingService

    def close_billing_period(
        self, billing_month: str, *, timeout: float | None = None
    ) -> billing_pb2.CloseBillingPeriodResponse:
        """Freeze every organization's figures of the billing month "YYYY-MM"
        (its periods that ended in it); idempotent (docs/billing.md)."""
        return self._billing.CloseBillingPeriod(
            billing_pb2.CloseBillingPeriodRequest(billing_month=billing_month),
            **self._config.call_options(timeout),
        )

    def export_billing_period(
        self,
        billing_month: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> billing_pb2.ExportBillingPeriodResponse:
        """One page of the billing month's rows (organizations by id)."""
        return self._billing.ExportBillingPeriod(
            billing_pb2.ExportBillingPeriodRequest(
                billing_month=billing_month, page_size=page_size, page_token=page_token
            ),
            **self._config.call_options(timeout),
        )

    def iter_billing_rows(
        self, billing_month: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[billing_pb2.BillingRow]:
        """Every row of the billing month, page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.export_billing_period(
                billing_month, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.rows
            token = _next_token(page, seen, "ExportBillingPeriod")
            if not token:
                return

    # EventService

    def list_events(
        self,
        org_id: str = "",
        *,
        since: datetime | None = None,
        types: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> events_pb2.ListEventsResponse:
        """One page of the organization's events, oldest first (docs/events.md).
        next_page_token reads on from there, also at the end of the stream: a
        follower polls with it."""
        request = events_pb2.ListEventsRequest(
            org_id=org_id, types=types, page_size=page_size, page_token=page_token
        )
        if since is not None:
            request.since.FromDatetime(since)
        return self._events.ListEvents(request, **self._config.call_options(timeout))

    def list_event_organizations(
        self,
        *,
        since: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> events_pb2.ListEventOrganizationsResponse:
        """One page of the organizations that had events since a time, by id."""
        request = events_pb2.ListEventOrganizationsRequest(
            page_size=page_size, page_token=page_token
        )
        if since is not None:
            request.since.FromDatetime(since)
        return self._events.ListEventOrganizations(request, **self._config.call_options(timeout))

    def iter_event_organizations(
        self, *, since: datetime | None = None, timeout: float | None = None
    ) -> Iterator[str]:
        """Every organization that had events since a time, page after page."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_event_organizations(
                since=since, page_size=1000, page_token=token, timeout=timeout
            )
            yield from page.org_ids
            token = _next_token(page, seen, "ListEventOrganizations")
            if not token:
                return

    # WebhookService

    def create_webhook_endpoint(
        self,
        url: str,
        *,
        org_id: str = "",
        event_types: Sequence[str] = (),
        description: str = "",
        disabled: bool = False,
        timeout: float | None = None,
    ) -> webhooks_pb2.CreateWebhookEndpointResponse:
        """Register an endpoint for one organization's events (org_id="": every
        organization's) of these types (empty: all). Its signing `secret` is in this
        answer only. Never retried: a retry after a lost answer would make a second
        endpoint (docs/webhooks.md)."""
        request = webhooks_pb2.CreateWebhookEndpointRequest(
            org_id=org_id,
            url=url,
            event_types=event_types,
            description=description,
            disabled=disabled,
        )
        return self._webhooks.CreateWebhookEndpoint(request, **self._config.call_options(timeout))

    def get_webhook_endpoint(
        self, endpoint_id: str, *, timeout: float | None = None
    ) -> webhooks_pb2.GetWebhookEndpointResponse:
        """One endpoint (never its secrets: their ids only); NOT_FOUND when unknown."""
        return self._webhooks.GetWebhookEndpoint(
            webhooks_pb2.GetWebhookEndpointRequest(endpoint_id=endpoint_id),
            **self._config.call_options(timeout),
        )

    def list_webhook_endpoints(
        self,
        org_id: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> webhooks_pb2.ListWebhookEndpointsResponse:
        """One page of endpoints by id: all, or those that receive org_id's events
        (its own and those for every organization)."""
        request = webhooks_pb2.ListWebhookEndpointsRequest(
            org_id=org_id, page_size=page_size, page_token=page_token
        )
        return self._webhooks.ListWebhookEndpoints(request, **self._config.call_options(timeout))

    def iter_webhook_endpoints(
        self, org_id: str = "", *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[webhooks_pb2.WebhookEndpoint]:
        """Every endpoint (of org_id, if given), page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_webhook_endpoints(
                org_id, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.endpoints
            token = _next_token(page, seen, "ListWebhookEndpoints")
            if not token:
                return

    def update_webhook_endpoint(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        event_types: Sequence[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
        timeout: float | None = None,
    ) -> webhooks_pb2.UpdateWebhookEndpointResponse:
        """Change the fields given (not None), and only those; `event_types=()`: every
        type. A disabled endpoint keeps its place and resumes from it when enabled."""
        request = update_webhook_endpoint_request(
            endpoint_id,
            url=url,
            event_types=event_types,
            description=description,
            enabled=enabled,
        )
        return self._webhooks.UpdateWebhookEndpoint(request, **self._config.call_options(timeout))

    def delete_webhook_endpoint(
        self, endpoint_id: str, *, timeout: float | None = None
    ) -> webhooks_pb2.DeleteWebhookEndpointResponse:
        """Remove an endpoint, its delivery log and dead letters; `deleted` is False
        when there was none (idempotent)."""
        return self._webhooks.DeleteWebhookEndpoint(
            webhooks_pb2.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id),
            **self._config.call_options(timeout),
        )

    def rotate_webhook_secret(
        self,
        endpoint_id: str,
        *,
        overlap: float | timedelta | None = None,
        timeout: float | None = None,
    ) -> webhooks_pb2.RotateWebhookSecretResponse:
        """Make a new signing secret (in this answer only); the old one keeps signing
        for `overlap` (seconds or a timedelta; None: the server's default, 24 h)."""
        request = rotate_webhook_secret_request(endpoint_id, overlap=overlap)
        return self._webhooks.RotateWebhookSecret(request, **self._config.call_options(timeout))

    def list_webhook_deliveries(
        self,
        endpoint_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> webhooks_pb2.ListWebhookDeliveriesResponse:
        """One page of the endpoint's delivery log, newest first."""
        request = webhooks_pb2.ListWebhookDeliveriesRequest(
            endpoint_id=endpoint_id, page_size=page_size, page_token=page_token
        )
        return self._webhooks.ListWebhookDeliveries(request, **self._config.call_options(timeout))

    def iter_webhook_deliveries(
        self, endpoint_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[webhooks_pb2.WebhookDelivery]:
        """The endpoint's whole delivery log, newest first, page after page."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_webhook_deliveries(
                endpoint_id, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.deliveries
            token = _next_token(page, seen, "ListWebhookDeliveries")
            if not token:
                return

    def list_webhook_dead_letters(
        self,
        endpoint_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> webhooks_pb2.ListWebhookDeadLettersResponse:
        """One page of the endpoint's dead letters (events given up on), newest first."""
        request = webhooks_pb2.ListWebhookDeadLettersRequest(
            endpoint_id=endpoint_id, page_size=page_size, page_token=page_token
        )
        return self._webhooks.ListWebhookDeadLetters(request, **self._config.call_options(timeout))

    def iter_webhook_dead_letters(
        self, endpoint_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[webhooks_pb2.WebhookDeadLetter]:
        """Every dead letter of the endpoint, newest first, page after page."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_webhook_dead_letters(
                endpoint_id, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.dead_letters
            token = _next_token(page, seen, "ListWebhookDeadLetters")
            if not token:
                return

    def replay_webhook_events(
        self,
        endpoint_id: str,
        *,
        event_id: str = "",
        org_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> webhooks_pb2.ReplayWebhookEventsResponse:
        """Deliver again one event (event_id, as in webhook-id) or an organization's
        events from start_time to end_time (timezone-aware); org_id may be left out
        for an endpoint of one organization. The dispatchers send them with the
        webhook-id each had; the answer's replay_id names the queued replay."""
        request = replay_webhook_events_request(
            endpoint_id,
            event_id=event_id,
            org_id=org_id,
            start_time=start_time,
            end_time=end_time,
        )
        return self._webhooks.ReplayWebhookEvents(request, **self._config.call_options(timeout))

    # The outbox

    @property
    def outbox(self) -> Outbox | None:
        """The client's outbox (None: RecordUsage failures are only raised)."""
        return self._outbox

    def _require_outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("this client has no outbox (construct it with outbox=Outbox(path))")
        return self._outbox

    def flush_outbox(
        self, *, force: bool = False, limit: int | None = None, timeout: float | None = None
    ) -> FlushResult:
        """One delivery pass: re-send the outbox's pending records, oldest first.

        Each record goes with its original request (request_id, completed_at, ...);
        a first answer or a duplicate deletes it. A transient failure keeps it
        pending with backoff, a refusal makes it a dead letter. The pass stops at
        the first failure saying pagemeter is unreachable. Only records whose
        backoff has passed are sent, all pending ones with force=True (never
        those another pass or a first attempt holds). `limit` caps the records
        tried; `timeout` is each call's deadline.
        """
        return self._flush(self._require_outbox(), force=force, limit=limit, timeout=timeout)

    def _flush(
        self,
        outbox: Outbox,
        *,
        force: bool,
        limit: int | None,
        timeout: float | None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> FlushResult:
        deadline = self._config.deadline(timeout)
        run = DeliveryPass(
            outbox,
            lease=deadline + outbox.lease_margin,
            force=force,
            limit=limit,
            claim_size=self._coalescer.flush_chunk,
        )
        while not run.finished and not should_stop():
            batch = run_blocking_sync(run.claim)
            if not batch:
                break
            if self._coalescer.batches_for(RECORD) and self._deliver_batch(run, batch, deadline):
                continue
            self._deliver_one_by_one(run, batch, deadline, should_stop)
        return run_blocking_sync(run.result)

    def _deliver_batch(
        self, run: DeliveryPass, entries: list[OutboxEntry], deadline: float
    ) -> bool:
        """Send claimed records as one RecordUsageBatch; each item settles its record
        as its single RecordUsage answer would. False (nothing settled): the server
        refused the batch as a whole, so the records go one by one."""
        request = quota_pb2.RecordUsageBatchRequest(items=[entry.request for entry in entries])
        try:
            answer = self._quota.RecordUsageBatch(
                request, timeout=deadline, metadata=self._config.call_metadata()
            )
        except grpc.RpcError as error:
            details = error_details(error)
            if self._coalescer.batch_refused(RECORD, details.code):
                return False
            run_blocking_sync(
                run.batch_failed, entries, details.code, details.message, _retry_seconds(details)
            )
            return True
        except BaseException:
            run.abandon(entries)
            raise
        run_blocking_sync(run.answered, entries, list(answer.items))
        return True

    def _deliver_one_by_one(
        self,
        run: DeliveryPass,
        entries: list[OutboxEntry],
        deadline: float,
        should_stop: Callable[[], bool],
    ) -> None:
        for index, entry in enumerate(entries):
            if run.finished or should_stop():
                run_blocking_sync(run.abandon, entries[index:])
                return
            try:
                response = self._quota.RecordUsage(
                    entry.request, timeout=deadline, metadata=self._config.call_metadata()
                )
            except grpc.RpcError as error:
                details = error_details(error)
                run_blocking_sync(
                    run.failed, entry, details.code, details.message, _retry_seconds(details)
                )
            except BaseException:
                run.abandon(entries[index:])
                raise
            else:
                run_blocking_sync(run.delivered, entry, response)

    def start_outbox_flusher(self, interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        """Run a delivery pass now and every `interval` seconds, in the background.

        The background is a task of the running loop for the async client, a
        daemon thread for the blocking one. Stop it with
        `stop_outbox_flusher()` (close() does). A pass that fails on the
        outbox file is logged (logger "pagemeter_client") and the next one runs
        as planned.
        """
        outbox = self._require_outbox()
        if interval <= 0:
            raise ValueError("interval must be positive")
        with self._flusher_lock:
            if self._flusher is not None and self._flusher[0].alive():
                raise RuntimeError("the outbox flusher is already running")
            stop = StopFlag()
            worker = Worker(
                lambda: self._flush_every(outbox, interval, stop), "pagemeter-outbox-flusher"
            )
            self._flusher = (worker, stop)

    def _flush_every(self, outbox: Outbox, interval: float, stop: StopFlag) -> None:
        while not stop.is_set():
            try:
                self._flush(outbox, force=False, limit=None, timeout=None, should_stop=stop.is_set)
            except Exception:
                log.exception("outbox %s: delivery pass failed", outbox)
            if stop.wait(interval):
                return

    def stop_outbox_flusher(self) -> None:
        """Stop the background flusher after the record it is sending (if it runs)."""
        with self._flusher_lock:
            if self._flusher is None:
                return
            (worker, stop), self._flusher = self._flusher, None
        stop.set()
        worker.join()

    # Replay after a failover

    @property
    def replay_stats(self) -> ReplayStats | None:
        """What the replay after a failover kept and did (None without replay_after_failover)."""
        return None if self._acknowledged is None else self._acknowledged.stats()

    def _require_replay(self) -> AcknowledgedLog:
        if self._acknowledged is None:
            raise RuntimeError(
                "this client keeps no acknowledged requests "
                "(construct it with replay_after_failover=ReplayWindow(...))"
            )
        return self._acknowledged

    def replay_acknowledged(self, *, timeout: float | None = None) -> ReplayResult:
        """Send every acknowledged request of the window again, now (see ReplayResult).

        For a failover hook, or a client that was idle through the failover and so
        saw no outage. Waits for a background pass that is running; `timeout` is
        each call's deadline.
        """
        acknowledged = self._require_replay()
        with self._replay_pass:
            return replay_sync(
                acknowledged,
                self._quota,
                deadline=self._config.deadline(timeout),
                metadata=self._config.call_metadata(),
            )

    def _replay_soon(self) -> None:
        """The first answer after a store outage: replay in the background (or again after
        this pass). Called by the observer, on the event loop or in the calling thread."""
        with self._replay_state:
            self._replay_again = True
            if self._replay_stop.is_set() or (
                self._replayer is not None and self._replayer.alive()
            ):
                return
            self._replayer = Worker(self._replay_in_background, "pagemeter-replay")

    def _replay_in_background(self) -> None:
        acknowledged = self._require_replay()
        while True:
            with self._replay_state:
                if not self._replay_again or self._replay_stop.is_set():
                    self._replayer = None
                    return
                self._replay_again = False
            try:
                with self._replay_pass:
                    replay_sync(
                        acknowledged,
                        self._quota,
                        deadline=self._config.timeout,
                        metadata=self._config.call_metadata(),
                        should_stop=self._replay_stop.is_set,
                    )
            except Exception:
                log.exception("replay after a store outage failed")

    def _stop_replayer(self) -> None:
        """Stop a background pass: the async client cancels its task, the blocking
        client waits for its thread's current call (at most one deadline)."""
        with self._replay_state:
            self._replay_stop.set()
            worker = self._replayer
        if worker is not None:
            worker.interrupt(self._config.timeout + 1.0)

    # Worker convenience

    def _release_unknown_hold(self, org_id: str, request_id: str) -> None:
        """Free, or bar, a hold whose CheckQuota had an unknown outcome.

        The hold may still land (Redis ran the script after pagemeter gave up on
        it): a release with its id frees it, or, sent first, makes pagemeter
        refuse it when it lands. Tried for RELEASE_WINDOW seconds while pagemeter
        answers UNAVAILABLE; past that the hold's TTL is the backstop.
        """
        deadline = time.monotonic() + RELEASE_WINDOW
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.release_quota(org_id, request_id, timeout=remaining)
                return
            except grpc.RpcError as error:
                if not _outcome_unknown(error):
                    return
            sleep_sync(min(RELEASE_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    @contextlib.contextmanager
    def reserve(
        self,
        org_id: str,
        units: Mapping[str, int],
        *,
        request_id: str | None = None,
        hold_ttl: float | timedelta | None = None,
    ) -> Iterator[Reservation]:
        """Hold `units` for one job around the `with` body.

        Raises QuotaDenied (and skips the body) when the units are not admitted.
        Leaving the body normally commits the reserved units unless the body called
        commit(), fail() or release(); leaving it with an exception records the job
        as failed (consuming nothing) and re-raises.
        """
        request_id = request_id or new_request_id()
        try:
            decision = self.check_quota(
                org_id, units, request_id=request_id, hold=True, hold_ttl=hold_ttl
            )
        except grpc.RpcError as error:
            if _outcome_unknown(error):
                self._release_unknown_hold(org_id, request_id)
            raise
        if not decision.allowed:
            raise QuotaDenied(decision)
        job = Reservation(self, org_id, request_id, units, decision)
        try:
            yield job
        except BaseException as body_error:
            if not job.settled:
                try:
                    job.fail()
                except grpc.RpcError as settle_error:
                    _note_settle_failure(body_error, settle_error)
                except UsageQueued as queued:
                    _note_settle_queued(body_error, queued)
            raise
        if not job.settled:
            job.commit()
