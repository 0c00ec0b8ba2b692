"""Events cell processing publishes: harvest → lot → QC → infusion (autologous chain); its
protocol deviations: :mod:`contracts.deviations`."""

from __future__ import annotations

from datetime import date

from shared.events import DomainEvent


class AdiposeTissueHarvested(DomainEvent):
    """Fat harvested from a patient; one harvest makes exactly one cell lot."""

    subject_id: str
    lot_id: str
    harvested_on: date
    fat_grams: float


class CellLotReleased(DomainEvent):
    subject_id: str
    lot_id: str
    cell_count: float
    viability_pct: float


class CellLotFailedQc(DomainEvent):
    """QC refused the lot (e.g. viability below the threshold); it can never be infused."""

    subject_id: str
    lot_id: str
    cell_count: float
    viability_pct: float
    reason: str


class CellsInfused(DomainEvent):
    subject_id: str
    lot_id: str
    given_on: date
    cell_count: float
    infusion_number: int


EVENTS: tuple[type[DomainEvent], ...] = (
    AdiposeTissueHarvested,
    CellLotReleased,
    CellLotFailedQc,
    CellsInfused,
)
