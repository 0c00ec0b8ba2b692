"""Tables a service keeps in plain Python beside the in-memory event store (its port's in-memory
side, e.g. outcomes' projection, labs' parked results), with a transaction's isolation.

A unit of work reads and writes its own copy of the committed tables, taken on first use, which
becomes the committed one when the unit of work commits (``uow.on_commit``): a rolled-back one
leaves nothing. That is sound because the in-memory event store runs one unit of work at a time.
"""

from __future__ import annotations

from typing import Generic, Protocol, Self, TypeVar
from weakref import WeakKeyDictionary

from shared.store.base import UnitOfWork


class Copyable(Protocol):
    def copy(self) -> Self:
        """A copy a unit of work may change without touching the original."""
        ...


T = TypeVar("T", bound=Copyable)


class StagedTables(Generic[T]):
    def __init__(self, committed: T) -> None:
        self.committed = committed
        self._open: WeakKeyDictionary[UnitOfWork, T] = WeakKeyDictionary()

    def of(self, uow: UnitOfWork) -> T:
        """The tables as ``uow`` sees them: the committed ones with its own writes."""
        tables = self._open.get(uow)
        if tables is None:
            tables = self._open[uow] = self.committed.copy()
            uow.on_commit(lambda: self._commit(uow))
        return tables

    def _commit(self, uow: UnitOfWork) -> None:
        self.committed = self._open.pop(uow)
