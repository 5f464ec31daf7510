"""gRPC handlers of AdminService: plans, credits, API keys, corrections, audit.

Admin credentials only. Each change is written to the organization's audit
trail by the same script that makes it, with the caller as its actor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import admin_pb2, admin_pb2_grpc
from pagemeter_server.api.auth import (
    Access,
    Authenticator,
    authorized,
    current_principal,
    new_api_key,
)
from pagemeter_server.domain.clock import Clock
from pagemeter_server.domain.credits import (
    ACTIVE,
    DEFAULT_PRIORITY,
    EXHAUSTED,
    EXPIRED,
    MAX_PRIORITY,
    PENDING,
    VOIDED,
    Grant,
    reserved_grant_prefix,
)
from pagemeter_server.domain.errors import BadPageToken, NotFound, PlanNotFound
from pagemeter_server.domain.page_tokens import decode_page_token, encode_page_token, items_that_fit
from pagemeter_server.domain.periods import timestamp, timestamp_ms
from pagemeter_server.domain.plans import doc_to_plan, plan_to_doc
from pagemeter_server.domain.validation import (
    KEY_ID,
    MAX_NAME,
    MAX_REASON,
    MAX_UNITS,
    Violations,
    bad_page_token,
    check_year_month,
    invalid,
    page_request,
    require_org_id,
)
from pagemeter_server.settings import Settings
from pagemeter_server.store.admin import AdminStore, AuditEntry, StoredKey, audit_json
from pagemeter_server.store.quota import Store

Context = grpc.aio.ServicerContext[Any, Any]


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        store: Store,
        admin_store: AdminStore,
        settings: Settings,
        clock: Clock,
        auth: Authenticator,
    ) -> None:
        self.store = store
        self.admin_store = admin_store
        self.settings = settings
        self.clock = clock
        self.auth = auth

    # -- plans and credits ----------------------------------------------------------

    @authorized(Access.ADMIN)
    async def SetPlan(
        self, request: admin_pb2.SetPlanRequest, context: Context
    ) -> admin_pb2.SetPlanResponse:
        if not request.HasField("plan"):
            raise invalid("plan", "plan is required")
        doc = plan_to_doc(request.plan, self.settings.default_timezone)
        if request.validate_only:
            return admin_pb2.SetPlanResponse(plan=doc_to_plan(request.plan.org_id, doc, 0, 0))
        stored = await self.store.set_plan(
            request.plan.org_id, doc, now_ms=self.clock.now_ms(), actor=current_principal().actor
        )
        return admin_pb2.SetPlanResponse(
            plan=doc_to_plan(request.plan.org_id, stored.doc, stored.version, stored.updated_ms)
        )

    @authorized(Access.ADMIN)
    async def GetPlan(
        self, request: admin_pb2.GetPlanRequest, context: Context
    ) -> admin_pb2.GetPlanResponse:
        require_org_id(request.org_id)
        stored = await self.store.get_plan(request.org_id)
        if stored is None:
            raise PlanNotFound(request.org_id)
        return admin_pb2.GetPlanResponse(
            plan=doc_to_plan(request.org_id, stored.doc, stored.version, stored.updated_ms)
        )

    @authorized(Access.ADMIN)
    async def ListPlans(
        self, request: admin_pb2.ListPlansRequest, context: Context
    ) -> admin_pb2.ListPlansResponse:
        page_size = page_request(None, request.page_size, request.page_token, DEFAULT_PLANS_PAGE)
        after = ""
        if request.page_token:
            try:
                after = decode_page_token(request.page_token, PLANS, ALL_ORGS)
            except BadPageToken:
                raise bad_page_token() from None
        orgs, more = await self.store.plan_orgs(after, page_size)
        stored = await self.store.get_plans(orgs)
        response = admin_pb2.ListPlansResponse(
            plans=[
                doc_to_plan(org, plan.doc, plan.version, plan.updated_ms)
                for org, plan in zip(orgs, stored, strict=True)
                if plan is not None
            ]
        )
        if more:
            response.next_page_token = encode_page_token(PLANS, ALL_ORGS, orgs[-1])
        return response

    @authorized(Access.ADMIN)
    async def GrantCredits(
        self, request: admin_pb2.GrantCreditsRequest, context: Context
    ) -> admin_pb2.GrantCreditsResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        problems.check_metric_name(request.metric, "metric")
        problems.check_request_id(request.grant_id, "grant_id")
        reserved = reserved_grant_prefix(request.grant_id)
        if reserved:
            problems.add(
                "grant_id",
                f"grant ids starting with {reserved!r} are pagemeter's own (prepaid balances of "
                "earlier releases, rollovers of unused quota); choose another id",
            )
        problems.check_length(request.reason, "reason", MAX_REASON)
        if not 1 <= request.units <= MAX_UNITS:
            problems.add("units", f"units must be between 1 and {MAX_UNITS} (got {request.units})")
        now_ms = self.clock.now_ms()
        effective_ms, expires_ms = grant_times(request, now_ms, problems)
        priority = DEFAULT_PRIORITY
        if request.HasField("priority"):
            priority = request.priority
            if not 0 <= priority <= MAX_PRIORITY:
                problems.add(
                    "priority", f"priority must be between 0 and {MAX_PRIORITY} (got {priority})"
                )
        problems.raise_if_any()
        balance, duplicate = await self.store.grant_credits(
            request.org_id,
            request.metric,
            request.units,
            request.grant_id,
            request.reason,
            now_ms=now_ms,
            actor=current_principal().actor,
            effective_ms=effective_ms,
            expires_ms=expires_ms,
            priority=priority,
        )
        return admin_pb2.GrantCreditsResponse(balance=balance, duplicate=duplicate)

    @authorized(Access.ADMIN)
    async def VoidCreditGrant(
        self, request: admin_pb2.VoidCreditGrantRequest, context: Context
    ) -> admin_pb2.VoidCreditGrantResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        problems.check_request_id(request.grant_id, "grant_id")
        if not request.reason.strip():
            problems.add("reason", "reason is required: say why the grant is voided")
        problems.check_length(request.reason, "reason", MAX_REASON)
        problems.raise_if_any()
        voided, already = await self.store.void_grant(
            request.org_id,
            request.grant_id,
            request.reason,
            now_ms=self.clock.now_ms(),
            actor=current_principal().actor,
        )
        return admin_pb2.VoidCreditGrantResponse(voided_units=voided, already_voided=already)

    @authorized(Access.ADMIN)
    async def ListCreditGrants(
        self, request: admin_pb2.ListCreditGrantsRequest, context: Context
    ) -> admin_pb2.ListCreditGrantsResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        if request.metric:
            problems.check_metric_name(request.metric, "metric")
        problems.raise_if_any()
        now_ms = self.clock.now_ms()
        grants = await self.store.credit_grants(request.org_id, now_ms=now_ms)
        return admin_pb2.ListCreditGrantsResponse(
            grants=[
                credit_grant(grant, now_ms)
                for grant in grants
                if not request.metric or grant.metric == request.metric
            ]
        )

    # -- API keys ---------------------------------------------------------------------

    @authorized(Access.ADMIN)
    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Context
    ) -> admin_pb2.CreateApiKeyResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        problems.check_length(request.name, "name", MAX_NAME)
        problems.raise_if_any()
        now_ms = self.clock.now_ms()
        while True:  # a 64-bit key id collides about never; if it does, draw again
            key = new_api_key(request.org_id)
            created = await self.admin_store.create_key(
                request.org_id,
                key.key_id,
                key.digest,
                request.name,
                now_ms=now_ms,
                actor=current_principal().actor,
            )
            if created:
                break
        stored = StoredKey(key.key_id, request.org_id, request.name, now_ms, 0, False, 0)
        return admin_pb2.CreateApiKeyResponse(key=_api_key(stored), secret=key.secret)

    @authorized(Access.ADMIN)
    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Context
    ) -> admin_pb2.ListApiKeysResponse:
        require_org_id(request.org_id)
        keys = await self.admin_store.list_keys(request.org_id)
        return admin_pb2.ListApiKeysResponse(keys=[_api_key(k) for k in keys])

    @authorized(Access.ADMIN)
    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: Context
    ) -> admin_pb2.RevokeApiKeyResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        if not KEY_ID.fullmatch(request.key_id):
            problems.add("key_id", "key_id must be the key id shown by CreateApiKey/ListApiKeys")
        problems.raise_if_any()
        already = await self.admin_store.revoke_key(
            request.org_id,
            request.key_id,
            now_ms=self.clock.now_ms(),
            actor=current_principal().actor,
        )
        stored = await self.admin_store.get_key(request.org_id, request.key_id)
        if already is None or stored is None:
            raise NotFound(
                f"organization {request.org_id!r} has no API key {request.key_id!r}",
                "API_KEY_NOT_FOUND",
            )
        return admin_pb2.RevokeApiKeyResponse(key=_api_key(stored), already_revoked=already)

    # -- usage corrections and the audit trail ----------------------------------------

    @authorized(Access.ADMIN)
    async def AdjustUsage(
        self, request: admin_pb2.AdjustUsageRequest, context: Context
    ) -> admin_pb2.AdjustUsageResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        problems.check_metric_name(request.metric, "metric")
        problems.check_request_id(request.adjustment_id, "adjustment_id")
        if not request.reason.strip():
            problems.add("reason", "reason is required: say why the usage is corrected")
        problems.check_length(request.reason, "reason", MAX_REASON)
        if request.units == 0 or abs(request.units) > MAX_UNITS:
            problems.add(
                "units",
                f"units must be between -{MAX_UNITS} and {MAX_UNITS}, not 0 (got {request.units})",
            )
        problems.raise_if_any()
        has_year, has_month = request.HasField("year"), request.HasField("month")
        check_year_month(has_year, request.year, has_month, request.month)
        result = await self.admin_store.adjust_usage(
            request.org_id,
            request.metric,
            request.units,
            year_month=(request.year, request.month) if has_year else None,
            reason=request.reason,
            adjustment_id=request.adjustment_id,
            now_ms=self.clock.now_ms(),
            actor=current_principal().actor,
        )
        return admin_pb2.AdjustUsageResponse(
            period_id=result.period_id,
            committed_before=result.before,
            committed_after=result.after,
            duplicate=result.duplicate,
        )

    @authorized(Access.ADMIN)
    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: Context
    ) -> admin_pb2.ListAuditEventsResponse:
        page_size = page_request(request.org_id, request.page_size, request.page_token)
        try:
            entries, next_token = await self.admin_store.audit_page(
                request.org_id, page_size, request.page_token
            )
        except BadPageToken:
            raise bad_page_token() from None
        # A plan change carries two plan documents: a full page of them could pass
        # the message limit, so the page ends early and the token continues it.
        # Events are built one by one until the answer is full, not all of them.
        built: list[admin_pb2.AuditEvent] = []

        def sizes() -> Iterator[int]:
            for entry in entries:
                built.append(_audit_event(request.org_id, entry))
                yield built[-1].ByteSize()

        shown = items_that_fit(sizes())
        events = built[:shown]
        if shown < len(entries):
            next_token = self.admin_store.audit_token(request.org_id, events[-1].event_id)
        return admin_pb2.ListAuditEventsResponse(events=events, next_page_token=next_token)


PLANS, ALL_ORGS = "plans", "*"
DEFAULT_PLANS_PAGE = 100


def _audit_event(org_id: str, entry: AuditEntry) -> admin_pb2.AuditEvent:
    return admin_pb2.AuditEvent(
        event_id=entry.event_id,
        at=timestamp(int(entry.fields.get("at", "0"))),
        actor=entry.fields.get("actor", ""),
        action=entry.fields.get("action", ""),
        org_id=org_id,
        target=entry.fields.get("target", ""),
        before=audit_json(entry.fields.get("before", "")),
        after=audit_json(entry.fields.get("after", "")),
        reason=entry.fields.get("reason", ""),
    )


def _optional_time(ms: int) -> Timestamp | None:
    return timestamp(ms) if ms else None


def _api_key(key: StoredKey) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=key.key_id,
        org_id=key.org_id,
        name=key.name,
        created_at=timestamp(key.created_ms),
        last_used_at=_optional_time(key.last_used_ms),
        revoked=key.revoked,
        revoked_at=_optional_time(key.revoked_ms),
    )


_GRANT_STATUSES = {
    PENDING: admin_pb2.CREDIT_GRANT_STATUS_PENDING,
    ACTIVE: admin_pb2.CREDIT_GRANT_STATUS_ACTIVE,
    EXHAUSTED: admin_pb2.CREDIT_GRANT_STATUS_EXHAUSTED,
    EXPIRED: admin_pb2.CREDIT_GRANT_STATUS_EXPIRED,
    VOIDED: admin_pb2.CREDIT_GRANT_STATUS_VOIDED,
}


def grant_times(
    request: admin_pb2.GrantCreditsRequest, now_ms: int, problems: Violations
) -> tuple[int | None, int | None]:
    """The grant's effective and expiry instants (None: unset), checked."""
    effective_ms = expires_ms = None
    if request.HasField("effective_at") and problems.check_timestamp(
        request.effective_at, "effective_at"
    ):
        effective_ms = timestamp_ms(request.effective_at)
    if request.HasField("expires_at") and problems.check_timestamp(
        request.expires_at, "expires_at"
    ):
        expires_ms = timestamp_ms(request.expires_at)
        if expires_ms <= max(now_ms, effective_ms or now_ms):
            problems.add(
                "expires_at",
                "expires_at must be after effective_at and after now (a grant that never "
                "counts is a mistake)",
            )
    return effective_ms, expires_ms


def credit_grant(grant: Grant, now_ms: int) -> admin_pb2.CreditGrant:
    message = admin_pb2.CreditGrant(
        grant_id=grant.grant_id,
        metric=grant.metric,
        units=grant.units,
        remaining=grant.remaining,
        effective_at=timestamp(grant.effective_ms),
        priority=grant.priority,
        status=_GRANT_STATUSES[grant.status(now_ms)],
    )
    if grant.expires_ms:
        message.expires_at.CopyFrom(timestamp(grant.expires_ms))
    return message
