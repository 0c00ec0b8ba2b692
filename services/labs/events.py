"""Events lab ingestion publishes.

Every accepted result is recorded on the stream ``labresult-<result_id>``. ``EgfrComputed``
is emitted whenever the *effective* eGFR of a result id changes (first arrival, a correction,
a preliminary superseded by a final): readers keep, per result id, the latest ``EgfrComputed``
by stream version, and count it only when ``counted`` is true.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from shared.events import DomainEvent, event

Source = Literal["broker", "mllp", "fhir"]
Status = Literal["final", "corrected", "preliminary"]


@event
class LabResultRecorded(DomainEvent):
    """A result as the lab sent it, normalised (value in the canonical unit of its analyte).

    Kept in the labs store, not published: it is the result aggregate's record of arrivals (which
    message ids it has seen, the value and unit as sent), readable at ``GET /v1/results/{id}``.
    Other services read :class:`EgfrComputed`, which carries everything they use; publishing this
    too doubled the relay's work per result for no reader (bench/RESULTS.md)."""

    published: ClassVar[bool] = False

    result_id: str
    message_id: str
    subject_id: str
    lab_id: str | None
    source: Source
    loinc: str
    analyte: Literal["creatinine", "egfr"]
    value: float
    unit: str
    canonical_value: float
    canonical_unit: Literal["mg/dL", "mL/min/1.73m2"]
    status: Status
    collected_at: datetime


@event
class EgfrComputed(DomainEvent):
    """The effective eGFR of one result id, measured or computed from creatinine."""

    result_id: str
    subject_id: str
    egfr: float
    collected_at: datetime
    status: Status
    counted: bool
    source: Source
    derived_from: Literal["creatinine", "reported"]
    creatinine_mg_dl: float | None = None
    equation: Literal["CKD-EPI 2021"] | None = None
    sex: Literal["F", "M"] | None = None
    age_years: int | None = None


@event
class LabResultCorrected(DomainEvent):
    """A ``corrected`` result replaced the value of an earlier one with the same result id."""

    result_id: str
    subject_id: str
    previous_value: float
    new_value: float
    canonical_unit: str


@event
class LabResultRejected(DomainEvent):
    """An input that was not accepted, with its raw payload; also published on ``labs.rejected``."""

    source: Source
    reason: str
    raw: str
    message_id: str | None = None
    subject_id: str | None = None
    code: str | None = None
    """Stable machine label of the reason (e.g. ``unknown_loinc``), for metrics and alerts."""
