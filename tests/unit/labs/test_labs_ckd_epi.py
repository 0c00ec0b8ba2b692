"""CKD-EPI 2021 against worked values.

Equation and coefficients: Inker LA, Eneanya ND, Coresh J, et al. New creatinine- and cystatin
C-based equations to estimate GFR without race. N Engl J Med 2021;385:1737-49 (Table/Supplement:
eGFRcr = 142 × min(Scr/κ,1)^α × max(Scr/κ,1)^−1.200 × 0.9938^age × 1.012 [female],
κ 0.7/0.9, α −0.241/−0.302), as published by the NKF/ASN task force and implemented in the NKF
eGFR calculator (kidney.org, "CKD-EPI Creatinine Equation (2021)"), which reports whole numbers.

Each expected value below was worked out by hand from those coefficients with natural logs
(ln 0.9938 = −0.0062193), independently of the code, and is given at one decimal and at the
whole number the calculator shows. The 55-year-old man with Scr 1.2 mg/dL → 71 is the example
commonly quoted from the kidney.org calculator.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.labs.egfr import ckd_epi_2021

WORKED = [
    # (Scr mg/dL, age, sex, one decimal, whole number, hand working)
    # Scr/κ = 1/0.7 = 1.42857 > 1: 1.42857^-1.2 = e^(0.356675×-1.2) = 0.65182;
    # 0.9938^50 = e^-0.310965 = 0.73277; 142 × 0.65182 × 0.73277 × 1.012 = 68.6
    (1.0, 50, "F", 68.6, 69, "female above kappa"),
    # Scr/κ = 1/0.9 = 1.11111: e^(0.105361×-1.2) = 0.88124; 142 × 0.88124 × 0.73277 = 91.7
    (1.0, 50, "M", 91.7, 92, "male above kappa"),
    # 1.2/0.9 = 1.33333: e^(0.287682×-1.2) = 0.70807; 0.9938^55 = e^-0.342062 = 0.71030; → 71.4
    (1.2, 55, "M", 71.4, 71, "kidney.org calculator example"),
    # 0.5/0.7 = 0.71429 < 1: e^(-0.336472×-0.241) = 1.08447; 0.9938^30 = 0.82979; ×1.012 → 129.3
    (0.5, 30, "F", 129.3, 129, "female below kappa"),
    # 0.7/0.9 = 0.77778 < 1: e^(-0.251314×-0.302) = 1.07885; 0.9938^40 = 0.77975 → 119.5
    (0.7, 40, "M", 119.5, 119, "male below kappa"),
    # Scr = κ: both power terms are 1; 142 × 0.9938^60 (0.68855) × 1.012 = 98.9
    (0.7, 60, "F", 98.9, 99, "female at kappa"),
    # 4.0/0.9 = 4.44444: e^(1.491655×-1.2) = 0.16695; 0.9938^70 = 0.64705 → 15.3 (G4/G5 border)
    (4.0, 70, "M", 15.3, 15, "severe CKD"),
]


@pytest.mark.parametrize(("scr", "age", "sex", "one_decimal", "whole", "case"), WORKED,
                         ids=[case[-1] for case in WORKED])
def test_published_worked_values(scr, age, sex, one_decimal, whole, case):
    egfr = ckd_epi_2021(scr, age, sex)
    assert round(egfr, 1) == one_decimal
    assert round(egfr) == whole


def test_result_is_unrounded():
    assert ckd_epi_2021(1.0, 50, "F") != round(ckd_epi_2021(1.0, 50, "F"), 1)


def test_kappa_is_where_the_exponent_changes():
    # Left and right of κ the slope in log space is α and −1.2 respectively.
    below = math.log(ckd_epi_2021(0.899, 50, "M") / ckd_epi_2021(0.898, 50, "M")) / math.log(0.899 / 0.898)
    above = math.log(ckd_epi_2021(0.902, 50, "M") / ckd_epi_2021(0.901, 50, "M")) / math.log(0.902 / 0.901)
    assert below == pytest.approx(-0.302, abs=1e-6)
    assert above == pytest.approx(-1.200, abs=1e-6)


@pytest.mark.parametrize(("scr", "age", "sex"), [(0, 50, "F"), (-1, 50, "M"), (math.nan, 50, "F"),
                                                 (math.inf, 50, "M"), (1.0, -1, "F"), (1.0, 50, "X")])
def test_undefined_inputs_raise(scr, age, sex):
    with pytest.raises(ValueError):
        ckd_epi_2021(scr, age, sex)


creatinine = st.floats(min_value=0.05, max_value=30, allow_nan=False)
ages = st.integers(min_value=18, max_value=100)


@given(creatinine, creatinine, ages, st.sampled_from(["F", "M"]))
def test_higher_creatinine_never_raises_egfr(a, b, age, sex):
    low, high = sorted((a, b))
    assert ckd_epi_2021(high, age, sex) <= ckd_epi_2021(low, age, sex) * (1 + 1e-12)


@given(creatinine, ages, st.sampled_from(["F", "M"]))
def test_each_year_of_age_multiplies_by_0_9938(scr, age, sex):
    assert ckd_epi_2021(scr, age + 1, sex) / ckd_epi_2021(scr, age, sex) == pytest.approx(0.9938)


@given(st.floats(min_value=0.9, max_value=30), ages)
def test_above_both_kappas_female_is_male_times_constant(scr, age):
    # For Scr ≥ 0.9 both sexes are on the −1.2 branch: F/M = 1.012 × (0.7/0.9)^1.2 ≈ 0.75.
    ratio = ckd_epi_2021(scr, age, "F") / ckd_epi_2021(scr, age, "M")
    assert ratio == pytest.approx(1.012 * (0.7 / 0.9) ** 1.2)
