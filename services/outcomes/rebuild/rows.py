"""A checkpoint's patient rows, serialised on every core.

Serialising the patients (every lab result as canonical JSON, and each outcome computed) is the
rebuild's largest step after decoding (docs/performance.md), and while it runs nothing else does:
no message is read, PostgreSQL waits for the rows. So the chunks are serialised by worker
processes forked for the checkpoint — they inherit the patients as they are, nothing is copied
to them — and come back in order, a chunk at a time, as the checkpoint writes them. The rows are
those of ``ProjectedPatient.row``, the same function live and rebuilt, only run elsewhere.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from services.outcomes.projector import ProjectedPatient

PARALLEL_FROM_CHUNKS = 8
"""Fewer chunks than this are serialised here (forking costs more than they do)."""

_patients: Mapping[str, ProjectedPatient] = {}
"""The patients the forked workers serialise: set just before the fork, which copies it in."""


def _rows(subjects: Sequence[str]) -> list[dict[str, Any]]:
    return [_patients[s].row() for s in subjects]


def in_processes(
    patients: Mapping[str, ProjectedPatient], chunks: Sequence[Sequence[str]], processes: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The rows of each chunk of subjects, in order: from ``processes`` forked workers (default:
    one per core) when there are enough chunks and the platform forks, else serialised here."""
    global _patients
    processes = processes or os.cpu_count() or 1
    if processes < 2 or len(chunks) < PARALLEL_FROM_CHUNKS or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunks:
            yield [patients[s].row() for s in chunk]
        return
    _patients = patients
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            _patients = {}  # the workers have their copy; this process needs none
            yield from pool.imap(_rows, chunks)
    finally:
        _patients = {}
