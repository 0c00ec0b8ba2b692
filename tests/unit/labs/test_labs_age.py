"""Age on the collection date: enrollment age + whole years by calendar anniversary."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.labs.egfr import age_on, anniversary, whole_years_between

ENROLLED = date(2014, 3, 2)


@pytest.mark.parametrize(
    ("collected", "expected"),
    [
        (date(2014, 3, 2), 58),  # enrollment day
        (date(2015, 3, 1), 58),  # day before the first anniversary
        (date(2015, 3, 2), 59),  # anniversary
        (date(2021, 6, 1), 65),  # seven anniversaries passed
        (date(2013, 3, 3), 58),  # before enrollment, less than a whole year back
        (date(2013, 3, 2), 57),  # a whole year before enrollment
    ],
)
def test_age_on(collected, expected):
    assert age_on(58, ENROLLED, collected) == expected


def test_29_february_anniversary_is_28_february_in_common_years():
    leap = date(2016, 2, 29)
    assert anniversary(leap, 1) == date(2017, 2, 28)
    assert age_on(40, leap, date(2017, 2, 27)) == 40
    assert age_on(40, leap, date(2017, 2, 28)) == 41
    assert age_on(40, leap, date(2020, 2, 28)) == 43  # 2020 is leap: anniversary is 29 Feb
    assert age_on(40, leap, date(2020, 2, 29)) == 44


dates = st.dates(min_value=date(1950, 1, 1), max_value=date(2100, 12, 31))


@given(st.integers(18, 90), dates)
def test_same_day_is_enrollment_age(age, day):
    assert age_on(age, day, day) == age


@given(dates, dates, dates)
def test_age_never_decreases_with_later_collection(start, a, b):
    early, late = sorted((a, b))
    assert whole_years_between(start, early) <= whole_years_between(start, late)


@given(dates, st.integers(-40, 40))
def test_anniversaries_are_exact_steps(start, years):
    on = anniversary(start, years)
    assert whole_years_between(start, on) == years
    if years > 0:
        assert whole_years_between(start, on - timedelta(days=1)) == years - 1
    if years < 0:
        assert whole_years_between(start, on + timedelta(days=1)) == years + 1


@given(dates, dates)
def test_whole_years_is_the_last_anniversary_passed(start, end):
    years = whole_years_between(start, end)
    if end >= start:
        assert anniversary(start, years) <= end < anniversary(start, years + 1)
    else:
        assert anniversary(start, years - 1) < end <= anniversary(start, years)
