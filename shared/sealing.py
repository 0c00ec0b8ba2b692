"""Sealed payloads: the one place where patients' payloads are encrypted and decrypted.

:class:`SealingCodec` is the event store's codec in every service (``shared.store.Codec``), and
the same object opens the envelopes that arrive from the broker, so a payload about a patient is
sealed with that patient's key (:mod:`shared.keys`) wherever it is kept:

- in a service's ``events`` table, ``payload`` holds a sealed blob (below) instead of JSON;
- on the broker, the envelope's metadata stays readable (type, stream, times, actor — what
  routing, audit and lag need) and its ``payload`` is ``{"$sealed": "<base64 blob>"}``.

Which payloads are sealed: those naming a ``subject_id``, except the erasure event itself
(``erasure-…``: every service must read it after the key is gone). Lab rejections
(``rejection-…``) are stored sealed when they name a patient who has a key, but published in
clear, as the contract's ``labs.rejected`` promises: those broker copies are deleted by the labs
service when the patient is erased (services/labs/purge.py, docs/erasure.md).

The blob: ``MAGIC | len(subject id) | subject id | 12-byte nonce | AES-256-GCM ciphertext+tag``.
It starts with a NUL byte, so it can never be mistaken for JSON; it names its subject, so a
reader finds the key without knowing how the stream is named (labs streams are named by result
id). Bound in as associated data: the header (so a blob moved to another subject fails) and,
since ``nts2``, the event's id, type and stream (:class:`~shared.events.EventRef`), so a blob
copied onto another event of the same patient fails too (:class:`SealBroken`) instead of
passing for that event's payload. ``nts1`` blobs, bound to the header only, still open.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.events import Envelope, EventRef, Payload
from shared.keys import KeyVault
from shared.store import JsonCodec

MAGIC = b"\x00nts2"
LEGACY_MAGIC = b"\x00nts1"
"""Blobs sealed before the event was bound in (header only): still opened, never written."""
NONCE_BYTES = 12
SEALED_FIELD = "$sealed"
CLEAR_STREAM_PREFIXES = ("erasure-",)
PUBLISHED_IN_CLEAR_PREFIXES = ("rejection-",)
"""Streams whose events the broker carries in clear (see the module doc)."""


class SealBroken(ValueError):
    """A sealed payload failed authentication: a wrong key, or bytes altered after sealing."""


def seal(subject_id: str, cipher: AESGCM, plaintext: bytes, event: EventRef) -> bytes:
    kid = subject_id.encode()
    if len(kid) > 255:
        raise ValueError("a subject id longer than 255 bytes cannot be sealed")
    header = MAGIC + bytes([len(kid)]) + kid
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + cipher.encrypt(nonce, plaintext, header + _bound(event))


def _bound(event: EventRef) -> bytes:
    """The event's part of the associated data: its id, its type after the type's length, then
    its stream (the rest): no two different events give the same bytes."""
    kind = _kinds.get(event.event_type)
    if kind is None:
        encoded = event.event_type.encode()
        kind = _kinds[event.event_type] = len(encoded).to_bytes(4) + encoded
    return event.event_id.bytes + kind + event.stream_id.encode()


_kinds: dict[str, bytes] = {}
"""An event type's length-prefixed bytes in the associated data, made once per type (opening a
million sealed payloads in a rebuild built them a million times: docs/performance.md)."""


def sealed_subject(blob: bytes) -> str | None:
    """The subject a blob is sealed for, or None if ``blob`` is not sealed (plain JSON)."""
    if not blob.startswith((MAGIC, LEGACY_MAGIC)):
        return None
    length = blob[len(MAGIC)]
    return blob[len(MAGIC) + 1 : len(MAGIC) + 1 + length].decode()


def unseal(blob: bytes, cipher: AESGCM, event: EventRef) -> bytes:
    kid_end = len(MAGIC) + 1 + blob[len(MAGIC)]
    header, nonce, ciphertext = blob[:kid_end], blob[kid_end : kid_end + NONCE_BYTES], blob[kid_end + NONCE_BYTES :]
    associated = header if blob.startswith(LEGACY_MAGIC) else header + _bound(event)
    try:
        return cipher.decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise SealBroken(
            f"a payload sealed for subject {sealed_subject(blob)} does not open with that subject's key as the "
            f"payload of event {event.event_id} (wrong key, sealed for another event, or altered after sealing)"
        ) from None


def _named(stream_id: str, payload: Payload) -> str | None:
    """The subject a payload is about, unless its stream stays in clear."""
    if stream_id.startswith(CLEAR_STREAM_PREFIXES):
        return None
    subject_id = payload.get("subject_id")
    return subject_id if isinstance(subject_id, str) else None


class SealingCodec(JsonCodec):
    """JSON payloads, sealed with the patient's key when they name a patient (see module doc).

    ``encode``/``decode``/``open`` look keys up in the vault's in-memory mirror (no I/O);
    ``prepare`` fetches, before a batch, the keys the mirror does not hold yet. A lookup fails
    with ``KeyErased`` for an erased subject (readers skip those payloads) and ``KeyMissing``
    for a subject without a key (never written in clear instead: that would defeat erasure).
    """

    def __init__(self, vault: KeyVault) -> None:
        self.vault = vault

    def subject_of(self, stream_id: str, payload: Payload) -> str | None:
        subject_id = _named(stream_id, payload)
        if subject_id and stream_id.startswith(PUBLISHED_IN_CLEAR_PREFIXES) and not self.vault.has_key(subject_id):
            return None  # a refusal about no patient of ours (unknown, never enrolled): nothing to erase
        return subject_id

    def encode(self, event: EventRef, payload: Payload) -> bytes:
        plaintext = super().encode(event, payload)
        subject_id = self.subject_of(event.stream_id, payload)
        if subject_id is None:
            return plaintext
        return seal(subject_id, self.vault.cipher(subject_id), plaintext, event)

    def decode(self, event: EventRef, data: bytes) -> Payload:
        return super().decode(event, self.plaintext(event, data))

    def plaintext(self, event: EventRef, stored: bytes) -> bytes:
        subject_id = sealed_subject(stored)
        return stored if subject_id is None else unseal(stored, self.vault.cipher(subject_id), event)

    def wire(self, envelope: Envelope, stored: bytes) -> bytes:
        if sealed_subject(stored) is None or envelope.stream_id.startswith(PUBLISHED_IN_CLEAR_PREFIXES):
            return super().wire(envelope, stored)
        sealed = {SEALED_FIELD: base64.b64encode(stored).decode()}
        return envelope.model_copy(update={"payload": sealed}).model_dump_json().encode()

    def open(self, body: bytes) -> Envelope:
        envelope = Envelope.model_validate_json(body)
        sealed = envelope.payload.get(SEALED_FIELD)
        if not isinstance(sealed, str):
            return envelope
        return envelope.model_copy(update={"payload": self.decode(envelope.ref, base64.b64decode(sealed))})

    async def prepare(self, *, payloads: Iterable[tuple[str, Payload]] = (), stored: Iterable[bytes] = ()) -> None:
        wanted = {s for stream_id, payload in payloads if (s := _named(stream_id, payload))}
        wanted.update(s for blob in stored if (s := sealed_subject(blob)))
        await self.vault.load(wanted)

    def is_erased(self, subject_id: str) -> bool:
        return self.vault.is_erased(subject_id)

    def mark_erased(self, subject_id: str) -> None:
        self.vault.mark_erased(subject_id)
