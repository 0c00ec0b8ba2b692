"""Total and chronic eGFR slopes: the REML mixed model against independent fits, and the reasons
a slope is not given."""

from __future__ import annotations

import random
import warnings
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.outcomes.domain import least_squares_slope
from services.outcomes.measurements import Measurement
from services.outcomes.slopes import PatientEgfr, group_slopes

START = date(2015, 1, 1)
Y = 365.25


def patient(sid: str, points: list[tuple[int, float]], start: date = START) -> PatientEgfr:
    """Counted eGFRs as (days since treatment start, value)."""
    return PatientEgfr(sid, start, tuple(
        Measurement(f"{sid}-{n}", value, datetime.combine(start + timedelta(days=days), time(8), UTC))
        for n, (days, value) in enumerate(points)))


def simulated(seed: int, patients: int, days: list[int] | None = None, slope_sd: float = 1.5) -> list[PatientEgfr]:
    """Patients declining 2 mL/min/year on average, each with their own intercept and slope, plus
    noise; measured on ``days`` (balanced) or on 1-6 random days each."""
    rng = np.random.default_rng(seed)
    cohort = []
    for p in range(patients):
        intercept, slope = 40 + rng.normal(0, 5), -2 + rng.normal(0, slope_sd)
        when = days or sorted({int(d) for d in rng.integers(1, 1800, size=int(rng.integers(1, 7)))})
        cohort.append(patient(f"P{p:02d}", [(d, intercept + slope * d / Y + rng.normal(0, 2)) for d in when]))
    return cohort


def test_balanced_design_the_fixed_slope_is_the_mean_of_per_patient_least_squares_slopes():
    days = [30, 120, 365, 540, 730, 1095]
    cohort = simulated(seed=3, patients=9, days=days)
    own = [least_squares_slope([d / Y for d in days], [m.value for m in p.egfr]) for p in cohort]
    total = group_slopes(cohort)["total"]
    assert total["slope"] == pytest.approx(sum(own) / len(own), rel=1e-9)
    assert total["ci_low"] < total["slope"] < total["ci_high"]
    assert (total["patients"], total["measurements"], total["reason"]) == (9, 54, None)


def test_unbalanced_design_agrees_with_statsmodels_reml():
    """The slope is statsmodels' where its fit converges cleanly; the interval is β1 ± 1.96 SE
    with SE² = σ² [(Σ X'V⁻¹X)⁻¹]₁₁ computed densely from statsmodels' variance estimates."""
    from statsmodels.regression.mixed_linear_model import MixedLM
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    cohort = simulated(seed=2, patients=10)
    xs = {p.subject_id: np.array([(m.collected_on - START).days / Y for m in p.egfr]) for p in cohort}
    ys = {p.subject_id: np.array([m.value for m in p.egfr]) for p in cohort}
    exog = np.column_stack([np.ones(sum(map(len, xs.values()))), np.concatenate(list(xs.values()))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # only a clean statsmodels fit is a reference
        reference = MixedLM(np.concatenate(list(ys.values())), exog,
                            groups=[sid for sid, x in xs.items() for _ in x], exog_re=exog).fit(reml=True)
    information = np.zeros((2, 2))
    for x in xs.values():
        z = np.column_stack([np.ones(len(x)), x])
        v = z @ np.asarray(reference.cov_re) @ z.T + reference.scale * np.eye(len(x))
        information += z.T @ np.linalg.inv(v) @ z
    se = np.sqrt(np.linalg.inv(information)[1, 1])

    total = group_slopes(cohort)["total"]
    assert total["slope"] == pytest.approx(reference.fe_params[1], abs=1e-5)
    assert [total["ci_low"], total["ci_high"]] == pytest.approx(
        [reference.fe_params[1] - 1.959963984540054 * se, reference.fe_params[1] + 1.959963984540054 * se], abs=1e-4)


def test_chronic_slope_starts_at_day_91_and_total_after_treatment_start():
    cohort = [patient(f"P{p}", [(-10, 50.0), (0, 45.0), (30, 44.0 - p), (90, 43.0), (91, 42.0 + p),
                                (400, 40.0 - p), (800, 38.0 + p / 2)]) for p in range(4)]
    slopes = group_slopes(cohort)
    assert (slopes["total"]["patients"], slopes["total"]["measurements"]) == (4, 20)
    assert (slopes["chronic"]["patients"], slopes["chronic"]["measurements"]) == (4, 12)
    assert slopes["total"]["slope"] is not None and slopes["chronic"]["slope"] is not None


def test_the_answer_does_not_depend_on_the_order_patients_or_results_come_in():
    cohort = simulated(seed=5, patients=7)
    shuffled = [PatientEgfr(p.subject_id, p.treatment_start, tuple(random.Random(1).sample(p.egfr, len(p.egfr))))
                for p in random.Random(2).sample(cohort, len(cohort))]
    assert group_slopes(shuffled) == group_slopes(cohort)


def test_too_few_patients_with_a_slope_of_their_own():
    one = group_slopes([patient("A", [(10, 40.0), (200, 38.0), (400, 37.0), (600, 35.0)])])["total"]
    assert one == {"slope": None, "ci_low": None, "ci_high": None, "patients": 1, "measurements": 4,
                   "reason": one["reason"]}
    assert one["reason"].startswith("too few patients: 1 measured on two days or more")
    # a second patient measured once (or twice on one day) has no slope of their own
    single = group_slopes([patient("A", [(10, 40.0), (200, 38.0), (400, 37.0), (600, 35.0)]),
                           patient("B", [(50, 30.0), (50, 31.0)])])["total"]
    assert single["slope"] is None and single["reason"].startswith("too few patients: 1 ")
    assert group_slopes([])["total"]["reason"].startswith("too few patients: 0 ")


def test_too_few_measurements_for_a_random_intercept_and_slope_per_patient():
    cohort = [patient(f"P{p}", [(100, 40.0 + p), (500, 38.0 - p)]) for p in range(5)]
    total = group_slopes(cohort)["total"]
    assert (total["slope"], total["patients"], total["measurements"]) == (None, 5, 10)
    assert total["reason"].startswith("too few measurements: 10 for 5 patients")


def test_no_residual_variance_is_singular_not_a_number():
    lines = [patient(f"P{p}", [(d, 40.0 - p - (p + 1) * d / Y) for d in (100, 400, 700)]) for p in range(3)]
    total = group_slopes(lines)["total"]
    assert total["slope"] is None and total["reason"].startswith("singular: no residual variance")
    flat = [patient(f"P{p}", [(d, 40.0) for d in (100, 400, 700)]) for p in range(3)]
    assert group_slopes(flat)["total"]["reason"].startswith("singular: no residual variance")


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 2000), min_size=3, max_size=6, unique=True),
       st.lists(st.lists(st.floats(10, 90).map(lambda v: round(v, 1)), min_size=6, max_size=6), min_size=2, max_size=6))
def test_balanced_designs_fixed_slope_is_the_mean_least_squares_slope_for_any_data(days, values):
    cohort = [patient(f"P{p}", list(zip(days, ys, strict=False))) for p, ys in enumerate(values)]
    total = group_slopes(cohort)["total"]
    if total["slope"] is None:  # only data on exact lines may be refused
        assert total["reason"].startswith("singular: no residual variance")
        return
    own = [least_squares_slope([d / Y for d in days], list(ys[:len(days)])) for ys in values]
    assert total["slope"] == pytest.approx(sum(own) / len(own), rel=1e-7, abs=1e-9)
