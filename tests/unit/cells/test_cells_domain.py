"""Cell deciders: harvest → lot → QC → infusion, and the autologous chain of identity."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule
from pydantic import ValidationError

from contracts.cells import AdiposeTissueHarvested, CellLotFailedQc, CellLotReleased, CellsInfused
from contracts.deviations import DeviationCode, ProtocolDeviationDetected
from services.cells.domain import (
    MAX_INFUSION_CELLS,
    MIN_INFUSION_CELLS,
    NO_CELL_PATIENT,
    NO_LOT,
    CellPatient,
    HarvestAdiposeTissue,
    InfuseCells,
    KnownPatient,
    Lot,
    ReleaseLot,
    decide_harvest,
    decide_infusion,
    decide_release,
    evolve_lot,
    evolve_patient,
    fold_lot,
    fold_patient,
    infusions,
    qc_refusal,
)
from shared.errors import Conflict, DomainError, Invalid, NotFound
from shared.events import DomainEvent, registry

ENROLLED_ON = date(2014, 3, 2)
HARVESTED_ON = date(2014, 4, 1)
INFUSED_ON = date(2014, 4, 20)
TODAY = date(2026, 12, 5)
ALICE = KnownPatient(subject_id="IGA-A-001", group="A", enrolled_on=ENROLLED_ON)
BOB = KnownPatient(subject_id="IGA-B-002", group="B", enrolled_on=ENROLLED_ON)
CONTROL = KnownPatient(subject_id="CTRL-01", group="control", enrolled_on=ENROLLED_ON)


@dataclass
class Store:
    """In-memory streams, appended the way the cells docstring asks the adapter to."""

    patients: dict[str, list[DomainEvent]] = field(default_factory=lambda: defaultdict(list))
    lots: dict[str, list[DomainEvent]] = field(default_factory=lambda: defaultdict(list))

    def append(self, subject_id: str, events: list[DomainEvent]) -> list[DomainEvent]:
        self.patients[subject_id] += events
        for event in events:
            lot_id = getattr(event, "lot_id", None)
            if lot_id is not None and not isinstance(event, ProtocolDeviationDetected):
                self.lots[lot_id].append(event)
        return events

    def patient(self, subject_id: str) -> CellPatient:
        return fold_patient(self.patients[subject_id])

    def lot(self, lot_id: str) -> Lot:
        return fold_lot(self.lots[lot_id])

    def harvest(self, who: KnownPatient, lot_id: str, on: date = HARVESTED_ON, grams: float = 120) -> list[DomainEvent]:
        command = HarvestAdiposeTissue(harvested_on=on, fat_grams=grams)
        return self.append(who.subject_id, decide_harvest(self.patient(who.subject_id), command, who, who.subject_id, lot_id, today=TODAY))

    def release(self, lot_id: str, cells: float = 3.1e7, viability: float = 92) -> list[DomainEvent]:
        lot = self.lot(lot_id)
        events = decide_release(lot, ReleaseLot(cell_count=cells, viability_pct=viability), lot_id)
        return self.append(lot.subject_id or "", events)

    def infuse(self, subject_id: str, lot_id: str, on: date = INFUSED_ON, cells: float = 3.0e7) -> list[DomainEvent]:
        command = InfuseCells(lot_id=lot_id, given_on=on, cell_count=cells)
        return self.append(subject_id, decide_infusion(self.lot(lot_id), self.patient(subject_id), subject_id, command, today=TODAY))

    def released_lot(self, who: KnownPatient, lot_id: str, cells: float = 3.1e7) -> None:
        self.harvest(who, lot_id, grams=100 + len(self.lots))
        self.release(lot_id, cells=cells)


# --------------------------------------------------------------------------- harvest


def test_harvest_records_a_new_lot_with_the_given_id() -> None:
    harvest = HarvestAdiposeTissue(harvested_on=HARVESTED_ON, fat_grams=120)
    events = decide_harvest(NO_CELL_PATIENT, harvest, ALICE, ALICE.subject_id, "LOT-1", today=TODAY)
    assert events == [AdiposeTissueHarvested(subject_id="IGA-A-001", lot_id="LOT-1", harvested_on=HARVESTED_ON, fat_grams=120)]
    assert fold_lot(events) == Lot(
        lot_id="LOT-1", subject_id="IGA-A-001", status="harvested", harvested_on=HARVESTED_ON, fat_grams=120
    )


def test_harvest_of_unknown_patient_is_not_found() -> None:
    with pytest.raises(NotFound, match="IGA-X-9"):
        decide_harvest(NO_CELL_PATIENT, HarvestAdiposeTissue(harvested_on=HARVESTED_ON, fat_grams=120), None, "IGA-X-9", "LOT-1", today=TODAY)


def test_control_patients_are_not_harvested() -> None:
    with pytest.raises(Invalid, match="control group"):
        Store().harvest(CONTROL, "LOT-1")


def test_harvest_before_enrollment_is_invalid() -> None:
    with pytest.raises(Invalid, match="before enrollment"):
        Store().harvest(ALICE, "LOT-1", on=ENROLLED_ON - timedelta(days=1))


def test_the_same_harvest_twice_is_a_conflict_naming_the_existing_lot() -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")
    with pytest.raises(Conflict, match="already recorded as lot LOT-1"):
        store.harvest(ALICE, "LOT-2")
    assert store.harvest(ALICE, "LOT-2", grams=80)


@pytest.mark.parametrize("grams", [0, -5, float("nan")])
def test_harvest_command_needs_positive_fat_weight(grams: float) -> None:
    with pytest.raises(ValidationError):
        HarvestAdiposeTissue(harvested_on=HARVESTED_ON, fat_grams=grams)


# --------------------------------------------------------------------------- release


def test_release_records_the_qc_result() -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")
    events = store.release("LOT-1", cells=3.1e7, viability=92)
    assert events == [CellLotReleased(subject_id="IGA-A-001", lot_id="LOT-1", cell_count=3.1e7, viability_pct=92)]
    assert qc_refusal(events) is None
    assert store.lot("LOT-1").status == "released"


def test_release_of_unknown_lot_is_not_found() -> None:
    with pytest.raises(NotFound, match="lot LOT-404 does not exist"):
        decide_release(NO_LOT, ReleaseLot(cell_count=3.1e7, viability_pct=92), "LOT-404")


def test_low_viability_is_recorded_as_a_qc_failure_and_reported_as_a_refusal() -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")

    events = store.release("LOT-1", viability=69.9)

    assert [type(e) for e in events] == [CellLotFailedQc]
    assert qc_refusal(events) == "lot LOT-1 failed QC: viability 69.9% is below the 70% release minimum"
    assert store.lot("LOT-1").status == "failed_qc"


def test_viability_of_exactly_70_percent_is_released() -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")
    assert [type(e) for e in store.release("LOT-1", viability=70)] == [CellLotReleased]


@pytest.mark.parametrize("viability", [92, 50])
def test_a_lot_gets_one_qc_result(viability: float) -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")
    store.release("LOT-1", viability=viability)
    with pytest.raises(Conflict, match="already has its QC result"):
        store.release("LOT-1")


@pytest.mark.parametrize("fields", [{"cell_count": 0}, {"viability_pct": -1}, {"viability_pct": 100.1}])
def test_release_command_checks_ranges(fields: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        ReleaseLot.model_validate({"cell_count": 3.1e7, "viability_pct": 92} | fields)


# --------------------------------------------------------------------------- infusion


def test_infusion_of_own_released_lot_is_recorded_as_number_one() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1")
    events = store.infuse(ALICE.subject_id, "LOT-1")
    assert events == [
        CellsInfused(subject_id="IGA-A-001", lot_id="LOT-1", given_on=INFUSED_ON, cell_count=3.0e7, infusion_number=1)
    ]
    assert store.lot("LOT-1").status == "infused"


def test_wrong_lot_infusion_is_refused_by_the_chain_of_identity() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-ALICE")
    store.released_lot(BOB, "LOT-BOB")

    with pytest.raises(Invalid, match="harvested from another patient.*chain of identity") as refused:
        store.infuse(BOB.subject_id, "LOT-ALICE")

    assert ALICE.subject_id not in refused.value.reason
    assert store.patient(BOB.subject_id).infusions == ()
    assert store.lot("LOT-ALICE").status == "released"


@pytest.mark.parametrize("viability", [92, 10])
def test_the_chain_of_identity_is_checked_before_anything_else(viability: float) -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")
    store.release("LOT-1", viability=viability)
    with pytest.raises(Invalid, match="another patient"):
        store.infuse(BOB.subject_id, "LOT-1", on=HARVESTED_ON - timedelta(days=10), cells=9e9)


def test_infusion_of_unknown_lot_is_not_found() -> None:
    with pytest.raises(NotFound, match="lot LOT-404 does not exist"):
        Store().infuse(ALICE.subject_id, "LOT-404")


def test_unreleased_lot_is_not_infused() -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")
    with pytest.raises(Invalid, match="has not been released by QC yet"):
        store.infuse(ALICE.subject_id, "LOT-1")


def test_lot_that_failed_qc_is_never_infused() -> None:
    store = Store()
    store.harvest(ALICE, "LOT-1")
    store.release("LOT-1", viability=50)
    with pytest.raises(Invalid, match="failed QC and can never be infused"):
        store.infuse(ALICE.subject_id, "LOT-1")


def test_a_lot_is_infused_once() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1")
    store.infuse(ALICE.subject_id, "LOT-1")
    with pytest.raises(Invalid, match="already infused on 2014-04-20"):
        store.infuse(ALICE.subject_id, "LOT-1", on=INFUSED_ON + timedelta(days=1))


def test_an_exact_repeat_of_the_infusion_is_a_conflict() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1")
    store.infuse(ALICE.subject_id, "LOT-1")
    with pytest.raises(Conflict, match="already recorded"):
        store.infuse(ALICE.subject_id, "LOT-1")


def test_infusion_before_harvest_is_invalid() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1")
    with pytest.raises(Invalid, match="before lot LOT-1 was harvested on 2014-04-01"):
        store.infuse(ALICE.subject_id, "LOT-1", on=HARVESTED_ON - timedelta(days=1))


def test_infusion_cannot_use_more_cells_than_were_released() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1", cells=3.1e7)
    with pytest.raises(Invalid, match="3.2×10\\^7 cells exceed the 3.1×10\\^7 released in lot LOT-1"):
        store.infuse(ALICE.subject_id, "LOT-1", cells=3.2e7)
    assert store.infuse(ALICE.subject_id, "LOT-1", cells=3.1e7)


def test_infusion_numbers_count_up_and_the_fifth_is_flagged() -> None:
    store = Store()
    for n in range(1, 6):
        store.released_lot(ALICE, f"LOT-{n}")
        events = store.infuse(ALICE.subject_id, f"LOT-{n}", on=INFUSED_ON + timedelta(days=30 * n))
        assert events[0].infusion_number == n
    assert [e.code for e in events[1:]] == [DeviationCode.TOO_MANY_INFUSIONS]
    assert events[1].detail == "infusion 5 exceeds the protocol maximum of 4 infusions"
    assert (events[1].lot_id, events[1].occurred_on) == ("LOT-5", INFUSED_ON + timedelta(days=150))


@pytest.mark.parametrize(
    ("cells", "off_target"),
    [(MIN_INFUSION_CELLS, False), (MAX_INFUSION_CELLS, False), (1.49e7, True), (4.51e7, True), (3e7, False)],
)
def test_infusion_more_than_50_percent_from_3e7_cells_is_off_target(cells: float, off_target: bool) -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1", cells=5e7)
    events = store.infuse(ALICE.subject_id, "LOT-1", cells=cells)
    assert ([e.code for e in events[1:]] == [DeviationCode.INFUSION_DOSE_OFF_TARGET]) is off_target


def test_off_target_detail_names_the_tolerance() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1")
    events = store.infuse(ALICE.subject_id, "LOT-1", cells=1.2e7)
    assert events[1].detail == "1.2×10^7 cells is more than 50% away from the 3×10^7-cell target (1.5×10^7–4.5×10^7)"


# --------------------------------------------------------------------------- read model


def test_infusions_read_model() -> None:
    store = Store()
    store.released_lot(ALICE, "LOT-1")
    store.infuse(ALICE.subject_id, "LOT-1", cells=1.2e7)
    store.harvest(ALICE, "LOT-2", on=HARVESTED_ON + timedelta(days=60), grams=90)
    store.release("LOT-2", viability=40)
    store.harvest(ALICE, "LOT-3", on=HARVESTED_ON + timedelta(days=61), grams=95)

    view = infusions(store.patient(ALICE.subject_id))

    assert (view.subject_id, view.count, view.total_cells) == ("IGA-A-001", 1, 1.2e7)
    assert [i.model_dump(mode="json") for i in view.infusions] == [
        {"infusion_number": 1, "lot_id": "LOT-1", "given_on": "2014-04-20", "cell_count": 1.2e7}
    ]
    assert [(lot.lot_id, lot.status) for lot in view.lots] == [
        ("LOT-1", "infused"),
        ("LOT-2", "failed_qc"),
        ("LOT-3", "harvested"),
    ]
    assert view.lots[1].qc_failure_reason is not None
    assert [d.code for d in view.deviations] == [DeviationCode.INFUSION_DOSE_OFF_TARGET]


def test_infusions_of_a_patient_with_nothing_recorded() -> None:
    view = infusions(NO_CELL_PATIENT)
    assert (view.subject_id, view.count, view.total_cells, view.lots) == (None, 0, 0, [])


def test_patient_folds_only_their_own_lots_events() -> None:
    """A release of another lot on the patient's stream (should the adapter misroute it) is inert."""
    alice = evolve_patient(
        NO_CELL_PATIENT,
        AdiposeTissueHarvested(subject_id="IGA-A-001", lot_id="LOT-1", harvested_on=HARVESTED_ON, fat_grams=1),
    )
    assert evolve_patient(alice, CellLotReleased(subject_id="x", lot_id="LOT-2", cell_count=1, viability_pct=90)) == alice


