"""gRPC handlers of BillingService: closing a billing month and exporting it.

Admin credentials only. The figures are GetUsageHistory's; how a month is named,
what a close freezes and how later changes are exported: docs/billing.md.
"""

from __future__ import annotations

from typing import Any

import grpc

from pagemeter.v1 import billing_pb2, billing_pb2_grpc
from pagemeter_server.api.auth import Access, Authenticator, authorized, current_principal
from pagemeter_server.domain.billing import (
    KIND_ADJUSTMENT,
    KIND_CLOSED,
    KIND_OPEN,
    BillingMonth,
    parse_billing_month,
)
from pagemeter_server.domain.clock import Clock
from pagemeter_server.domain.errors import BadPageToken, NotReady
from pagemeter_server.domain.page_tokens import (
    ANSWER_BUDGET,
    decode_page_token,
    encode_page_token,
)
from pagemeter_server.domain.periods import timestamp, to_datetime
from pagemeter_server.domain.validation import bad_page_token, invalid, page_request
from pagemeter_server.store.billing import BilledPeriod, BillingStore

Context = grpc.aio.ServicerContext[Any, Any]

BILLING, ALL_ORGS = "billing", "*"
DEFAULT_ORGS_PAGE = 100
# Organizations a close lists at a time (its work is CONCURRENCY at a time).
CLOSE_PAGE = 500

_KINDS = {
    KIND_OPEN: billing_pb2.BILLING_ROW_KIND_OPEN,
    KIND_CLOSED: billing_pb2.BILLING_ROW_KIND_CLOSED,
    KIND_ADJUSTMENT: billing_pb2.BILLING_ROW_KIND_ADJUSTMENT,
}


class BillingService(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, billing: BillingStore, clock: Clock, auth: Authenticator) -> None:
        self.billing = billing
        self.store = billing.store
        self.clock = clock
        self.auth = auth

    def _ready(self, month: BillingMonth, now_ms: int) -> None:
        """Refuse a month that cannot be closed or exported now (FAILED_PRECONDITION)."""
        ready_ms = month.ended_everywhere_ms()
        if now_ms < ready_ms:
            raise NotReady(
                f"billing month {month.label} has not ended in every timezone yet; it can be "
                f"closed and exported from {_iso(ready_ms)}",
                "BILLING_MONTH_NOT_ENDED",
            )
        if month.begun_somewhere_ms() + self.store.usage_retention_ms <= now_ms:
            raise NotReady(
                f"billing month {month.label} is past the usage retention "
                f"({self.store.usage_retention_ms // 86_400_000} days): its counters are gone",
                "BILLING_MONTH_PAST_RETENTION",
            )

    @authorized(Access.ADMIN)
    async def CloseBillingPeriod(
        self, request: billing_pb2.CloseBillingPeriodRequest, context: Context
    ) -> billing_pb2.CloseBillingPeriodResponse:
        month = _billing_month(request.billing_month)
        now_ms = self.clock.now_ms()
        self._ready(month, now_ms)
        actor = current_principal().actor
        response = billing_pb2.CloseBillingPeriodResponse(billing_month=month.label)
        after = ""
        while True:
            orgs, more = await self.store.plan_orgs(after, CLOSE_PAGE)
            outcomes = await self.billing.each_org(
                orgs,
                lambda org_id: self.billing.close_org(org_id, month, now_ms=now_ms, actor=actor),
            )
            response.organizations_closed += outcomes.count("closed")
            response.organizations_already_closed += outcomes.count("already_closed")
            response.organizations_without_period += outcomes.count("no_period")
            if not more:
                return response
            after = orgs[-1]

    @authorized(Access.ADMIN)
    async def ExportBillingPeriod(
        self, request: billing_pb2.ExportBillingPeriodRequest, context: Context
    ) -> billing_pb2.ExportBillingPeriodResponse:
        month = _billing_month(request.billing_month)
        page_size = page_request(None, request.page_size, request.page_token, DEFAULT_ORGS_PAGE)
        after = ""
        if request.page_token:
            try:
                position = decode_page_token(request.page_token, BILLING, ALL_ORGS)
            except BadPageToken:
                raise bad_page_token() from None
            after_month, _, after = position.partition("/")
            if after_month != month.label or not after:
                raise bad_page_token()
        now_ms = self.clock.now_ms()
        self._ready(month, now_ms)
        orgs, more = await self.store.plan_orgs(after, page_size)
        per_org = await self.billing.each_org(
            orgs, lambda org_id: self.billing.org_rows(org_id, month, now_ms=now_ms)
        )
        response = billing_pb2.ExportBillingPeriodResponse()
        budget = ANSWER_BUDGET
        shown = 0
        for org_id, billed in zip(orgs, per_org, strict=True):
            rows = [row for period in billed for row in _rows(org_id, month, period)]
            size = sum(row.ByteSize() + 6 for row in rows)
            if size > budget and shown > 0:
                break
            budget -= size
            response.rows.extend(rows)
            shown += 1
        if shown < len(orgs) or more:
            response.next_page_token = encode_page_token(
                BILLING, ALL_ORGS, f"{month.label}/{orgs[shown - 1]}"
            )
        return response


def _billing_month(text: str) -> BillingMonth:
    try:
        return parse_billing_month(text)
    except ValueError as problem:
        raise invalid("billing_month", str(problem)) from None


def _iso(instant_ms: int) -> str:
    return to_datetime(instant_ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rows(org_id: str, month: BillingMonth, billed: BilledPeriod) -> list[billing_pb2.BillingRow]:
    bill = billed.bill
    rows = []
    for m in bill.metrics:
        row = billing_pb2.BillingRow(
            org_id=org_id,
            billing_month=month.label,
            period_id=bill.period_id,
            period_start=timestamp(bill.start_ms),
            period_end=timestamp(bill.end_ms),
            metric=m.metric,
            kind=_KINDS[billed.kind],
            committed=m.committed,
            included_units=m.included,
            prepaid_units=m.prepaid,
            overage_units=m.overage_units,
            overage_cost=m.overage_cost,
            currency=bill.currency,
            plan_name=bill.plan_name,
            plan_version=bill.plan_version,
        )
        if billed.closed_ms:
            row.closed_at.CopyFrom(timestamp(billed.closed_ms))
        rows.append(row)
    return rows
