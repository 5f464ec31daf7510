"""Money is exact: every price the plan accepts times every unit count the rules can reach.

The oracle is integer arithmetic on the price scaled by 10^9 (prices have at most
9 fractional digits), independent of the Decimal code under test.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagemeter_server.domain.usage import cost
from pagemeter_server.domain.validation import PRICE
from tests.conftest import examples

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


@settings(max_examples=examples(500), deadline=None)
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
