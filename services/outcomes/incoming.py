"""Broker messages as the outcomes projection reads them: decoded once, on the fast path
(:mod:`services.outcomes.wire`) where it can be taken, and only for the event types the
projection does anything with. The live consumer and the rebuild both parse with this.
"""

from __future__ import annotations

from typing import NamedTuple

from contracts.enrollment import PatientDataErased
from services.outcomes import domain, wire
from services.outcomes.timeline import TIMELINE_EVENTS
from services.outcomes.wire import Meta
from shared.events import DomainEvent, registry
from shared.store import JSON_CODEC, Codec

_CONSUMED = tuple(domain.CONSUMED_EVENTS)
_READ = (*_CONSUMED, *TIMELINE_EVENTS, PatientDataErased)
_reads: dict[str, bool] = {}


def projection_reads(event_type: str) -> bool:
    """Whether the projection does anything with this event type (facts or timeline). The
    others — raw lab results, lots, rejections: about half of a real log — are not decoded,
    exactly as event types unknown to this code are not: they only move the stream's mark."""
    reads = _reads.get(event_type)
    if reads is None:
        if not registry.knows(event_type):
            return False
        reads = _reads[event_type] = issubclass(registry.model(event_type), _READ)
    return reads


class Incoming(NamedTuple):
    """One broker message as the projection sees it: where it sits in which stream, the
    envelope's metadata, and the decoded event (``None`` for event types outcomes does not
    read, known or not). A named tuple: one is built per message."""

    stream: str
    sequence: int
    source: str
    envelope: Meta
    event: DomainEvent | None

    @classmethod
    def parse(cls, stream: str, sequence: int, source: str, data: bytes, codec: Codec = JSON_CODEC) -> Incoming:
        """Raises on a message that is not a decodable envelope, or whose event the projection
        reads but cannot decode (the caller decides whether that is a poison message to
        dead-letter or one to skip); ``KeyErased`` for a payload of an erased patient.
        ``codec`` opens sealed payloads (shared.sealing). Plain envelopes take the fast path
        (:mod:`services.outcomes.wire`); whatever it refuses, the full path decides."""
        split = wire.split(data)
        if split is not None:
            meta, payload = split
            if not projection_reads(meta.event_type):
                return cls(stream, sequence, source, meta, None)
            validator = wire.payload_validator(meta.event_type, meta.schema_version)
            if validator is not None:
                try:
                    blob = wire.sealed_blob(payload)
                    if blob is not None:
                        payload = codec.plaintext(meta.ref, blob)  # KeyErased / KeyMissing go to the caller
                    return cls(stream, sequence, source, meta, validator.validate_json(payload))
                except ValueError:  # not valid as its event, or a broken seal: the full path
                    pass  # raises the error (or decodes what the split got wrong)
        envelope = codec.open(data)
        event = envelope.decode() if projection_reads(envelope.event_type) else None
        return cls(stream, sequence, source, Meta.of(envelope), event)

    @property
    def patient_subject(self) -> str | None:
        """The subject whose facts this event changes (timeline-only events change none)."""
        return getattr(self.event, "subject_id") if isinstance(self.event, _CONSUMED) else None

    @property
    def subject(self) -> str | None:
        """The subject the event is about (facts, timeline or erasure), if it was decoded."""
        return getattr(self.event, "subject_id", None)
