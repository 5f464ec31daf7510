"""Money is exact: every price the plan accepts times every unit count the rules can reach.

The oracle is integer arithmetic on the price scaled by 10^9 (prices have at most
9 fractional digits), independent of the Decimal code under test.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from pagemeter_server.domain.usage import cost
from pagemeter_server.domain.validation import PRICE
from tests.conftest import RunningServer, metric_limits

Q = quota_pb2
# The largest integer a Lua double holds exactly: no unit count the scripts
# produce is larger.
MAX_EXACT_UNITS = 2**53


def exact_product(units: int, price: str) -> str:
    """units x price with integers only, printed without trailing zeros."""
    whole, _, fraction = price.partition(".")
    scaled = int(whole) * 10**9 + int(fraction.ljust(9, "0") or "0")
    integer, remainder = divmod(units * scaled, 10**9)
    if not remainder:
        return str(integer)
    return f"{integer}.{str(remainder).rjust(9, '0').rstrip('0')}"


prices = st.from_regex(PRICE, fullmatch=True)


@settings(max_examples=500, deadline=None)
@given(units=st.integers(min_value=0, max_value=MAX_EXACT_UNITS), price=prices)
def test_cost_is_exact_for_every_accepted_price(units: int, price: str) -> None:
    """cost() equals the integer product for every price the plan validation accepts."""
    assert cost(units, price) == exact_product(units, price)


def test_the_reviewed_figure_is_not_rounded() -> None:
    """987654321 x 123456789012.123456789 keeps all of its digits (28-digit rounding lost them)."""
    expected = exact_product(987654321, "123456789012.123456789")
    assert expected.endswith(".112635269")
    assert cost(987654321, "123456789012.123456789") == expected


def test_largest_figures_keep_every_digit() -> None:
    """The largest price times the largest unit count is exact to the last fractional digit."""
    price = "999999999999.999999999"
    assert cost(MAX_EXACT_UNITS, price) == exact_product(MAX_EXACT_UNITS, price)


async def test_every_answer_carries_the_exact_cost(pagemeter_server: RunningServer) -> None:
    """CheckQuota, RecordUsage, GetUsage and GetUsageHistory all show the exact overage cost."""
    price = "123456789012.123456789"
    units = 987_654_321
    expected = exact_product(units, price)
    plan = plan_pb2.Plan(
        org_id="money",
        name="Exact",
        timezone="UTC",
        metrics=[
            metric_limits(
                "pages", contract_quota=0, overage_allowed=True, overage_price_per_unit=price
            )
        ],
    )
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    check = await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="money", units={"pages": units})
    )
    assert check.metrics[0].overage_cost == expected
    record = await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="money", request_id="job-1", units={"pages": units})
    )
    assert record.metrics[0].overage_cost == expected
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="money"))
    assert usage.metrics[0].overage_cost == expected
    history = await pagemeter_server.reporting.GetUsageHistory(
        reporting_pb2.GetUsageHistoryRequest(org_id="money", months=1)
    )
    assert history.months[0].metrics[0].overage_cost == expected