def test_lot_ignores_deviations() -> None:
    deviation = ProtocolDeviationDetected(
        subject_id="IGA-A-001", code=DeviationCode.TOO_MANY_INFUSIONS, detail="x", occurred_on=INFUSED_ON, lot_id="L"
    )
    assert evolve_lot(NO_LOT, deviation) == NO_LOT


# --------------------------------------------------------------------------- properties

PATIENTS = (ALICE, BOB, KnownPatient(subject_id="IGA-A-003", group="A", enrolled_on=ENROLLED_ON))
harvest_days = st.integers(min_value=-35, max_value=10).map(lambda n: HARVESTED_ON + timedelta(days=n))
infusion_days = st.integers(min_value=-5, max_value=120).map(lambda n: HARVESTED_ON + timedelta(days=n))
released_counts = st.sampled_from([3.1e7, 5e7, 1e8, 1e7])
infused_counts = st.sampled_from([1e7, 1.5e7, 3e7, 4.5e7]) | st.floats(min_value=1e6, max_value=1.2e8)
recipients = st.sampled_from(["donor", *(p.subject_id for p in PATIENTS)])


def stored(events: list[DomainEvent]) -> list[DomainEvent]:
    """The events as the store gives them back: JSON payloads decoded through the registry."""
    return [registry.decode(e.event_type, e.schema_version, e.model_dump(mode="json")) for e in events]


