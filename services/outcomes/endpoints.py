"""Kidney endpoints (contract, "Outcome statistics (v2)"): the confirmed eGFR decline, the
composite kidney endpoint, kidney failure with death competing, and the group curves of both.

Pure functions over :class:`KidneyCourse`, a patient's few dates and counted eGFRs, so they can
be filled from the outcome facts and tested by hand. Time zero is treatment start; times are
whole calendar days (``days``, ADTTE's AVAL) and years = days / 365.25; nothing is rounded.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal

from services.outcomes.measurements import DAYS_PER_YEAR, Measurement, after_start, at_most_percent_of

CONFIRMATION_DAYS = 28
"""A low eGFR is confirmed by the first counted eGFR collected at least this many days later."""

EndpointKind = Literal["decline_40", "kidney_failure", "death"]

_TIE_ORDER: tuple[EndpointKind, ...] = ("kidney_failure", "death", "decline_40")
"""Which endpoint a same-day tie names: kidney failure first, so the composite agrees with the
competing-risk state (death competes only when it comes *first*), then the harder endpoint."""


@dataclass(frozen=True, slots=True)
class KidneyCourse:
    """What the kidney endpoints of one patient depend on: treatment start, the contract baseline
    eGFR, the counted eGFRs (any dates, any order), the first kidney failure (dialysis or
    transplant) and death."""

    treatment_start: date | None
    baseline_egfr: float | None
    egfr: tuple[Measurement, ...] = ()
    kidney_failure_on: date | None = None
    died_on: date | None = None


@dataclass(frozen=True, slots=True)
class TimeToEvent:
    """Days from treatment start to the endpoint (``event``) or to censoring (``event`` None)."""

    days: int
    event: EndpointKind | None

    @property
    def years(self) -> float:
        return self.days / DAYS_PER_YEAR

    @property
    def observed(self) -> bool:
        return self.event is not None

    @property
    def cnsr(self) -> int:
        """ADaM's CNSR: 1 when censored, 0 when the event was observed."""
        return 0 if self.observed else 1

    @property
    def competing_state(self) -> int:
        """Kidney failure with the other endpoints competing: 0 censored, 1 kidney failure, 2 a
        competing event (death, in ``kidney_failure_competing``) first."""
        if self.event is None:
            return 0
        return 1 if self.event == "kidney_failure" else 2


def confirmed_decline(baseline: float | None, start: date | None, egfr: Iterable[Measurement],
                      percent: Literal[40, 57] = 40) -> date | None:
    """The collection date of the first counted eGFR after treatment start that is ≤ (100 −
    ``percent``) % of baseline and whose confirmation — the first counted eGFR collected ≥ 28
    days after it — is too; ``None`` without one (or without a baseline or a start).

    "First" follows collection time, then result id (``Measurement.order_key``). Of several
    results on the confirmation day, the first in that order confirms. The confirmation need not
    be the next result: those in between (collected < 28 days later) neither confirm nor refute.
    """
    if start is None:
        return None
    return _confirmed(baseline, after_start(egfr, start), percent)


def _confirmed(baseline: float | None, after: Sequence[Measurement], percent: int) -> date | None:
    """``confirmed_decline`` over the eGFRs after the start, in collection order."""
    if baseline is None:
        return None
    days = [m.collected_on for m in after]  # non-decreasing: ``after`` is in collection order
    low = at_most_percent_of(baseline, 100 - percent)
    is_low: dict[int, bool] = {}  # decided when needed: most values are never looked at twice

    def low_at(i: int) -> bool:
        if i not in is_low:
            is_low[i] = low(after[i].value)
        return is_low[i]

    for i, day in enumerate(days):
        if not low_at(i):
            continue
        confirmation = bisect_left(days, day + timedelta(days=CONFIRMATION_DAYS), lo=i + 1)
        if confirmation < len(after) and low_at(confirmation):
            return day
    return None


def _censored_at(after: Sequence[Measurement], start: date) -> TimeToEvent:
    """Censoring (contract): the latest counted eGFR after treatment start, 0 when none."""
    return TimeToEvent((after[-1].collected_on - start).days if after else 0, None)


def _first_of(start: date, candidates: dict[EndpointKind, date | None]) -> TimeToEvent | None:
    dated = [(on, _TIE_ORDER.index(kind), kind) for kind, on in candidates.items() if on is not None]
    if not dated:
        return None
    on, _, kind = min(dated)
    return TimeToEvent((on - start).days, kind)


def _at_risk_from(course: KidneyCourse) -> date | None:
    """Time zero, or ``None`` when the patient is never at risk: no treatment start, or kidney
    failure or death before it (a prevalent event cannot be an outcome of the treatment)."""
    start = course.treatment_start
    if start is None:
        return None
    if any(on is not None and on < start for on in (course.kidney_failure_on, course.died_on)):
        return None
    return start


def composite_endpoint(course: KidneyCourse) -> TimeToEvent | None:
    """The earliest of confirmed 40 % decline, kidney failure and death; without one, censored
    at the latest counted eGFR after treatment start (0 when none). ``None`` when the patient
    is never at risk (see ``_at_risk_from``): left out of the curve and of the counts.

    Censoring follows the contract to the letter — death is an event here, and withdrawal does
    not extend follow-up beyond the last eGFR, the only date the endpoint was known not reached.
    """
    return patient_endpoints(course).composite


