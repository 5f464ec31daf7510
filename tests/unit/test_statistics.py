"""Statistics figures: a range's totals are the sums of its day hashes, however they are added up."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pagemeter_server.domain.statistics import DayUsage, parse_day, usage_of
from tests.conftest import examples

METRICS = st.sampled_from(["pages", "credits", "documents_ocr", "tokens"])
# Document types are free text in RecordUsage: a colon among them must not move the metric.
TYPES = st.sampled_from(["invoice", "receipt", "bank:statement", "x"])
AMOUNTS = st.integers(min_value=-(10**12), max_value=10**12)  # corrections are negative


@st.composite
def day_hashes(draw: st.DrawFn) -> dict[str, str]:
    """One day hash as record.lua writes it and Redis returns it (values as text)."""
    fields: dict[str, str] = {}
    for metric in draw(st.lists(METRICS, unique=True)):
        fields[f"c:{metric}"] = str(draw(AMOUNTS))
        for document_type in draw(st.lists(TYPES, unique=True)):
            fields[f"tc:{document_type}:{metric}"] = str(draw(AMOUNTS))
    for job_field in ("ok", "failed"):
        if draw(st.booleans()):
            fields[job_field] = str(draw(AMOUNTS))
    for document_type in draw(st.lists(TYPES, unique=True)):
        fields[f"tok:{document_type}"] = str(draw(AMOUNTS))
        fields[f"tfail:{document_type}"] = str(draw(AMOUNTS))
    return fields


def flat(usage: DayUsage) -> dict[tuple[str, ...], int]:
    """Every figure of a DayUsage by name, zeros left out."""
    figures: Counter[tuple[str, ...]] = Counter()
    for metric, units in usage.total.units.items():
        figures["total", metric] += units
    figures["total", "documents"] += usage.total.documents
    figures["total", "failed"] += usage.total.failed_documents
    for document_type, totals in usage.by_type.items():
        for metric, units in totals.units.items():
            figures[document_type, metric] += units
        figures[document_type, "documents"] += totals.documents
        figures[document_type, "failed"] += totals.failed_documents
    return {name: value for name, value in figures.items() if value}


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(day_hashes(), max_size=12))
def test_a_range_is_the_sum_of_its_days(days: list[dict[str, str]]) -> None:
    """The figures of several days read at once equal the sums of each day's own figures."""
    expected: Counter[tuple[str, ...]] = Counter()
    for fields in days:
        expected.update(flat(parse_day(fields)))
    assert flat(usage_of(days)) == {name: value for name, value in expected.items() if value}


def test_a_document_type_with_a_colon_keeps_its_metric() -> None:
    """tc:bank:statement:pages is 'pages' of the type 'bank:statement'."""
    usage = usage_of([{"tc:bank:statement:pages": "3"}, {"tc:bank:statement:pages": "4"}])
    assert usage.by_type["bank:statement"].units == {"pages": 7}
