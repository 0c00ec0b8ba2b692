"""Patients the live projection keeps between batches, each with the version of the row it wrote.

A live batch loads, locks and rewrites every patient it touches, with their whole history; under
a stream of lab results the same patients come back batch after batch. Parsing each one's row
again, and deriving again what their unchanged results derive to, was most of the outcomes
process's work (docs/performance.md, "End to end, live"). A remembered patient is used only while
their row is still the row this process wrote — PostgreSQL's row version (``xmin``) unchanged —
so a write by another replica, a migration or an erasure is never missed: the row is read again.
A batch takes its patients out and puts back only what it wrote, so a failed batch leaves
nothing behind to trust. SQLite rows carry no version: nothing is remembered there.
"""

from __future__ import annotations

from services.outcomes.projector import ProjectedPatient
from shared import metrics


class RememberedPatients:
    """At most about ``max_results`` eGFR results' worth of patients (the least recently written
    go first), of one generation (the served one: a swap forgets the other's)."""

    def __init__(self, max_results: int) -> None:
        self.max_results = max_results
        self._generation: int | None = None
        self._patients: dict[str, tuple[str, ProjectedPatient]] = {}
        self._held = 0

    def __len__(self) -> int:
        return len(self._patients)

    def take(self, generation: int, subject_id: str, version: str) -> ProjectedPatient | None:
        """The patient as this process last wrote them, if their row is at ``version`` still;
        either way they are no longer remembered (the caller writes them, or reads them again)."""
        if generation != self._generation:
            return None
        found = self._patients.pop(subject_id, None)
        if found is None:
            return None
        self._held -= found[1].size
        metrics.OUTCOMES_REMEMBERED_RESULTS.set(self._held)
        return found[1] if found[0] == version else None

    def keep(self, generation: int, subject_id: str, version: str, patient: ProjectedPatient) -> None:
        """Remember ``patient`` as written at row ``version`` (in a transaction not yet
        committed: if it rolls back, the row keeps its old version and this one never matches)."""
        if generation != self._generation:
            self._patients.clear()
            self._held = 0
            self._generation = generation
        previous = self._patients.pop(subject_id, None)
        if previous is not None:
            self._held -= previous[1].size
        if patient.size <= self.max_results:  # a patient larger than the whole bound is not kept
            self._patients[subject_id] = version, patient
            self._held += patient.size
            while self._held > self.max_results:
                oldest = next(iter(self._patients))
                self._held -= self._patients.pop(oldest)[1].size
        metrics.OUTCOMES_REMEMBERED_RESULTS.set(self._held)
