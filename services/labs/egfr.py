"""CKD-EPI 2021 and the age it needs: the eGFR of a creatinine result, for a patient whose age is
known only at enrollment (no birth date exists in the system). Pure functions.
"""

from __future__ import annotations

import math
from datetime import date

from contracts.enrollment import Sex

EQUATION = "CKD-EPI 2021"

# --------------------------------------------------------------------------- CKD-EPI 2021

_CKD_EPI_2021: dict[str, tuple[float, float, float]] = {
    # sex: (kappa, alpha, sex factor)
    "F": (0.7, -0.241, 1.012),
    "M": (0.9, -0.302, 1.0),
}


def ckd_epi_2021(creatinine_mg_dl: float, age_years: float, sex: Sex) -> float:
    """Race-free CKD-EPI 2021 creatinine equation (Inker LA et al., N Engl J Med
    2021;385:1737-49), in mL/min/1.73m², unrounded:

        eGFR = 142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^−1.200 × 0.9938^age × 1.012 [if female]

    κ = 0.7 (F) / 0.9 (M); α = −0.241 (F) / −0.302 (M); Scr in mg/dL (IDMS-traceable).
    Unrounded because outcomes average and regress these values; rounding is for display.
    Raises ``ValueError`` for inputs the equation is not defined for.
    """
    if sex not in _CKD_EPI_2021:
        raise ValueError(f"sex must be 'F' or 'M', not {sex!r}")
    if not (math.isfinite(creatinine_mg_dl) and creatinine_mg_dl > 0):
        raise ValueError(f"creatinine must be a positive finite mg/dL value, not {creatinine_mg_dl!r}")
    if not (math.isfinite(age_years) and age_years >= 0):
        raise ValueError(f"age must be a non-negative number of years, not {age_years!r}")
    kappa, alpha, sex_factor = _CKD_EPI_2021[sex]
    ratio = creatinine_mg_dl / kappa
    return 142.0 * min(ratio, 1.0) ** alpha * max(ratio, 1.0) ** -1.200 * 0.9938**age_years * sex_factor


# --------------------------------------------------------------------------- age


def anniversary(start: date, years: int) -> date:
    """``start`` moved by whole calendar years. A 29 February start falls on 28 February in a
    non-leap year: the last day that is still "in February", so the anniversary is never
    pushed into March (and a person enrolled on 29 Feb ages on 28 Feb in common years)."""
    try:
        return start.replace(year=start.year + years)
    except ValueError:  # 29 February in a common year
        return date(start.year + years, 2, 28)


def whole_years_between(start: date, end: date) -> int:
    """Whole calendar years from ``start`` to ``end`` by anniversary, truncated toward zero
    (negative when ``end`` is before ``start``: a result collected before enrollment)."""
    years = end.year - start.year
    if end >= start:
        return years - 1 if anniversary(start, years) > end else years
    return years + 1 if anniversary(start, years) < end else years


def age_on(age_years_at_enrollment: int, enrolled_on: date, collected_on: date) -> int:
    """Age on the collection date per the contract: the enrollment age plus the whole years, by
    calendar anniversary, from ``enrolled_on`` to ``collected_on``. No birth date exists in the
    system (pseudonymised), so the enrollment date stands in for the birthday."""
    return age_years_at_enrollment + whole_years_between(enrolled_on, collected_on)
