"""Analysis locks: a name under which the projection's current answers are frozen for good
(contract, "Outcome statistics (v2)", time travel). Pure rules and the lock's event; the use
case is :func:`services.outcomes.handlers.lock_analysis`, the storage the projection port's.

A lock is a *frozen generation*: the active generation's rows copied under a generation number
below zero, which rebuilds never write nor drop (docs/time-travel.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from shared.errors import Invalid
from shared.events import DomainEvent

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""1 to 64 letters, digits, ``.``, ``_`` or ``-``, beginning with a letter or digit: safe in a URL
query, a file name and a log line (``interim-2026``, ``DSMB_2027.1``)."""
_NAME = re.compile(NAME_PATTERN)


class LockNameInvalid(Invalid):
    """A lock name the rules refuse (422)."""


class AnalysisLocked(DomainEvent):
    """An analyst froze the projection's answers under ``name``: ``positions`` is the JetStream
    sequence applied per source stream at that moment, ``generation`` the frozen copy's number.
    Kept in the outcomes store (its audit trail), never published: no other service reads it."""

    published: ClassVar[bool] = False

    name: str
    generation: int
    positions: dict[str, int]


@dataclass(frozen=True)
class AnalysisLock:
    """A lock as ``GET /v1/locks`` lists it (a row of ``analysis_locks``)."""

    name: str
    generation: int
    locked_at: datetime
    actor: str
    positions: dict[str, int]


EVENTS: tuple[type[DomainEvent], ...] = (AnalysisLocked,)


def check_name(name: str) -> str:
    """The name, if the rules allow it (:data:`NAME_PATTERN`)."""
    if not is_valid_name(name):
        raise LockNameInvalid(
            f"lock name {name[:80]!r} is not allowed: 1 to 64 letters, digits, '.', '_' or '-', "
            "beginning with a letter or digit"
        )
    return name


def is_valid_name(name: str) -> bool:
    """Whether the rules allow the name (a name they refuse names no lock, whatever it holds)."""
    return _NAME.fullmatch(name) is not None  # not match: "$" would let a final newline through


def stream_id(name: str) -> str:
    """One stream per lock: appending its first event at version 0 is what makes a name taken
    exactly once, even by two analysts at the same moment."""
    return f"analysis-lock-{name}"


def frozen_generation(existing: list[int]) -> int:
    """The next frozen generation: below zero and below every other frozen one (rebuilds number
    theirs upwards from the active one, so the two can never meet)."""
    return min([0, *existing]) - 1


def is_frozen(generation: int) -> bool:
    return generation < 0
