"""The cells use cases (services/cells/handlers.py) on the in-memory event store: harvest →
release → infusion over the patient's and the lot's streams, the refusals (unknown patient, a
control, another patient's lot, a lot infused twice, after death or withdrawal), a recorded QC
failure, and concurrent writers on one lot."""

from __future__ import annotations

from datetime import date
from functools import partial

import pytest
from prometheus_client import REGISTRY

from contracts.cells import AdiposeTissueHarvested, CellLotFailedQc, CellLotReleased, CellsInfused
from contracts.deviations import ProtocolDeviationDetected
from services.cells import handlers
from services.cells.domain import HarvestAdiposeTissue, InfuseCells, ReleaseLot
from shared.errors import Conflict, Invalid, NotFound
from shared.store import EventStore, open_store
from tests.unit.clinical_register import learned_end_of_study, learned_enrollment
from tests.unit.contested import contested

ALICE, BOB = "IGA-A-001", "IGA-B-002"
TODAY = date(2026, 12, 5)


@pytest.fixture
async def store() -> EventStore:
    store = open_store("memory://")
    await learned_enrollment(store, ALICE)
    await learned_enrollment(store, BOB, group="B")
    return store


def harvest(subject_id: str = ALICE, on: date = date(2014, 6, 1), grams: float = 120) -> handlers.Harvest:
    return handlers.Harvest(subject_id, HarvestAdiposeTissue(harvested_on=on, fat_grams=grams), today=TODAY)


def release(lot_id: str, viability: float = 92) -> handlers.Release:
    return handlers.Release(lot_id, ReleaseLot(cell_count=3.1e7, viability_pct=viability))


def infuse(subject_id: str, lot_id: str, on: date = date(2014, 7, 1), cells: float = 3.0e7) -> handlers.Infuse:
    return handlers.Infuse(subject_id, InfuseCells(lot_id=lot_id, given_on=on, cell_count=cells), today=TODAY)


async def released_lot(store: EventStore, subject_id: str = ALICE, grams: float = 120) -> str:
    lot = await store.transact(partial(handlers.harvest, harvest(subject_id, grams=grams)))
    await store.transact(partial(handlers.release, release(lot.lot_id)))
    return lot.lot_id


async def kinds(store: EventStore, stream_id: str) -> list[type]:
    return [type(e.decode()) for e in await store.read_stream(stream_id)]


async def test_harvest_release_infusion_on_both_streams(store: EventStore) -> None:
    command = harvest()
    lot = await store.transact(partial(handlers.harvest, command))
    assert (lot.lot_id, lot.subject_id, lot.status) == (command.lot_id, ALICE, "harvested")
    assert command.lot_id.startswith("LOT-") and ALICE not in command.lot_id
    released = await store.transact(partial(handlers.release, release(lot.lot_id)))
    assert (released.lot.status, released.qc_failure) == ("released", None)
    [infused] = await store.transact(partial(handlers.infuse, infuse(ALICE, lot.lot_id)))
    assert infused.payload["infusion_number"] == 1
    assert await kinds(store, f"lot-{lot.lot_id}") == [AdiposeTissueHarvested, CellLotReleased, CellsInfused]
    assert await kinds(store, f"cells-patient-{ALICE}") == [AdiposeTissueHarvested, CellLotReleased, CellsInfused]


async def test_a_failed_qc_is_recorded_and_answered_with_its_reason(store: EventStore) -> None:
    lot = await store.transact(partial(handlers.harvest, harvest()))
    failed = await store.transact(partial(handlers.release, release(lot.lot_id, viability=50)))
    assert failed.lot.status == "failed_qc" and "viability 50% is below the 70% release minimum" in failed.qc_failure
    assert (await kinds(store, f"lot-{lot.lot_id}"))[-1] is CellLotFailedQc
    with pytest.raises(Invalid, match="failed QC and can never be infused"):
        await store.transact(partial(handlers.infuse, infuse(ALICE, lot.lot_id)))


async def test_unknown_patient_lot_and_control_are_refused(store: EventStore) -> None:
    await learned_enrollment(store, "CTRL-01", group="control")
    with pytest.raises(NotFound, match="no patient is enrolled with subject id IGA-A-404"):
        await store.transact(partial(handlers.harvest, harvest("IGA-A-404")))
    with pytest.raises(Invalid, match="control group"):
        await store.transact(partial(handlers.harvest, harvest("CTRL-01")))
    with pytest.raises(NotFound, match="lot LOT-NONE does not exist"):
        await store.transact(partial(handlers.release, release("LOT-NONE")))
    with pytest.raises(NotFound, match="lot LOT-NONE does not exist"):
        await store.transact(partial(handlers.infuse, infuse(ALICE, "LOT-NONE")))


