"""The projection's fast envelope path (services/outcomes/wire.py) decodes exactly what the
full path (``Envelope`` + ``registry.decode``) decodes, and refuses what it cannot split."""

from __future__ import annotations

from bench import workload
from services.outcomes import wire
from services.outcomes.incoming import Incoming, projection_reads
from shared.events import Envelope


def test_the_head_has_every_envelope_field_but_the_payload() -> None:
    assert set(wire._Head.__annotations__) == set(Envelope.model_fields) - {"payload"}


def test_fast_path_equals_full_path_on_the_benchmark_log() -> None:
    for sequence, message in enumerate(workload.events(3_000, patients=12), start=1):
        fast = Incoming.parse("S", sequence, message.source, message.data)
        envelope = Envelope.model_validate_json(message.data)
        assert fast.envelope == wire.Meta.of(envelope)
        assert fast.event == (envelope.decode() if projection_reads(envelope.event_type) else None)


def test_bodies_it_cannot_split_go_to_the_full_path() -> None:
    (message,) = list(workload.events(1, patients=1))
    envelope = Envelope.model_validate_json(message.data)
    payload_first = ('{"payload":' + envelope.model_dump_json(include={"payload"})[11:-1] + ","
                     + envelope.model_dump_json(exclude={"payload"})[1:]).encode()
    assert wire.split(message.data) is not None
    assert wire.split(payload_first) is None
    assert Incoming.parse("S", 1, "enrollment", payload_first).event == envelope.decode()


def test_a_sealed_payload_splits_and_gives_up_its_blob() -> None:
    """Opening it takes the patient's key (tests/outcomes/test_wire_sealed.py)."""
    (message,) = list(workload.events(1, patients=1))
    envelope = Envelope.model_validate_json(message.data)
    sealed = envelope.model_copy(update={"payload": {"$sealed": "AAEC"}}).model_dump_json().encode()
    split = wire.split(sealed)
    assert split is not None and split[0] == wire.Meta.of(envelope)
    assert wire.sealed_blob(split[1]) == b"\x00\x01\x02"
    assert wire.sealed_blob(wire.split(message.data)[1]) is None  # type: ignore[index]


def test_the_benchmark_log_decodes_with_the_event_models() -> None:
    """The benchmark writes its JSON by hand: every event type it writes must still decode with
    the contract's models, field for field (a drift between the two fails here, not in a bench)."""
    seen = workload.check_sample(3_000)
    assert {"PatientEnrolled", "PulseDoseAdministered", "CellsInfused", "EgfrComputed"} <= set(seen)
