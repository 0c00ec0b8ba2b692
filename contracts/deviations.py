"""The protocol-deviation event, shared by every service that checks the protocol.

Pulse administration and cell processing both raise it; outcomes and operators read it the
same way whichever service found the deviation, so it is one published event type.
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum

from shared.events import DomainEvent


class DeviationCode(StrEnum):
    DOSE_ABOVE_DAILY_MAX = "DOSE_ABOVE_DAILY_MAX"  # > 1000 mg/day
    DOSE_OUTSIDE_MG_PER_KG = "DOSE_OUTSIDE_MG_PER_KG"  # outside 20–30 mg/kg/day
    CYCLE_DAYS_NOT_CONSECUTIVE = "CYCLE_DAYS_NOT_CONSECUTIVE"
    CYCLE_DAY_REPEATED = "CYCLE_DAY_REPEATED"
    CYCLE_STARTED_BEFORE_PREVIOUS_ENDED = "CYCLE_STARTED_BEFORE_PREVIOUS_ENDED"
    TOO_MANY_CYCLES = "TOO_MANY_CYCLES"  # > 17 cycles
    TOO_MANY_INFUSIONS = "TOO_MANY_INFUSIONS"  # > 4 infusions
    INFUSION_DOSE_OFF_TARGET = "INFUSION_DOSE_OFF_TARGET"  # far from 3×10^7 cells


class ProtocolDeviationDetected(DomainEvent):
    """A recorded fact broke a protocol rule. The fact itself stays recorded; this flags it."""

    subject_id: str
    code: DeviationCode
    detail: str
    occurred_on: date
    cycle: int | None = None
    day: int | None = None
    lot_id: str | None = None


EVENTS: tuple[type[DomainEvent], ...] = (
    ProtocolDeviationDetected,
)
