"""The projection's fast envelope path (services/outcomes/wire.py) decodes exactly what the
full path (``Envelope`` + ``registry.decode``) decodes, and refuses what it cannot split."""

from __future__ import annotations

from bench import workload
from services.outcomes import wire
from services.outcomes.projector import Incoming, _projection_reads
from shared.events import Envelope


def test_the_head_has_every_envelope_field_but_the_payload() -> None:
    assert set(wire._Head.__annotations__) == set(Envelope.model_fields) - {"payload"}


def test_fast_path_equals_full_path_on_the_benchmark_log() -> None:
    for sequence, message in enumerate(workload.events(3_000, patients=12), start=1):
        fast = Incoming.parse("S", sequence, message.source, message.data)
        envelope = Envelope.model_validate_json(message.data)
        assert fast.envelope == wire.Meta.of(envelope)
        assert fast.event == (envelope.decode() if _projection_reads(envelope.event_type) else None)


def test_bodies_it_cannot_split_go_to_the_full_path() -> None:
    (message,) = list(workload.events(1, patients=1))
    envelope = Envelope.model_validate_json(message.data)
    payload_first = ('{"payload":' + envelope.model_dump_json(include={"payload"})[11:-1] + ","
                     + envelope.model_dump_json(exclude={"payload"})[1:]).encode()
    sealed = envelope.model_copy(update={"payload": {"$sealed": "AAAA"}}).model_dump_json().encode()
    assert wire.split(message.data) is not None
    assert wire.split(payload_first) is None
    assert wire.split(sealed) is None
    assert Incoming.parse("S", 1, "enrollment", payload_first).event == envelope.decode()
