"""The live projection's patients kept between batches (services/outcomes/remembered.py): one is
handed out only while their row is at the version it was written at, at most once, and within
the memory bound."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prometheus_client import REGISTRY

from services.outcomes.projector import ProjectedPatient
from services.outcomes.remembered import RememberedPatients
from services.outcomes.wire import Meta
from tests.unit.outcomes.outcome_events import egfr, enrolled


def with_results(subject_id: str, count: int) -> ProjectedPatient:
    patient = ProjectedPatient.new(subject_id)
    now = datetime.now(UTC)
    patient.apply(Meta(uuid.uuid4(), "t", "s", 1, 1, now, now), enrolled(sid=subject_id))
    for n in range(count):
        patient.apply(Meta(uuid.uuid4(), "t", f"r{n}", 1, 1, now, now), egfr(f"R{n}", 30.0, "2015-01-01", sid=subject_id))
    return patient


def test_a_patient_is_handed_out_only_at_the_version_they_were_written_at_and_only_once() -> None:
    remembered = RememberedPatients(1_000)
    a = with_results("A", 3)
    remembered.keep(1, "A", "100", a)
    assert remembered.take(1, "A", "101") is None  # written since by someone else
    assert remembered.take(1, "A", "100") is None  # and forgotten: that answer cannot come back
    remembered.keep(1, "A", "102", a)
    assert REGISTRY.get_sample_value("nephrotrack_outcomes_remembered_results") == a.size == 4
    assert remembered.take(1, "A", "102") is a
    assert REGISTRY.get_sample_value("nephrotrack_outcomes_remembered_results") == 0
    assert remembered.take(1, "A", "102") is None  # the batch that took them writes them back


def test_another_generation_is_never_answered_and_a_swap_forgets_the_old_one() -> None:
    remembered = RememberedPatients(1_000)
    remembered.keep(1, "A", "100", with_results("A", 1))
    assert remembered.take(2, "A", "100") is None
    remembered.keep(2, "B", "200", with_results("B", 1))
    assert len(remembered) == 1


def test_the_least_recently_written_go_first_beyond_the_bound() -> None:
    remembered = RememberedPatients(25)
    for name in "ABC":
        remembered.keep(1, name, "1", with_results(name, 9))  # 10 each
    assert remembered.take(1, "A", "1") is None
    assert remembered.take(1, "B", "1") is not None and remembered.take(1, "C", "1") is not None
    remembered.keep(1, "D", "1", with_results("D", 30))  # larger than the whole bound: not kept
    assert len(remembered) == 0
