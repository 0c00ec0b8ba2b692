"""The API's documented shapes stay in step with what the statistics and the domain produce."""

from __future__ import annotations

from datetime import date

from services.outcomes.domain import PatientOutcome, compute_outcome, fold
from services.outcomes.exports import COLUMNS, CONTRACT_COLUMNS, SCHEMA
from services.outcomes.statistics import cohort_summary
from services.outcomes.views import CohortRow
from tests.unit.outcomes.outcome_events import dose, enrolled


def test_the_cohort_row_model_lists_every_key_of_a_cohort_summary_in_order() -> None:
    facts = fold("IGA-A-900", [enrolled(), dose(date(2014, 3, 10))])
    summary = cohort_summary([compute_outcome(facts)], "A")
    assert list(CohortRow.model_fields) == list(summary)
    assert CohortRow.model_validate(summary).model_dump() == summary


def test_exports_carry_every_patient_value_contract_columns_first() -> None:
    assert COLUMNS[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    assert sorted(COLUMNS) == sorted(PatientOutcome.model_fields)
    assert SCHEMA.names == list(COLUMNS)
    assert str(SCHEMA.field("followup_years").type) == "double" and str(SCHEMA.field("treatment_start").type) == "date32[day]"
