"""Where a rebuild keeps its patients' lab results while it replays: a temporary SQLite file.

A rebuild holds every patient at once (a live batch only the few it touches), and what a patient
holds grows with the log: a fact and a version per lab result. So every ``SPILL_EVERY`` messages
the replay moves the lab results its patients recorded since to this file — appended, one
segment per patient, never read and rewritten — and puts a patient's back only to write their
row, a chunk of patients at a time. The rebuild's memory is
then per patient whatever the length of the log (docs/performance.md, "Rebuild memory").

The file is the rebuild's scratch space, not a record: it lives in a private temporary directory
(``TMPDIR``) and goes with the rebuild; an interrupted rebuild resumes from its checkpoint's rows,
which hold every result. An erased patient's segments are deleted as soon as their erasure is
applied, as their rows are.
"""

from __future__ import annotations

import contextlib
import pickle
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from services.outcomes.projector import ProjectedPatient

SPILL_EVERY = 20_000
"""Messages applied between two writes (each records one lab result at most: a few MiB held)."""
RESTORE_AT_ONCE = 500
"""Patients read back per query (well under SQLite's bound on a statement's parameters)."""


class SpilledResults:
    """The lab results taken out of a rebuild's patients (:meth:`ProjectedPatient.take_results`),
    per patient in the order taken. Used from one thread; :meth:`close` deletes the file."""

    def __init__(self, every: int = SPILL_EVERY) -> None:
        self.every = every
        self._directory = tempfile.TemporaryDirectory(prefix="nephrotrack-rebuild-")
        self._db = sqlite3.connect(Path(self._directory.name) / "lab-results.sqlite3", isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"  # scratch space: nothing to recover
            "CREATE TABLE segments (subject_id TEXT NOT NULL, seq INTEGER NOT NULL, results BLOB NOT NULL,"
            " PRIMARY KEY (subject_id, seq)) WITHOUT ROWID;"
        )
        self._segments = 0
        self._written: dict[str, int] = {}
        self._forgotten: set[str] = set()

    def results_of(self, subject_id: str) -> int:
        """How many lab results of the patient the file holds (superseded versions included)."""
        return self._written.get(subject_id, 0)

    def write(self, patients: Mapping[str, ProjectedPatient]) -> None:
        """Move the lab results these patients recorded since the last write out of memory, and
        append them to the file: one segment per patient (the file is ours: it holds pickles)."""
        self._segments += 1
        rows: list[tuple[str, int, bytes]] = []
        for subject_id, patient in patients.items():
            taken = patient.take_results()
            if taken:
                self._written[subject_id] = self._written.get(subject_id, 0) + len(taken)
                rows.append((subject_id, self._segments, pickle.dumps(taken, pickle.HIGHEST_PROTOCOL)))
        if rows:
            with self._transaction():
                self._db.executemany("INSERT INTO segments VALUES (?, ?, ?)", rows)

    def chunks(self, subject_ids: Iterable[str], *, patients: int, results: int) -> Iterator[list[str]]:
        """The patients in turn, ``patients`` at a time or fewer, so that a chunk holds about
        ``results`` lab results at most (one patient at least)."""
        chunk: list[str] = []
        held = 0
        for subject_id in subject_ids:
            chunk.append(subject_id)
            held += self.results_of(subject_id)
            if len(chunk) == patients or held >= results:
                yield chunk
                chunk, held = [], 0
        if chunk:
            yield chunk

    def put_back(self, patients: Mapping[str, ProjectedPatient]) -> None:
        """Put these patients' lab results back into them, every one recorded so far."""
        self.write(patients)
        subject_ids = list(patients)
        for start in range(0, len(subject_ids), RESTORE_AT_ONCE):
            chunk = subject_ids[start : start + RESTORE_AT_ONCE]
            segments = self._db.execute(
                f"SELECT subject_id, results FROM segments WHERE subject_id IN ({','.join('?' * len(chunk))})"
                " ORDER BY subject_id, seq",
                chunk,
            )
            for subject_id, results in segments:
                patients[subject_id].put_results(pickle.loads(results))

    @contextlib.contextmanager
    def restored(self, patients: Mapping[str, ProjectedPatient]) -> Iterator[None]:
        """These patients with their lab results for the ``with`` block (to write their rows);
        out of memory again afterwards (they stay in the file)."""
        self.put_back(patients)
        try:
            yield
        finally:
            for patient in patients.values():
                patient.take_results()  # they are in the file already

    def forget(self, subject_ids: Iterable[str]) -> None:
        """Delete erased patients' lab results (the patients are gone from memory already)."""
        erased = set(subject_ids) - self._forgotten
        if not erased:
            return
        with self._transaction():
            self._db.executemany("DELETE FROM segments WHERE subject_id = ?", [(s,) for s in erased])
        for subject_id in erased:
            self._written.pop(subject_id, None)
        self._forgotten |= erased

    def close(self) -> None:
        self._db.close()
        self._directory.cleanup()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
