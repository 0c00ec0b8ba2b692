"""Counted lab values as the v2 outcome definitions read them, and the choices made on them.

Why a type of its own (not ``EgfrPoint``): the v2 definitions apply alike to eGFR and urine
protein, whose events are still being designed; a value, its collection time and its result id
are all the definitions need, and are easy to fill from any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from operator import attrgetter
from typing import NamedTuple

DAYS_PER_YEAR = 365.25


def years_between(start: date, end: date) -> float:
    """Contract years: whole calendar days divided by 365.25 (not a datetime difference)."""
    return (end - start).days / DAYS_PER_YEAR


def mean(values: Sequence[float]) -> float | None:
    """Exact-sum mean of the defined values (``math.fsum``: independent of the order the
    patients are listed in); ``None`` when there are none."""
    return math.fsum(values) / len(values) if values else None


class _MeasurementFields(NamedTuple):
    result_id: str
    value: float
    collected_at: datetime
    collected_on: date
    """The UTC calendar date (the contract compares dates, never times of day): made once, as
    the definitions compare it again and again."""


class Measurement(_MeasurementFields):
    """One counted result (preliminaries are left out by the caller, as ``counted`` says).

    A named tuple, not a frozen dataclass: the projection builds one per counted eGFR of every
    patient a batch touches, and a frozen dataclass took three times as long to build."""

    __slots__ = ()

    def __new__(cls, result_id: str, value: float, collected_at: datetime,
                collected_on: date | None = None) -> Measurement:
        """``collected_on`` from ``collected_at`` unless the caller has it already."""
        day = collected_at.astimezone(UTC).date() if collected_on is None else collected_on
        return super().__new__(cls, result_id, value, collected_at, day)

    @property
    def order_key(self) -> tuple[datetime, str]:
        """The order of "first" and "latest", as ``EgfrPoint.order_key``: collection time, then
        the result id, so the choice never depends on the order results arrived in."""
        return (self.collected_at, self.result_id)


_ORDER_KEY = attrgetter("collected_at", "result_id")
"""``Measurement.order_key`` for sorting (C-level: the projection sorts every touched patient's eGFRs)."""


def in_order(measurements: Iterable[Measurement]) -> list[Measurement]:
    return sorted(measurements, key=_ORDER_KEY)


def after_start(measurements: Iterable[Measurement], start: date) -> list[Measurement]:
    """Those collected after treatment start (a later calendar date), oldest first."""
    return [m for m in in_order(measurements) if m.collected_on > start]


def latest_on_or_before(measurements: Iterable[Measurement], start: date) -> Measurement | None:
    return next((m for m in reversed(in_order(measurements)) if m.collected_on <= start), None)


def latest_after(measurements: Iterable[Measurement], start: date) -> Measurement | None:
    after = after_start(measurements, start)
    return after[-1] if after else None


def at_most_percent(value: float, reference: float, percent: int) -> bool:
    """``value ≤ percent % of reference``, compared as the decimals the numbers are written as.

    Why decimals: 0.6 × 12.0 is 7.199999999999999 in binary floating point, so a value of 7.2
    — exactly 60 % of 12 on paper — would not count. Reading each float as its shortest decimal
    (``repr``) makes the boundary fall where a statistician working by hand puts it."""
    return at_most_percent_of(reference, percent)(value)


def at_most_percent_of(reference: float, percent: int) -> Callable[[float], bool]:
    """``at_most_percent`` with the reference fixed, for many values: the limit is made once."""
    limit = Decimal(repr(reference)) * percent
    approximate = reference * percent
    margin = abs(approximate) * 1e-9  # far above binary rounding (~1e-16), far below any real difference

    def at_most(value: float) -> bool:
        scaled = value * 100
        if abs(scaled - approximate) > margin:  # clearly on one side: no need for decimals
            return scaled < approximate
        return Decimal(repr(value)) * 100 <= limit

    return at_most
