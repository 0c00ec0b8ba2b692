"""The labs service's own event: kept in its store, never published (the published ones are in
:mod:`contracts.labs`)."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from contracts.labs import Analyte, Source, Status
from services.labs.catalogue import CanonicalUnit
from shared.events import DomainEvent


class LabResultRecorded(DomainEvent):
    """A result as the lab sent it, normalised (value in the canonical unit of its analyte).

    Kept in the labs store, not published: it is the result aggregate's record of arrivals (which
    message ids it has seen, the value and unit as sent), readable at ``GET /v1/results/{id}``.
    Other services read :class:`EgfrComputed` and :class:`UrineResultMeasured`, which carry
    everything they use; publishing this
    too doubled the relay's work per result for no reader (bench/RESULTS.md)."""

    published: ClassVar[bool] = False

    result_id: str
    message_id: str
    subject_id: str
    lab_id: str | None
    source: Source
    loinc: str
    analyte: Analyte
    value: float
    unit: str
    canonical_value: float
    canonical_unit: CanonicalUnit
    status: Status
    collected_at: datetime


EVENTS: tuple[type[DomainEvent], ...] = (LabResultRecorded,)
