"""The bounds of a clinical date, one rule for every command that carries one.

A date outside them is a typo, not a fact: an enrollment on 0001-01-01 makes a creatinine the
eGFR of a 2,000-year-old (a false kidney failure), a dose on 9999-12-31 becomes the treatment
start. So enrollment, clinical events, biopsies, pulse doses, harvests, infusions and lab
collection times are refused before :data:`EARLIEST_CLINICAL_DATE` or after tomorrow — tomorrow,
not today, because a site ahead of UTC records facts on its own calendar day while ours is still
the day before. New commands only: events already recorded keep their dates and meaning.

Pure: the adapter reads its clock (:func:`utc_today`) and passes ``today`` in.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from shared.errors import Invalid

EARLIEST_CLINICAL_DATE = date(1900, 1, 1)
FUTURE_ALLOWANCE = timedelta(days=1)
"""How far past today (UTC) a clinical date may lie: a day, for the sites ahead of UTC."""


def before_earliest(field: str, value: str) -> str:
    """The reason a ``field`` holding ``value`` (as the caller wrote it) is refused as too early;
    labs reuses it for its own refusal code."""
    return f"{field} {value} is before {EARLIEST_CLINICAL_DATE}, the earliest clinical date accepted"


def check_clinical_date(field: str, on: date, *, today: date) -> None:
    """Refuse ``on`` (the command's ``field``) outside [1900-01-01, today + 1 day], naming the
    field and the bound it crossed."""
    if on < EARLIEST_CLINICAL_DATE:
        raise Invalid(before_earliest(field, on.isoformat()), code="DateTooEarly")
    latest = today + FUTURE_ALLOWANCE
    if on > latest:
        raise Invalid(f"{field} {on} is after {latest} (today + 1 day): a clinical date cannot lie in the future",
                      code="DateInFuture")


def utc_today() -> date:
    """The adapters' clock for :func:`check_clinical_date`."""
    return datetime.now(UTC).date()
