"""The projection's fast path on sealed envelopes — the services' own log (shared/sealing.py) —
with patient keys in a real NATS key bucket: it decodes exactly what the full path decodes,
without taking the full path, and fails the same way on an erased key or a broken seal."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable

import pytest

from bench import workload
from services.outcomes import wire
from services.outcomes.incoming import Incoming, projection_reads
from shared.keys import KeyErased, key_name
from shared.sealing import SEALED_FIELD, SealBroken, SealingCodec
from tests.keys import stack_codec


class _FullPathRefused(SealingCodec):
    """The same keys; opening a whole envelope (the full path) is an error."""

    def open(self, body: bytes) -> object:
        raise AssertionError("the full path was taken")


@pytest.fixture
async def sealed_log(prefix: str) -> AsyncIterator[tuple[SealingCodec, list[workload.Message]]]:
    """A benchmark log of 12 patients sealed with their own keys, the keys in the prefix's bucket."""
    sealer = workload.PatientKeys()
    messages = list(workload.events(2_000, patients=12, seal=sealer))
    async with stack_codec(prefix) as codec:
        for subject_id, key in sealer.keys.items():
            await codec.vault.kv.put(key_name(subject_id), key)
        await codec.vault.load(set(sealer.keys))
        yield codec, messages


async def test_sealed_messages_take_the_fast_path_and_decode_as_the_full_path(
    sealed_log: tuple[SealingCodec, list[workload.Message]],
) -> None:
    codec, messages = sealed_log
    fast_only = _FullPathRefused(codec.vault)
    read = 0
    for sequence, message in enumerate(messages, start=1):
        assert b'"payload":{"$sealed":"' in message.data
        fast = Incoming.parse("S", sequence, message.source, message.data, fast_only)
        envelope = codec.open(message.data)
        assert fast.envelope == wire.Meta.of(envelope)
        assert fast.event == (envelope.decode() if projection_reads(envelope.event_type) else None)
        read += fast.event is not None
    assert read > 1_000  # the log is mostly events the projection reads


def _resealed(messages: list[workload.Message], change: Callable[[str], str]) -> tuple[bytes, bytes]:
    """The first ``PatientEnrolled`` as published, and the same with its sealed value changed."""
    enrolled = next(m for m in messages if m.event_type == "PatientEnrolled")
    body = json.loads(enrolled.data)
    body["payload"] = {SEALED_FIELD: change(body["payload"][SEALED_FIELD])}
    return enrolled.data, json.dumps(body, separators=(",", ":")).encode()


def _flip_a_tag_bit(sealed: str) -> str:
    blob = bytearray(base64.b64decode(sealed))
    blob[-1] ^= 1
    return base64.b64encode(bytes(blob)).decode()


async def test_an_erased_key_and_a_broken_seal_fail_as_on_the_full_path(
    sealed_log: tuple[SealingCodec, list[workload.Message]],
) -> None:
    codec, messages = sealed_log
    enrolled, tampered = _resealed(messages, _flip_a_tag_bit)
    with pytest.raises(SealBroken):
        Incoming.parse("S", 1, "enrollment", tampered, codec)

    await codec.vault.erase(codec.open(enrolled).payload["subject_id"])
    with pytest.raises(KeyErased):
        Incoming.parse("S", 1, "enrollment", enrolled, codec)


async def test_a_sealed_value_that_is_not_strict_base64_goes_to_the_full_path(
    sealed_log: tuple[SealingCodec, list[workload.Message]],
) -> None:
    codec, messages = sealed_log
    # A line break inside the base64: the full path reads it leniently.
    enrolled, folded = _resealed(messages, lambda sealed: sealed[:8] + "\n" + sealed[8:])
    with pytest.raises(ValueError, match="not base64"):
        wire.sealed_blob(wire.split(folded)[1])  # type: ignore[index]
    assert Incoming.parse("S", 1, "enrollment", folded, codec).event == codec.open(enrolled).decode()
