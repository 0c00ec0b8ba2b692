"""A patient's stored row is written from the recorder without a pydantic ``EgfrPoint`` per
result and read back the same way (services/outcomes/projector.py): both must stay exactly what
the pydantic dump and validation give — rebuild == live compares rows byte for byte, and rows
written before must still read."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.labs import EgfrComputed
from services.outcomes.domain import PatientFacts
from services.outcomes.projector import ProjectedPatient, canonical_json
from tests.unit.outcomes.outcome_events import SID, adverse_event, biopsy, dose, enrolled, infused, meta, upcr


def pydantic_facts_json(facts: PatientFacts) -> str:
    """The facts JSON as the projection wrote it before: the whole model dumped by pydantic."""
    dumped = facts.model_dump(mode="json")
    for key, value in dumped.items():
        if isinstance(value, list):
            dumped[key] = sorted(value, key=canonical_json)
    return canonical_json(dumped)


offsets = st.one_of(
    st.just(UTC),
    st.integers(-14 * 60, 14 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes))),
    st.integers(-50_000, 50_000).map(lambda seconds: timezone(timedelta(seconds=seconds))),  # odd seconds
)
results = st.lists(
    st.tuples(
        st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1)),
        offsets,
        st.floats(min_value=0.5, max_value=200, allow_nan=False),
        st.sampled_from(["final", "corrected", "preliminary"]),
        st.sampled_from(["creatinine", "reported"]),
        st.text(min_size=1, max_size=12),
    ),
    max_size=30,
)


def egfr_event(moment: datetime, offset: timezone, value: float, status: str, derived_from: str, suffix: str) -> EgfrComputed:
    return EgfrComputed(result_id=f"R-{suffix}", subject_id=SID, egfr=value, collected_at=moment.replace(tzinfo=offset),
                        status=status, counted=status != "preliminary", source="mllp", derived_from=derived_from)


def patient(points: list[tuple[datetime, timezone, float, str, str, str]]) -> ProjectedPatient:
    p = ProjectedPatient.new(SID)
    p.apply(meta(1), enrolled())
    p.apply(meta(2), dose(date(2014, 4, 1)))
    p.apply(meta(3), infused("LOT-1", date(2014, 5, 1)))
    p.apply(meta(4), upcr("U-1", 1.5, "2014-03-01"))
    p.apply(meta(5), adverse_event("AE-1", "nausea", date(2014, 6, 1)))
    p.apply(meta(6), biopsy(date(2014, 7, 1), deposits=True))
    for version, point in enumerate(points, 7):
        p.apply(meta(version), egfr_event(*point))
    return p


@settings(max_examples=150, deadline=None)
@given(results)
def test_the_row_is_the_pydantic_dump_and_reads_back_to_itself(points):
    p = patient(points)
    row = p.row()
    assert row["facts_json"] == pydantic_facts_json(p.facts)
    again = ProjectedPatient.from_row(row["facts_json"], row["egfr_versions_json"], row["report_versions_json"])
    read_by_pydantic = PatientFacts.model_validate_json(row["facts_json"])
    assert again.facts == read_by_pydantic
    assert again.row() == row  # unchanged facts are rewritten unchanged, as a rebuild writes them


def test_a_row_written_by_pydantic_reads_as_it_did():
    p = patient([(datetime(2015, 6, 1, 8, 30, 0, 120000), timezone(timedelta(hours=2)), 42.0, "final", "creatinine", "a"),
                 (datetime(2016, 1, 1, 8, 30), UTC, 38.5, "corrected", "reported", "b")])
    stored = pydantic_facts_json(p.facts)
    read = ProjectedPatient.from_row(stored, "{}", "{}")
    assert read.facts == PatientFacts.model_validate_json(stored)
    assert read.row()["facts_json"] == stored


def test_a_result_corrected_after_its_row_was_read_is_written_as_corrected():
    p = patient([(datetime(2015, 6, 1, 8, 30), UTC, 42.0, "final", "creatinine", "a"),
                 (datetime(2015, 7, 1, 8, 30), UTC, 40.0, "final", "creatinine", "b")])
    row = p.row()
    read = ProjectedPatient.from_row(row["facts_json"], row["egfr_versions_json"], row["report_versions_json"])
    read.apply(meta(100), EgfrComputed(
        result_id="R-a", subject_id=SID, egfr=35.5, collected_at=datetime(2015, 6, 1, 8, 30, tzinfo=UTC),
        status="corrected", counted=True, source="mllp", derived_from="creatinine"))
    written = read.row()["facts_json"]
    assert written == pydantic_facts_json(read.facts)
    assert read.facts.egfr["R-a"].egfr == 35.5 and '"egfr":35.5' in written


def test_an_offset_with_seconds_gives_the_same_outcome_once_read_back():
    """Pydantic's JSON drops an offset's seconds: 2015-01-01T00:00:00+00:00:01 (the instant
    2014-12-31T23:59:59Z) was written as 2015-01-01T00:00:00+00:00, so the patient read back
    from their row had a follow-up one day longer than the one projected live or rebuilt."""
    p = patient([(datetime(2000, 1, 1), UTC, 1.0, "final", "creatinine", "0"),
                 (datetime(2015, 1, 1), timezone(timedelta(seconds=1)), 1.0, "final", "creatinine", "1")])
    row = p.row()
    again = ProjectedPatient.from_row(row["facts_json"], row["egfr_versions_json"], row["report_versions_json"])
    assert again.row() == row
    assert again.facts.egfr["R-1"].collected_at == datetime(2014, 12, 31, 23, 59, 59, tzinfo=UTC)


batches = st.lists(
    st.lists(st.tuples(st.datetimes(min_value=datetime(2014, 1, 1), max_value=datetime(2030, 1, 1)), offsets,
                       st.floats(min_value=0.5, max_value=200, allow_nan=False),
                       st.sampled_from(["final", "corrected", "preliminary"]), st.sampled_from(["creatinine", "reported"]),
                       st.sampled_from("abcdefgh")),  # few ids: later batches correct earlier results
             max_size=6),
    min_size=1, max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(batches)
def test_a_patient_kept_between_batches_writes_the_rows_of_one_read_back_from_their_row(batches):
    """The live projection's remembered patient derives only what each batch recorded; its rows
    must be those of a patient read back from their row for every batch, as without memory."""
    kept = ProjectedPatient(PatientFacts(subject_id=SID), remembered=True)
    kept.apply(meta(1), enrolled())
    kept.apply(meta(2), dose(date(2014, 4, 1)))
    row = kept.row()
    versions = iter(range(3, 1_000))
    for batch in batches:
        read = ProjectedPatient.from_row(row["facts_json"], row["egfr_versions_json"], row["report_versions_json"])
        for point in batch:
            envelope, event = meta(next(versions)), egfr_event(*point)
            kept.apply(envelope, event)
            read.apply(envelope, event)
        row = kept.row()
        assert row == read.row()


lab_results = st.lists(
    st.tuples(st.booleans(),  # an eGFR result, or a urine one
              st.tuples(st.datetimes(min_value=datetime(2014, 1, 1), max_value=datetime(2030, 1, 1)), offsets,
                        st.floats(min_value=0.5, max_value=200, allow_nan=False),
                        st.sampled_from(["final", "corrected", "preliminary"]),
                        st.sampled_from(["creatinine", "reported"]), st.sampled_from("abcdef")),
              st.booleans()),  # delivered again afterwards (an older version after a newer one)
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(lab_results, st.sets(st.integers(0, 25)))
def test_lab_results_taken_out_after_every_event_and_put_back_write_the_same_rows(results, checkpoints):
    """A rebuild moves each patient's lab results out of memory as they are applied (and after
    reading a resumed patient's row), and puts them back, in the order taken, to write the row:
    the row must be the one of a patient that kept everything, redeliveries and corrections
    included, at every checkpoint."""
    kept = patient([])
    row = kept.row()
    taken_out = ProjectedPatient.from_row(row["facts_json"], row["egfr_versions_json"], row["report_versions_json"])
    taken = taken_out.take_results()
    for index, (is_egfr, point, redelivered) in enumerate(results):
        moment, offset, value, status, derived_from, suffix = point
        event = egfr_event(*point) if is_egfr else upcr(f"U-{suffix}", value, moment.date().isoformat(), status)
        deliveries = [meta(100 + index)] + ([meta(99 + index)] if redelivered else [])
        for envelope in deliveries:
            kept.apply(envelope, event)
            taken_out.apply(envelope, event)
            taken += taken_out.take_results()
        assert not taken_out.recorder.egfr and not taken_out.recorder.urine
        if index in checkpoints or index == len(results) - 1:
            taken_out.put_results(taken)
            assert taken_out.row() == kept.row()
            taken_out.take_results()
