"""The rebuild's scratch file for lab results (services/outcomes/rebuild/spill.py): what goes in
comes back in the order recorded, across many writes; an erased patient's results are gone from
the file; closing deletes the file."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

import pytest

from contracts.labs import EgfrComputed
from services.outcomes.projector import ProjectedPatient
from services.outcomes.rebuild.spill import SpilledResults
from tests.unit.outcomes.outcome_events import dose, egfr, enrolled, meta, upcr


def numbered_egfr(subject_id: str, number: int, value: float) -> EgfrComputed:
    return egfr(f"R-{number}", value, f"2015-01-{1 + number % 28:02d}", sid=subject_id)


def new_patient(subject_id: str) -> tuple[ProjectedPatient, ProjectedPatient]:
    """The same patient twice: one keeps everything in memory, the other will be spilled."""
    pair = ProjectedPatient.new(subject_id), ProjectedPatient.new(subject_id)
    for p in pair:
        p.apply(meta(1), enrolled(sid=subject_id))
        p.apply(meta(2), dose(date(2014, 4, 1), sid=subject_id))
    return pair


def segments(spill: SpilledResults) -> dict[str, int]:
    return dict(spill._db.execute("SELECT subject_id, count(*) FROM segments GROUP BY subject_id"))


def test_results_come_back_in_the_order_recorded_across_many_writes() -> None:
    spill = SpilledResults()
    try:
        patients = {s: new_patient(s) for s in ("NT-1", "NT-2", "NT-3")}
        spilled_patients = {s: spilled for s, (_, spilled) in patients.items()}
        version = 10
        for round_ in range(12):
            for subject_id, (kept, spilled) in patients.items():
                version += 1
                # result 0 is corrected every round: only the newest version may come back
                for event in (numbered_egfr(subject_id, round_, 40.0 + round_),
                              numbered_egfr(subject_id, 0, 30.0 + round_),
                              upcr(f"U-{round_ % 3}", 1.0 + round_, "2015-02-01", sid=subject_id)):
                    kept.apply(meta(version), event)
                    spilled.apply(meta(version), event)
            if round_ % 2:
                spill.write(spilled_patients)
                held = [p for p in spilled_patients.values() if p.recorder.egfr or p.egfr_versions or p.recorder.urine]
                assert not held
        assert segments(spill) == {"NT-1": 6, "NT-2": 6, "NT-3": 6}
        assert spill.results_of("NT-2") == 4 + 5 * 5  # distinct results per write: 2 + 2 urine, then 3 + 2
        with spill.restored({"NT-2": spilled_patients["NT-2"]}):
            assert spilled_patients["NT-2"].row() == patients["NT-2"][0].row()
        assert not spilled_patients["NT-2"].recorder.egfr  # out again, still in the file
        spilled_patients["NT-3"].apply(meta(1_000), numbered_egfr("NT-3", 99, 12.5))  # recorded, not written yet
        patients["NT-3"][0].apply(meta(1_000), numbered_egfr("NT-3", 99, 12.5))
        spill.put_back(spilled_patients)
        assert all(spilled.row() == kept.row() for kept, spilled in patients.values())
    finally:
        spill.close()


def test_an_erased_patient_leaves_nothing_in_the_file() -> None:
    spill = SpilledResults()
    try:
        patients = {s: new_patient(s)[1] for s in ("NT-1", "NT-2")}
        for subject_id, patient in patients.items():
            for result in range(4):
                patient.apply(meta(10 + result), numbered_egfr(subject_id, result, 50.0))
        spill.write(patients)
        spill.forget(["NT-1"])
        assert set(segments(spill)) == {"NT-2"} and spill.results_of("NT-1") == 0
        again = ProjectedPatient.new("NT-1")
        spill.put_back({"NT-1": again})
        assert not again.recorder.egfr
    finally:
        spill.close()


def test_closing_deletes_the_file() -> None:
    spill = SpilledResults()
    path = Path(spill._directory.name)
    assert (path / "lab-results.sqlite3").exists() and path.stat().st_mode & 0o077 == 0  # private to this user
    spill.close()
    assert not path.exists()
    with pytest.raises(sqlite3.ProgrammingError):  # the connection is closed
        spill._db.execute("SELECT 1")


def test_patients_are_chunked_by_their_count_and_by_the_results_they_hold() -> None:
    spill = SpilledResults()
    try:
        patients = {f"NT-{i}": new_patient(f"NT-{i}")[1] for i in range(6)}
        for i, (subject_id, patient) in enumerate(patients.items()):
            for result in range(i * 10):  # 0, 10, … 50 results
                patient.apply(meta(10 + result), numbered_egfr(subject_id, result, 50.0))
        spill.write(patients)
        assert list(spill.chunks(patients, patients=4, results=1_000)) == [
            ["NT-0", "NT-1", "NT-2", "NT-3"], ["NT-4", "NT-5"]]
        assert list(spill.chunks(patients, patients=4, results=35)) == [
            ["NT-0", "NT-1", "NT-2", "NT-3"], ["NT-4"], ["NT-5"]]
        assert list(spill.chunks(patients, patients=100, results=30)) == [
            ["NT-0", "NT-1", "NT-2"], ["NT-3"], ["NT-4"], ["NT-5"]]
    finally:
        spill.close()