async def test_another_patients_lot_is_refused_and_nothing_recorded(store: EventStore) -> None:
    lot_id = await released_lot(store, ALICE)
    with pytest.raises(Invalid, match="chain of identity"):
        await store.transact(partial(handlers.infuse, infuse(BOB, lot_id)))
    assert await store.read_stream(f"cells-patient-{BOB}") == []


async def test_a_lot_is_infused_once_and_a_repeat_is_a_conflict(store: EventStore) -> None:
    lot_id = await released_lot(store)
    await store.transact(partial(handlers.infuse, infuse(ALICE, lot_id)))
    with pytest.raises(Conflict, match="already recorded"):
        await store.transact(partial(handlers.infuse, infuse(ALICE, lot_id)))
    with pytest.raises(Invalid, match="a lot is infused once"):
        await store.transact(partial(handlers.infuse, infuse(ALICE, lot_id, on=date(2014, 7, 2))))


@pytest.mark.parametrize("end", [{"died_on": date(2014, 6, 30)}, {"withdrawn_on": date(2014, 6, 30)}])
async def test_no_harvest_or_infusion_after_death_or_withdrawal(store: EventStore, end: dict[str, date]) -> None:
    lot_id = await released_lot(store)
    await learned_end_of_study(store, ALICE, **end)
    with pytest.raises(Invalid, match="after IGA-A-001"):
        await store.transact(partial(handlers.infuse, infuse(ALICE, lot_id)))
    with pytest.raises(Invalid, match="a harvest on 2014-07-01 is after IGA-A-001"):
        await store.transact(partial(handlers.harvest, harvest(on=date(2014, 7, 1))))
    assert await kinds(store, f"lot-{lot_id}") == [AdiposeTissueHarvested, CellLotReleased]


async def test_an_off_target_infusion_is_recorded_flagged_and_counted(store: EventStore) -> None:
    sample = ("nephrotrack_protocol_deviations_total", {"code": "INFUSION_DOSE_OFF_TARGET"})
    before = REGISTRY.get_sample_value(*sample) or 0.0
    lot_id = await released_lot(store)
    envelopes = await store.transact(partial(handlers.infuse, infuse(ALICE, lot_id, cells=1.0e7)))
    assert [type(e.decode()) for e in envelopes] == [CellsInfused, ProtocolDeviationDetected]
    assert REGISTRY.get_sample_value(*sample) == before + 1
    assert await kinds(store, f"lot-{lot_id}") == [AdiposeTissueHarvested, CellLotReleased, CellsInfused]


async def test_a_concurrent_infusion_of_the_same_lot_that_commits_first_wins(store: EventStore) -> None:
    lot_id = await released_lot(store)
    first = partial(handlers.infuse, infuse(ALICE, lot_id))
    other_day = partial(handlers.infuse, infuse(ALICE, lot_id, on=date(2014, 7, 2)))
    with pytest.raises(Invalid, match="a lot is infused once"):
        await store.transact(contested(store, other_day, first))
    [infusion] = [e for e in await store.read_stream(f"lot-{lot_id}") if e.event_type == "CellsInfused"]
    assert infusion.payload["given_on"] == "2014-07-01"


async def test_concurrent_infusions_of_different_lots_get_consecutive_numbers(store: EventStore) -> None:
    lot_1, lot_2 = await released_lot(store, grams=120), await released_lot(store, grams=130)
    mine = partial(handlers.infuse, infuse(ALICE, lot_2, on=date(2014, 8, 1)))
    theirs = partial(handlers.infuse, infuse(ALICE, lot_1))
    [infusion] = await store.transact(contested(store, mine, theirs))
    assert infusion.payload["infusion_number"] == 2


async def test_a_conflict_that_outlasts_the_retries_is_a_409(store: EventStore) -> None:
    with pytest.raises(Conflict, match="being changed concurrently"):
        await store.transact(contested(store, partial(handlers.harvest, harvest()), lost=10))
    assert await store.read_stream(f"cells-patient-{ALICE}") == []
