"""A checkpoint's rows made by forked workers (services/outcomes/rebuild/rows.py) are the rows
made here, chunk for chunk, in order."""

from __future__ import annotations

from services.outcomes.handlers import rows_here
from services.outcomes.projector import ProjectedPatient
from services.outcomes.rebuild import rows
from tests.unit.outcomes.outcome_events import SID, egfr, enrolled


def test_forked_workers_give_the_rows_made_here_in_order() -> None:
    patients = {f"NT-{n:04d}": ProjectedPatient.new(f"NT-{n:04d}") for n in range(3 * rows.PARALLEL_FROM_CHUNKS)}
    patients[SID] = ProjectedPatient.new(SID)
    patients[SID].recorder.record(enrolled())
    patients[SID].recorder.record(egfr("R-1", 55.0, "2014-06-01T09:00:00"))
    chunks = [list(pair) for pair in zip(*[iter(sorted(patients))] * 2, strict=False)]
    assert len(chunks) >= rows.PARALLEL_FROM_CHUNKS
    assert list(rows.in_processes(patients, chunks, processes=2)) == list(rows_here(patients, chunks))