class CellTherapyMachine(RuleBasedStateMachine):
    """Any interleaving of harvests, QC results and infusions, by any patient, of any lot.

    Whatever the sequence, a patient only ever receives cells harvested from themselves, a lot
    is infused at most once, and the streams replay to the states the decisions were made on.
    """

    lots = Bundle("lots")
    released = Bundle("released")

    def __init__(self) -> None:
        super().__init__()
        self.store = Store()
        self.minted = 0

    @rule(target=lots, who=st.sampled_from(PATIENTS), on=harvest_days, grams=st.integers(1, 300))
    def harvest(self, who: KnownPatient, on: date, grams: int) -> object:
        self.minted += 1
        lot_id = f"LOT-{self.minted}"  # the adapter mints a fresh id per harvest
        try:
            self.store.harvest(who, lot_id, on=on, grams=grams)
        except (Conflict, Invalid):  # a repeated harvest, or one dated before enrollment
            return multiple()
        return lot_id

    @rule(target=released, lot_id=lots, cells=released_counts, viability=st.sampled_from([92.0, 70.0, 69.9]))
    def release(self, lot_id: str, cells: float, viability: float) -> object:
        try:
            events = self.store.release(lot_id, cells=cells, viability=viability)
        except Conflict:
            return multiple()
        assert (qc_refusal(events) is not None) is (viability < 70)
        return multiple() if qc_refusal(events) else lot_id

    @rule(lot_id=lots, recipient=recipients, on=infusion_days, cells=infused_counts)
    def infuse_any_lot(self, lot_id: str, recipient: str, on: date, cells: float) -> None:
        self.infuse(lot_id, recipient, on, cells)

    @rule(lot_id=released, recipient=recipients, on=infusion_days, cells=infused_counts)
    def infuse_a_released_lot(self, lot_id: str, recipient: str, on: date, cells: float) -> None:
        self.infuse(lot_id, recipient, on, cells)

    def infuse(self, lot_id: str, recipient: str, on: date, cells: float) -> None:
        """Infuse ``recipient`` (``"donor"``: whoever gave the lot) and check who may receive it."""
        donor = self.store.lot(lot_id).subject_id
        assert donor is not None
        recipient = donor if recipient == "donor" else recipient
        try:
            events = self.store.infuse(recipient, lot_id, on=on, cells=cells)
        except DomainError as refusal:
            if recipient != donor:
                assert isinstance(refusal, Invalid) and "another patient" in refusal.reason
            return
        assert recipient == donor
        assert isinstance(events[0], CellsInfused) and events[0].subject_id == donor

    @invariant()
    def patients_only_receive_their_own_cells(self) -> None:
        donors = {
            e.lot_id: e.subject_id
            for events in self.store.lots.values()
            for e in events
            if isinstance(e, AdiposeTissueHarvested)
        }
        for subject_id, events in self.store.patients.items():
            for infusion in (e for e in events if isinstance(e, CellsInfused)):
                assert infusion.subject_id == subject_id == donors[infusion.lot_id]

    @invariant()
    def lots_are_infused_once_from_released_cells(self) -> None:
        infused = [e for events in self.store.lots.values() for e in events if isinstance(e, CellsInfused)]
        assert len({i.lot_id for i in infused}) == len(infused)
        for infusion in infused:
            lot = self.store.lot(infusion.lot_id)
            assert lot.viability_pct is not None and lot.viability_pct >= 70
            assert lot.cell_count is not None and infusion.cell_count <= lot.cell_count
            assert lot.harvested_on is not None and infusion.given_on >= lot.harvested_on

    @invariant()
    def infusion_numbers_count_up_per_patient(self) -> None:
        for subject_id in self.store.patients:
            numbers = [i.infusion_number for i in self.store.patient(subject_id).infusions]
            assert numbers == list(range(1, len(numbers) + 1))

    @invariant()
    def streams_replay_to_the_same_states(self) -> None:
        for events in self.store.patients.values():
            patient = fold_patient(events)
            assert fold_patient(stored(events)) == patient
            assert infusions(fold_patient(stored(events))) == infusions(patient)
            for lot in patient.lots:
                assert fold_lot(stored(self.store.lots[lot.lot_id or ""])) == lot


TestCellTherapyMachine = CellTherapyMachine.TestCase
TestCellTherapyMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
