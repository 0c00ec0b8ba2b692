"""Sealed payloads and the key vault (crypto-shredding), on the real NATS key-value store and
every store backend: round trips, the specific error of each failure, and erasure."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.broker import Topology
from shared.events import CommandContext, DomainEvent, EventRef, registry
from shared.keys import KeyErased, KeyMissing, KeyVault, bucket_name
from shared.sealing import (
    LEGACY_MAGIC,
    NONCE_BYTES,
    SEALED_FIELD,
    SealBroken,
    SealingCodec,
    seal,
    sealed_subject,
    unseal,
)
from shared.store import EventStore, open_store
from tests.conftest import STORE_BACKENDS
from tests.foundation.following import read_all_written
from tests.foundation.tables import outbox_rows, overwrite_payload, stored_payload, stored_payloads


@registry.register
class SubjectNoted(DomainEvent):
    """A test event about a subject."""

    subject_id: str
    note: str


@pytest.fixture(params=STORE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def vault(nats_client: nats.NATS, topology: Topology) -> AsyncIterator[KeyVault]:
    js = nats_client.jetstream()
    keys = KeyVault(bucket_name(topology))
    await keys.connect(js)
    watch = asyncio.create_task(keys.watch())
    await keys.synced()
    yield keys
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    await js.delete_stream(keys.stream)


@pytest.fixture
async def sealed_store(database_url: str, vault: KeyVault) -> AsyncIterator[EventStore]:
    store = open_store(database_url, subject_for=lambda e: f"test.{e.event_type}", codec=SealingCodec(vault))
    yield store
    await store.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


REF = EventRef(uuid.uuid4(), "SubjectNoted", "note-1")

event_refs = st.builds(EventRef, st.uuids(), st.text(min_size=1, max_size=20), st.text(max_size=40))


@settings(max_examples=200, deadline=None)
@given(subject=st.text(min_size=1, max_size=64), payload=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
       ref=event_refs)
def test_seal_round_trip_property(subject: str, payload: dict[str, object], ref: EventRef) -> None:
    key = AESGCM(os.urandom(32))
    plaintext = json.dumps(payload).encode()
    blob = seal(subject, key, plaintext, ref)
    assert sealed_subject(blob) == subject
    assert json.loads(unseal(blob, key, ref)) == payload
    with pytest.raises(ValueError):  # never readable as JSON
        json.loads(blob)


@settings(max_examples=200, deadline=None)
@given(ref=event_refs, other=event_refs)
def test_a_blob_opens_only_as_the_payload_of_its_own_event_property(ref: EventRef, other: EventRef) -> None:
    key = AESGCM(os.urandom(32))
    blob = seal("IGA-A-001", key, b"{}", ref)
    if other == ref:
        assert unseal(blob, key, other) == b"{}"
    else:
        with pytest.raises(SealBroken):
            unseal(blob, key, other)


def test_wrong_key_or_altered_blob_is_refused_specifically() -> None:
    key = AESGCM(os.urandom(32))
    blob = seal("IGA-A-001", key, b'{"value": 2.1}', REF)
    with pytest.raises(SealBroken, match="IGA-A-001"):
        unseal(blob, AESGCM(os.urandom(32)), REF)
    altered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealBroken):
        unseal(altered, key, REF)
    moved = blob.replace(b"IGA-A-001", b"IGA-A-002")  # sealed for one subject, claimed for another
    with pytest.raises(SealBroken):
        unseal(moved, key, REF)


def test_a_blob_copied_onto_another_event_of_the_same_subject_is_refused() -> None:
    key = AESGCM(os.urandom(32))
    blob = seal("IGA-A-001", key, b'{"value": 2.1}', REF)
    for other in (REF._replace(event_id=uuid.uuid4()), REF._replace(event_type="SubjectForgotten"),
                  REF._replace(stream_id="note-2")):
        with pytest.raises(SealBroken, match="sealed for another event"):
            unseal(blob, key, other)
    assert unseal(blob, key, REF) == b'{"value": 2.1}'


def legacy_blob(subject_id: str, key: AESGCM, plaintext: bytes) -> bytes:
    """A blob as sealed before events were bound in (``nts1``: the header alone authenticated)."""
    header = LEGACY_MAGIC + bytes([len(subject_id.encode())]) + subject_id.encode()
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + key.encrypt(nonce, plaintext, header)


def test_an_nts1_blob_still_opens() -> None:
    key = AESGCM(os.urandom(32))
    blob = legacy_blob("IGA-A-001", key, b'{"value": 2.1}')
    assert sealed_subject(blob) == "IGA-A-001"
    assert unseal(blob, key, REF) == b'{"value": 2.1}'
    with pytest.raises(SealBroken):
        unseal(blob, AESGCM(os.urandom(32)), REF)


async def test_vault_creates_once_reads_and_erases_for_good(vault: KeyVault, nats_client: nats.NATS, topology: Topology) -> None:
    key = await vault.create("IGA-A-001")
    assert len(key) == 32 and await vault.create("IGA-A-001") == key  # get-or-create
    with pytest.raises(KeyMissing):
        vault.key("IGA-A-999")

    # Another process (its own vault) reads the same key, and learns of the erasure by its watch.
    other = KeyVault(bucket_name(topology))
    await other.connect(nats_client.jetstream())
    watch = asyncio.create_task(other.watch())
    try:
        await other.synced()
        assert other.key("IGA-A-001") == key
        sealed = seal("IGA-A-001", other.cipher("IGA-A-001"), b"{}", REF)  # the cipher made once, kept
        await vault.erase("IGA-A-001")
        for _ in range(100):
            if other.is_erased("IGA-A-001"):
                break
            await asyncio.sleep(0.02)
        with pytest.raises(KeyErased):
            other.key("IGA-A-001")
        with pytest.raises(KeyErased):  # the cached cipher went with the key
            unseal(sealed, other.cipher("IGA-A-001"), REF)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)

    with pytest.raises(KeyErased):
        vault.key("IGA-A-001")
    with pytest.raises(KeyErased):  # an erased subject never gets a new key
        await vault.create("IGA-A-001")
    await vault.erase("IGA-A-001")  # idempotent
    # The bucket keeps only the purge marker: the key's bytes are gone from the stream.
    js = nats_client.jetstream()
    info = await js.stream_info(vault.stream)
    assert info.state.messages == 1
    marker = await js.get_msg(vault.stream, subject=f"$KV.{vault.bucket}.{b'IGA-A-001'.hex()}")
    assert not marker.data and marker.headers["KV-Operation"] == "PURGE"


async def test_store_seals_patient_payloads_in_the_table_and_the_outbox(sealed_store: EventStore, vault: KeyVault) -> None:
    await vault.create("IGA-B-007")
    context = CommandContext(actor="tester")
    written = await sealed_store.append("note-1", [SubjectNoted(subject_id="IGA-B-007", note="plaintext-marker")], 0, context)
    await sealed_store.append("erasure-IGA-B-007", [SubjectNoted(subject_id="IGA-B-007", note="clear")], 0, context)
    assert await sealed_store.read_stream("note-1") == written
    assert [s.envelope for s in await read_all_written(sealed_store, 2)][0] == written[0]

    stored = await stored_payloads(sealed_store)
    bodies = [json.loads(row.body) for row in await outbox_rows(sealed_store)]
    assert b"plaintext-marker" not in stored["note-1"] and sealed_subject(stored["note-1"]) == "IGA-B-007"
    assert json.loads(stored["erasure-IGA-B-007"])["note"] == "clear"  # the clear streams stay JSON
    sealed_body, clear_body = bodies
    assert set(sealed_body["payload"]) == {SEALED_FIELD}
    assert b"plaintext-marker" not in json.dumps(sealed_body).encode()
    assert clear_body["payload"]["note"] == "clear"
    codec = sealed_store.codec
    assert codec.open(json.dumps(sealed_body).encode()) == written[0]

    await vault.erase("IGA-B-007")
    with pytest.raises(KeyErased):
        await sealed_store.read_stream("note-1")
    with pytest.raises(KeyErased):
        codec.open(json.dumps(sealed_body).encode())
    with pytest.raises(KeyErased):  # and nothing new is written for an erased patient
        await sealed_store.append("note-2", [SubjectNoted(subject_id="IGA-B-007", note="x")], 0, context)
    assert (await sealed_store.read_stream("erasure-IGA-B-007"))[0].payload["note"] == "clear"


async def test_a_subject_without_a_key_is_never_written_in_clear(sealed_store: EventStore) -> None:
    with pytest.raises(KeyMissing):
        await sealed_store.append("note-3", [SubjectNoted(subject_id="NOBODY-1", note="x")], 0)
    assert await sealed_store.read_stream("note-3") == []


async def test_a_key_created_by_another_process_is_fetched_on_first_use(
    sealed_store: EventStore, nats_client: nats.NATS, topology: Topology
) -> None:
    """The mirror may lag the bucket by a moment; the store fetches a key it does not hold yet."""
    creator = KeyVault(bucket_name(topology))
    await creator.connect(nats_client.jetstream())
    await creator.create("IGA-C-003")
    await sealed_store.append("note-4", [SubjectNoted(subject_id="IGA-C-003", note="x")], 0)
    assert (await sealed_store.read_stream("note-4"))[0].payload["note"] == "x"


async def test_a_payload_moved_to_another_event_of_the_patient_fails_in_the_store_and_on_the_broker(
    sealed_store: EventStore, vault: KeyVault
) -> None:
    """Someone with write access to a table or a stream, but no key, cannot make one of a
    patient's events say what another of their events says."""
    await vault.create("IGA-B-008")
    first, second = await sealed_store.append(
        "note-5", [SubjectNoted(subject_id="IGA-B-008", note="first"), SubjectNoted(subject_id="IGA-B-008", note="2")], 0
    )
    await overwrite_payload(sealed_store, second.event_id, await stored_payload(sealed_store, first.event_id))
    bodies = [json.loads(row.body) for row in await outbox_rows(sealed_store)]
    with pytest.raises(SealBroken):
        await sealed_store.read_stream("note-5")
    moved = {**bodies[1], "payload": bodies[0]["payload"]}
    with pytest.raises(SealBroken):
        sealed_store.codec.open(json.dumps(moved).encode())
    assert sealed_store.codec.open(json.dumps(bodies[0]).encode()) == first


async def test_a_payload_sealed_as_nts1_is_still_read(sealed_store: EventStore, vault: KeyVault) -> None:
    await vault.create("IGA-B-009")
    [written] = await sealed_store.append("note-6", [SubjectNoted(subject_id="IGA-B-009", note="old")], 0)
    old = legacy_blob("IGA-B-009", vault.cipher("IGA-B-009"), json.dumps(written.payload).encode())
    await overwrite_payload(sealed_store, written.event_id, old)
    assert await sealed_store.read_stream("note-6") == [written]
