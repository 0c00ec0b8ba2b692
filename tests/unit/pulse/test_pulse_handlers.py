"""The pulse use case (services/pulse/handlers.py) on the in-memory event store: a dose recorded
with its deviations (counted once, on commit), the refusals — unknown or control patient, a
repeat, a date after death or withdrawal learned from enrollment — and concurrent writers."""

from __future__ import annotations

from datetime import date
from functools import partial

import pytest
from prometheus_client import REGISTRY

from contracts.deviations import ProtocolDeviationDetected
from contracts.pulse import PulseDoseAdministered
from services.pulse import handlers
from services.pulse.domain import AdministerPulseDose
from shared.errors import Conflict, Invalid, NotFound
from shared.events import CommandContext
from shared.store import EventStore, open_store
from tests.unit.clinical_register import learned_end_of_study, learned_enrollment
from tests.unit.contested import contested

SUBJECT = "IGA-A-001"
TODAY = date(2026, 12, 5)


@pytest.fixture
async def store() -> EventStore:
    store = open_store("memory://")
    await learned_enrollment(store, SUBJECT)
    return store


def administer(subject_id: str = SUBJECT, **dose: object) -> handlers.AdministerDose:
    fields: dict[str, object] = {"cycle": 1, "day": 1, "given_on": date(2014, 3, 10), "dose_mg": 1000, "weight_kg": 40.0}
    fields.update(dose)
    return handlers.AdministerDose(subject_id, AdministerPulseDose.model_validate(fields),
                                   context=CommandContext(actor="staff:test"), today=TODAY)


def run(store: EventStore, command: handlers.AdministerDose) -> object:
    return store.transact(partial(handlers.administer_dose, command))


def deviations_counted(code: str) -> float:
    return REGISTRY.get_sample_value("nephrotrack_protocol_deviations_total", {"code": code}) or 0.0


async def test_a_dose_is_recorded_on_the_patients_stream_with_its_actor(store: EventStore) -> None:
    [dose] = await run(store, administer())
    assert isinstance(dose.decode(), PulseDoseAdministered) and dose.actor == "staff:test"
    assert [e.event_id for e in await store.read_stream("pulse-IGA-A-001")] == [dose.event_id]


async def test_a_dose_off_protocol_is_recorded_flagged_and_counted_once_committed(store: EventStore) -> None:
    before = deviations_counted("DOSE_ABOVE_DAILY_MAX")
    envelopes = await run(store, administer(dose_mg=1200))
    assert [type(e.decode()) for e in envelopes] == [PulseDoseAdministered, ProtocolDeviationDetected]
    assert deviations_counted("DOSE_ABOVE_DAILY_MAX") == before + 1


async def test_a_dose_that_fails_before_its_commit_counts_nothing(store: EventStore) -> None:
    before = deviations_counted("DOSE_ABOVE_DAILY_MAX")

    async def fails_after(uow: object) -> None:
        await handlers.administer_dose(administer(dose_mg=1200), uow)  # type: ignore[arg-type]
        raise RuntimeError("the commit never happens")

    with pytest.raises(RuntimeError):
        await store.transact(fails_after)
    assert deviations_counted("DOSE_ABOVE_DAILY_MAX") == before
    assert await store.read_stream("pulse-IGA-A-001") == []


async def test_a_patient_never_enrolled_is_not_found(store: EventStore) -> None:
    with pytest.raises(NotFound, match="no patient is enrolled with subject id IGA-A-404"):
        await run(store, administer("IGA-A-404"))


async def test_a_control_patient_gets_no_pulse(store: EventStore) -> None:
    await learned_enrollment(store, "CTRL-01", group="control")
    with pytest.raises(Invalid, match="control group"):
        await run(store, administer("CTRL-01"))


async def test_an_exact_repeat_is_a_conflict(store: EventStore) -> None:
    await run(store, administer())
    with pytest.raises(Conflict, match="already recorded"):
        await run(store, administer())


@pytest.mark.parametrize(("end", "reason"), [
    ({"died_on": date(2014, 3, 9)}, "after IGA-A-001's death on 2014-03-09"),
    ({"withdrawn_on": date(2014, 3, 9)}, "after IGA-A-001 withdrew on 2014-03-09"),
])
async def test_nothing_is_given_after_death_or_withdrawal(store: EventStore, end: dict[str, date], reason: str) -> None:
    await learned_end_of_study(store, SUBJECT, **end)
    with pytest.raises(Invalid, match=reason):
        await run(store, administer())
    await run(store, administer(given_on=date(2014, 3, 9)))  # the day itself is allowed


async def test_a_concurrent_identical_dose_that_commits_first_makes_this_one_a_conflict(store: EventStore) -> None:
    """The lost append runs again on the new history, where the same dose is now recorded."""
    competitor = partial(handlers.administer_dose, administer())
    with pytest.raises(Conflict, match="already recorded"):
        await store.transact(contested(store, partial(handlers.administer_dose, administer()), competitor))
    assert len(await store.read_stream("pulse-IGA-A-001")) == 1


async def test_a_concurrent_other_dose_is_decided_with_and_deviations_counted_once(store: EventStore) -> None:
    before = deviations_counted("CYCLE_DAYS_NOT_CONSECUTIVE")
    day_1 = partial(handlers.administer_dose, administer())
    late_day_2 = partial(handlers.administer_dose, administer(day=2, given_on=date(2014, 3, 13)))
    envelopes = await store.transact(contested(store, late_day_2, day_1, lost=2))
    assert [e.payload.get("code") for e in envelopes] == [None, "CYCLE_DAYS_NOT_CONSECUTIVE"]
    assert deviations_counted("CYCLE_DAYS_NOT_CONSECUTIVE") == before + 1
    assert len(await store.read_stream("pulse-IGA-A-001")) == 3


async def test_a_conflict_that_outlasts_the_retries_is_a_409(store: EventStore) -> None:
    work = contested(store, partial(handlers.administer_dose, administer()), lost=10)
    with pytest.raises(Conflict, match="being changed concurrently") as refused:
        await store.transact(work)
    assert refused.value.status_code == 409
    assert await store.read_stream("pulse-IGA-A-001") == []
