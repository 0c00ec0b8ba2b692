"""Events pulse administration publishes."""

from __future__ import annotations

from datetime import date

from shared.deviations import ProtocolDeviationDetected  # noqa: F401  (published here too)
from shared.events import DomainEvent, event


@event
class PulseDoseAdministered(DomainEvent):
    """One day's methylprednisolone pulse dose: a fact, recorded whatever the protocol says."""

    subject_id: str
    cycle: int
    day: int
    given_on: date
    dose_mg: float
    weight_kg: float
    mg_per_kg: float
