"""Reading broker envelopes in one pass per field, for the projection's hot path.

Why not ``Envelope.model_validate_json``: profiled on the rebuild, building the envelope model
cost more than pydantic-core's validation itself, and it parses the payload into a dict that
the event model then validates a second time — for half of a real log (raw lab results) the
projection never even looks at the payload. The relays write envelopes with
``Envelope.model_dump_json`` (field order: every metadata field, ``payload`` last), so a body
splits at its first ``,"payload":`` into the metadata and the payload's own JSON:

- the metadata is validated with the envelope's own field types (a ``TypedDict``: same
  validation, no model instance);
- the payload is handed as JSON to the event model (``model_validate_json``), once, and only
  for the event types the projection reads.

A sealed payload — every payload about a patient, as the services publish them
(shared/sealing.py) — is ``{"$sealed": "<base64 blob>"}``: :func:`sealed_blob` takes the blob
out, the codec opens it (``Codec.plaintext``) and the event model validates the JSON inside, so
the services' own log takes this path too (before, every sealed message went the full way:
the envelope model, a dict of the payload, a copy of the envelope, the event from the dict).

The split is exact or refused: JSON strings cannot hold an unescaped ``"``, so the first
``,"payload":`` is a key, and the metadata half only parses if it was the top-level one; a
payload that does not validate as its event means the split was wrong or the event is, and the
caller retries on the full path. Anything else — another writer's field order, a sealed value
that is not plain base64, an older schema version (which needs its upcasters) — returns
``None`` and the caller takes the full path (``codec.open`` + ``Envelope.decode``), with its
exact behaviour. The one difference: the payload of an event type the projection does not read
is not parsed, nor opened, at all (the full path parsed it into a dict nobody looked at).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import NamedTuple, NotRequired
from uuid import UUID

from pydantic import TypeAdapter
from pydantic_core import SchemaValidator, ValidationError
from typing_extensions import TypedDict

from shared.events import Envelope, EventRef, registry
from shared.sealing import SEALED_FIELD

_PAYLOAD_KEY = b',"payload":'
_SEALED_START = f'{{"{SEALED_FIELD}":"'.encode()
_SEALED_END = b'"}'


class _Head(TypedDict):
    """``Envelope`` without its payload, field for field (tests/unit/outcomes/test_wire.py)."""

    event_id: UUID
    event_type: str
    schema_version: int
    stream_id: str
    stream_version: int
    occurred_at: datetime
    recorded_at: datetime
    correlation_id: UUID
    causation_id: NotRequired[UUID | None]
    actor: str


_HEAD = TypeAdapter(_Head).validator


class Meta(NamedTuple):
    """The envelope fields the projection reads (timeline rows, marks, the eGFR version guard,
    the event a sealed payload is bound to).
    A named tuple: built once per message, where a frozen dataclass's ``__init__`` showed."""

    event_id: UUID
    event_type: str
    stream_id: str
    schema_version: int
    stream_version: int
    occurred_at: datetime
    recorded_at: datetime

    @classmethod
    def of(cls, envelope: Envelope) -> Meta:
        return cls(envelope.event_id, envelope.event_type, envelope.stream_id, envelope.schema_version,
                   envelope.stream_version, envelope.occurred_at, envelope.recorded_at)

    @property
    def ref(self) -> EventRef:
        """The event a sealed payload must be bound to (shared.sealing)."""
        return EventRef(self.event_id, self.event_type, self.stream_id)


def split(body: bytes) -> tuple[Meta, bytes] | None:
    """(metadata, payload JSON) of a plain envelope in the relays' field order, or ``None`` when
    the body is not one (see the module docstring: the caller then takes the full path)."""
    cut = body.find(_PAYLOAD_KEY)
    if cut < 0 or not body.endswith(b"}}"):
        return None
    payload = body[cut + len(_PAYLOAD_KEY) : -1]
    if not payload.startswith(b"{"):
        return None
    try:
        head = _HEAD.validate_json(body[:cut] + b"}")
    except ValidationError:
        return None
    meta = Meta(head["event_id"], head["event_type"], head["stream_id"], head["schema_version"],
                head["stream_version"], head["occurred_at"], head["recorded_at"])
    return meta, payload


def sealed_blob(payload: bytes) -> bytes | None:
    """The sealed blob of a payload written as ``{"$sealed": "<base64>"}`` (the sealing codec's
    wire form), or ``None`` for a payload in clear. Raises ``ValueError`` on a sealed value that
    is not strict base64 (the full path, which reads it leniently, then decides)."""
    if not (payload.startswith(_SEALED_START) and payload.endswith(_SEALED_END)):
        return None
    try:
        return base64.b64decode(payload[len(_SEALED_START) : -len(_SEALED_END)], validate=True)
    except binascii.Error as error:
        raise ValueError(f"sealed payload is not base64: {error}") from error


def payload_validator(event_type: str, schema_version: int) -> SchemaValidator | None:
    """The validator of the event model that reads this payload as it is, or ``None`` when it
    needs upcasting (or its type is unknown): the full path's ``registry.decode`` then decides.
    Looked up once per (type, version); the bare validator, because ``model_validate_json``'s
    Python wrapper cost a third of the validation itself."""
    key = (event_type, schema_version)
    if key not in _validators:
        known = registry.knows(event_type) and registry.model(event_type).schema_version == schema_version
        _validators[key] = registry.model(event_type).__pydantic_validator__ if known else None
    return _validators[key]


_validators: dict[tuple[str, int], SchemaValidator | None] = {}
