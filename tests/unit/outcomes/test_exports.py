"""The CSV export neutralises formulas (OWASP, CSV injection): older data may hold subject ids
enrollment now refuses, and a spreadsheet opening the export must show them, not run them."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta

import pytest
from outcome_events import dose, egfr, enrolled

from services.outcomes.domain import PatientOutcome, compute_outcome, fold
from services.outcomes.exports import patients_csv

START = date(2014, 3, 10)


def declining(sid: str) -> PatientOutcome:
    """A patient whose eGFR falls after treatment: a negative slope and change."""
    results = [egfr(f"{sid}-{n}", 40.0 - 5 * n, (START + timedelta(days=365 * n)).isoformat(), sid=sid)
               for n in (0, 1, 2)]
    return compute_outcome(fold(sid, [enrolled(sid=sid), dose(START, sid=sid), *results]))


def rows(outcomes: list[PatientOutcome]) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(patients_csv(outcomes), newline="")))


@pytest.mark.parametrize("subject_id", ["=HYPERLINK(1)", "+12", "-1+2", "@SUM-1", "\tIGA-1", "\rIGA-1"])
def test_a_text_cell_a_spreadsheet_would_evaluate_is_prefixed_with_a_quote(subject_id: str) -> None:
    header, row = patients_csv([declining(subject_id)]).split("\n")[:2]
    assert header.startswith("subject_id,") and row.startswith("'" + subject_id)


def test_numbers_stay_numbers_and_ordinary_ids_are_untouched() -> None:
    outcome = declining("IGA-A-001")
    (row,) = rows([outcome])
    assert row["subject_id"] == "IGA-A-001"
    assert outcome.egfr_slope is not None and outcome.egfr_slope < 0
    assert float(row["egfr_slope"]) == outcome.egfr_slope and row["egfr_slope"].startswith("-")
    assert float(row["egfr_change"]) == outcome.egfr_change == -10.0 and row["egfr_change"] == "-10.0"
