"""Domain events, the envelope that carries them, and the registry that decodes them.

Why a registry with upcasters: an event that was stored is a fact, and its meaning never
changes. When a payload's shape must evolve we add a *new* schema version of the event and an
upcaster that turns the old stored payload into the new shape at read time, so that every
reader (aggregates, projections, rebuilds) only ever sees the current version.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from shared.ids import new_event_id

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]

request_principal: ContextVar[str | None] = ContextVar("nephrotrack_request_principal", default=None)
"""The authenticated caller (``<role>:<key fingerprint>``) of the HTTP request being served, set by
:mod:`shared.auth`. Every event recorded while serving it names that caller as its ``actor``,
whatever channel label the code passed (``labs:fhir``, ``anonymous``): who did it is the caller."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class DomainEvent(BaseModel):
    """Base of every domain event: an immutable, past-tense fact with a schema version.

    Subclasses set ``event_type`` (defaults to the class name) and ``schema_version``; a process
    decodes the ones it registered (:meth:`EventRegistry.register`, ``contracts.register_all``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    published: ClassVar[bool] = True
    """False for an event that stays in its service's store (no outbox row, no broker subject):
    a fact only its own aggregate needs, whose publishing would cost every write for no reader."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            cls.event_type = cls.__name__


E = TypeVar("E", bound=type[DomainEvent])


class UnknownEventType(LookupError):
    """No model is registered for an (event_type, schema_version) pair."""


class EventRegistry:
    """Maps ``event_type`` + ``schema_version`` to a model and upcasts old payloads."""

    def __init__(self) -> None:
        self._models: dict[str, type[DomainEvent]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, model: E) -> E:
        """Make ``model`` decodable (idempotent; usable as a class decorator)."""
        existing = self._models.get(model.event_type)
        if existing is not None and existing is not model:
            raise ValueError(f"event type {model.event_type!r} is registered twice")
        self._models[model.event_type] = model
        return model

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning a ``from_version`` payload into ``from_version + 1``."""

        def decorate(fn: Upcaster) -> Upcaster:
            self._upcasters[(event_type, from_version)] = fn
            return fn

        return decorate

    def model(self, event_type: str) -> type[DomainEvent]:
        try:
            return self._models[event_type]
        except KeyError:
            raise UnknownEventType(event_type) from None

    def knows(self, event_type: str) -> bool:
        return event_type in self._models

    def upcast(self, event_type: str, schema_version: int, payload: Payload) -> Payload:
        current = self.model(event_type).schema_version
        if schema_version > current:
            raise UnknownEventType(f"{event_type} v{schema_version} is newer than this code (v{current})")
        for version in range(schema_version, current):
            try:
                payload = self._upcasters[(event_type, version)](dict(payload))
            except KeyError:
                raise UnknownEventType(f"no upcaster for {event_type} v{version}") from None
        return payload

    def decode(self, event_type: str, schema_version: int, payload: Payload) -> DomainEvent:
        return self.model(event_type).model_validate(self.upcast(event_type, schema_version, payload))


registry = EventRegistry()
"""The process's registry: its composition root registers what the process decodes."""


class EventRef(NamedTuple):
    """Which event a stored payload belongs to. A sealed payload is bound to it (shared.sealing):
    copied onto another event, even of the same patient, it no longer opens."""

    event_id: UUID
    event_type: str
    stream_id: str


class Envelope(BaseModel):
    """An event as stored and as sent over the broker: the payload plus its provenance."""

    model_config = ConfigDict(frozen=True)

    event_id: UUID = Field(default_factory=new_event_id)
    event_type: str
    schema_version: int
    stream_id: str
    stream_version: int
    occurred_at: datetime
    recorded_at: datetime = Field(default_factory=utcnow)
    correlation_id: UUID
    causation_id: UUID | None = None
    actor: str
    payload: Payload

    @property
    def ref(self) -> EventRef:
        return EventRef(self.event_id, self.event_type, self.stream_id)

    @classmethod
    def from_store(cls, fields: dict[str, Any]) -> Envelope:
        """An envelope from a store's row: every field, of its type, validated when the event was
        written (``wrap``), so not again — validating took two thirds of reading an event back
        (docs/performance.md, the event store against the Python peer)."""
        envelope = cls.__new__(cls)
        _set_attribute(envelope, "__dict__", fields)
        _set_attribute(envelope, "__pydantic_fields_set__", set(_ENVELOPE_FIELDS))
        _set_attribute(envelope, "__pydantic_extra__", None)
        _set_attribute(envelope, "__pydantic_private__", None)
        return envelope

    @classmethod
    def wrap(
        cls,
        domain_event: DomainEvent,
        *,
        stream_id: str,
        stream_version: int,
        context: CommandContext,
        occurred_at: datetime | None = None,
        recorded_at: datetime | None = None,
    ) -> Envelope:
        """Both times default to now; ``occurred_at`` to ``recorded_at`` (a batch passes one
        ``recorded_at`` for all its events: they are recorded in one transaction)."""
        recorded_at = recorded_at or utcnow()
        return cls(
            event_type=domain_event.event_type,
            schema_version=domain_event.schema_version,
            stream_id=stream_id,
            stream_version=stream_version,
            occurred_at=occurred_at or recorded_at,
            recorded_at=recorded_at,
            correlation_id=context.correlation_id,
            causation_id=context.causation_id,
            actor=request_principal.get() or context.actor,
            payload=domain_event.model_dump(mode="json"),
        )

    def decode(self, events: EventRegistry = registry) -> DomainEvent:
        return events.decode(self.event_type, self.schema_version, self.payload)


class CommandContext(BaseModel):
    """Who asked for a change, and which conversation it belongs to (for tracing and audit)."""

    model_config = ConfigDict(frozen=True)

    actor: str = "system"
    correlation_id: UUID = Field(default_factory=new_event_id)
    causation_id: UUID | None = None

    @classmethod
    def caused_by(cls, envelope: Envelope, actor: str) -> CommandContext:
        return cls(actor=actor, correlation_id=envelope.correlation_id, causation_id=envelope.event_id)


Envelope.model_rebuild()
_ENVELOPE_FIELDS = frozenset(Envelope.model_fields)
_set_attribute = object.__setattr__