def kidney_failure_competing(course: KidneyCourse) -> TimeToEvent | None:
    """Kidney failure (state 1) with death before it competing (state 2), else censored as the
    composite is (state 0); ``competing_state`` gives the state. Death on the day of kidney
    failure does not compete: the failure was observed. ``None`` when never at risk."""
    return patient_endpoints(course).kidney_failure


@dataclass(frozen=True, slots=True)
class PatientEndpoints:
    """One patient's kidney endpoints (the functions above), from one ordering of the eGFRs."""

    decline_40_on: date | None
    decline_57_on: date | None
    composite: TimeToEvent | None
    kidney_failure: TimeToEvent | None


def patient_endpoints(course: KidneyCourse) -> PatientEndpoints:
    """Every kidney endpoint of a patient at once: the projection computes them for each patient
    a batch touches, so the eGFRs are ordered once and the 40 % decline found once."""
    start = course.treatment_start
    if start is None:
        return PatientEndpoints(None, None, None, None)
    after = after_start(course.egfr, start)
    decline_40 = _confirmed(course.baseline_egfr, after, 40)
    decline_57 = _confirmed(course.baseline_egfr, after, 57)
    if _at_risk_from(course) is None:
        return PatientEndpoints(decline_40, decline_57, None, None)
    censored = _censored_at(after, start)
    composite = _first_of(start, {"decline_40": decline_40, "kidney_failure": course.kidney_failure_on,
                                  "death": course.died_on})
    competing = _first_of(start, {"kidney_failure": course.kidney_failure_on, "death": course.died_on})
    return PatientEndpoints(decline_40, decline_57, composite or censored, competing or censored)


@dataclass(frozen=True, slots=True)
class _RiskRow:
    """One distinct time: the number at risk just before it and its events by kind."""

    days: int
    at_risk: int
    events: dict[EndpointKind, int]

    @property
    def any_events(self) -> int:
        return sum(self.events.values())


def _risk_table(times: Sequence[TimeToEvent]) -> list[_RiskRow]:
    """One row per distinct event or censoring time, in time order."""
    by_day: dict[int, list[TimeToEvent]] = {}
    for t in times:
        by_day.setdefault(t.days, []).append(t)
    rows = []
    at_risk = len(times)
    for days in sorted(by_day):
        here = by_day[days]
        rows.append(_RiskRow(days, at_risk, dict(Counter(t.event for t in here if t.event is not None))))
        at_risk -= len(here)
    return rows


def kaplan_meier_curve(times: Iterable[TimeToEvent | None]) -> dict[str, list[Any]]:
    """Kaplan–Meier event-free survival (any endpoint is an event) in the contract's shape:
    ``times`` in years, ``survival`` just after each time, ``at_risk`` just before it,
    ``events`` at it — one entry per distinct event or censoring time, no time-0 row unless a
    patient's time is 0. ``None`` (never at risk) is left out; no patient: empty lists."""
    times = [t for t in times if t is not None]
    curve: dict[str, list[Any]] = {"times": [], "survival": [], "at_risk": [], "events": []}
    if not times:
        return curve
    from lifelines import KaplanMeierFitter  # lazily: pandas machinery, seconds of start-up

    kmf = KaplanMeierFitter().fit([t.years for t in times], [t.observed for t in times])
    table = kmf.event_table.join(kmf.survival_function_)
    for years, row in table[table["removed"] > 0].iterrows():  # lifelines adds a row at 0
        curve["times"].append(float(years))
        curve["survival"].append(float(row["KM_estimate"]))
        curve["at_risk"].append(int(row["at_risk"]))
        curve["events"].append(int(row["observed"]))
    return curve


def cumulative_incidence_curve(times: Iterable[TimeToEvent | None],
                               cause: EndpointKind = "kidney_failure") -> dict[str, list[Any]]:
    """Aalen–Johansen cumulative incidence of ``cause``, every other event competing, in the
    contract's shape (``events``: events of ``cause`` at each time; other keys as
    ``kaplan_meier_curve``). CIF(t) = Σ_{t_j ≤ t} S(t_j−) · d_cause,j / n_j with S the
    Kaplan–Meier survival from any event.

    Computed here because lifelines' ``AalenJohansenFitter`` breaks tied times by random
    jitter, which would change the answer from one request to the next; on data without ties
    the two agree (tests)."""
    rows = _risk_table([t for t in times if t is not None])
    curve: dict[str, list[Any]] = {"times": [], "cumulative_incidence": [], "at_risk": [], "events": []}
    survival, incidence = 1.0, 0.0
    for row in rows:
        caused = row.events.get(cause, 0)
        incidence += survival * caused / row.at_risk
        survival *= 1 - row.any_events / row.at_risk
        curve["times"].append(row.days / DAYS_PER_YEAR)
        curve["cumulative_incidence"].append(incidence)
        curve["at_risk"].append(row.at_risk)
        curve["events"].append(caused)
    return curve
