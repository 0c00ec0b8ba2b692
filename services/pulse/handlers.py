"""The pulse service's use case: administer a methylprednisolone dose. One function of a
command and a unit of work; its adapter (api.py) runs it in ``store.transact``, which runs it
again on the new history when a concurrent writer got there first.

Everything the decision needs is read in the same transaction: the course so far, the patient
as learned from enrollment (``uow.patients``) and their end of study (death or withdrawal, the
private ``patient-status-`` stream), so no rule is decided on a stale fact.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.clinical import check_within_study, count_deviations, study_end
from services.clinical.patients import KnownPatient
from services.pulse.domain import AdministerPulseDose, decide_administer_pulse_dose, fold
from shared.commands import Command
from shared.events import Envelope
from shared.store import UnitOfWork


def stream_id(subject_id: str) -> str:
    return f"pulse-{subject_id}"


@dataclass(frozen=True)
class AdministerDose(Command):
    subject_id: str
    dose: AdministerPulseDose


async def administer_dose(command: AdministerDose, uow: UnitOfWork) -> list[Envelope]:
    """Record the dose (always, when the patient may receive it) and the deviations it raises;
    the deviations are counted once the transaction has committed. Returns the envelopes: the
    dose first, then its deviations."""
    subject_id = command.subject_id
    history = await uow.read_stream(stream_id(subject_id))
    patient = KnownPatient.from_register(await uow.patients.find(subject_id))
    new_events = decide_administer_pulse_dose(
        fold(e.decode() for e in history), command.dose, patient, subject_id, today=command.today
    )
    check_within_study(await study_end(uow, subject_id), subject_id, command.dose.given_on, "a pulse dose")
    envelopes = await uow.append(stream_id(subject_id), new_events, len(history), command.context)
    uow.on_commit(lambda: count_deviations(envelopes))
    return envelopes
