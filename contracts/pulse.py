"""Events pulse administration publishes (its protocol deviations: :mod:`contracts.deviations`)."""

from __future__ import annotations

from datetime import date

from shared.events import DomainEvent


class PulseDoseAdministered(DomainEvent):
    """One day's methylprednisolone pulse dose: a fact, recorded whatever the protocol says."""

    subject_id: str
    cycle: int
    day: int
    given_on: date
    dose_mg: float
    weight_kg: float
    mg_per_kg: float


EVENTS: tuple[type[DomainEvent], ...] = (
    PulseDoseAdministered,
)
