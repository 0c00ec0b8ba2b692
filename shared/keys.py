"""Per-patient data keys, for crypto-shredding: erase a patient by deleting one key.

Every payload about a patient is sealed with that patient's own AES-256 key
(:mod:`shared.sealing`); deleting the key makes every copy of those payloads — in five
databases, the JetStream streams, backups — unreadable at once, while the logs themselves stay
append-only. The keys live in a NATS JetStream key-value bucket (``<prefix>_subject_keys``):
the one store every service already reaches, guarded by the broker's accounts (the lab systems'
account cannot see it; only enrollment may write it, see deploy/nats/accounts.conf).

Who does what. Enrollment creates a patient's key when it enrols them (:meth:`KeyVault.create`)
and deletes it when their data are erased (:meth:`KeyVault.erase`); every other service only
reads. Each process keeps a mirror of the bucket in memory, fed by a KV watch
(:meth:`KeyVault.watch`): lookups on the hot path are dictionary reads, and an erasure reaches
every process — every replica, not only the one a durable consumer happens to deliver the
erasure event to — as the watch delivers the bucket's delete marker. Consumers of the erasure
event also call :meth:`KeyVault.mark_erased` so the eviction never waits for the watch, and remember
the subject in their own database, to mark it erased again at every start-up before the watch could
load a key whose purge failed (shared/erasures.py).

Two outcomes of a failed lookup are told apart: :class:`KeyErased` (the bucket holds the
key's delete marker: the data are gone for good, readers skip them) and :class:`KeyMissing`
(no key was ever created for that subject, or this process has not seen it yet: a transient
or a bug, never a reason to drop data).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import nats.js.errors
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from shared.broker import Topology, ensure_stream
from shared.errors import NotFound
from shared.tasks import within

log = structlog.get_logger(__name__)

KEY_BYTES = 32  # AES-256


class KeyErased(NotFound):
    """The subject's key was deleted: their payloads are unreadable by design (404 to callers)."""

    def __init__(self, subject_id: str) -> None:
        super().__init__(f"the data of subject {subject_id} were erased after consent was withdrawn", code="erased")
        self.subject_id = subject_id


class KeyMissing(LookupError):
    """No key is known for the subject (never created, or not seen by this process yet)."""

    def __init__(self, subject_id: str) -> None:
        super().__init__(f"no data key for subject {subject_id}")
        self.subject_id = subject_id


def bucket_name(topology: Topology) -> str:
    """``<prefix>_subject_keys``: one bucket per stack, like its streams (bucket names allow
    letters, digits, ``_`` and ``-``)."""
    return f"{topology.prefix}_subject_keys".replace(".", "_")


def key_name(subject_id: str) -> str:
    """KV key of a subject: its id in hex (subject ids may hold characters keys may not, e.g. a
    leading dot)."""
    return subject_id.encode().hex()


def _subject_of(key: str) -> str:
    return bytes.fromhex(key).decode()


class KeyVault:
    """The process's view of the key bucket: a mirror in memory, kept current by a watch."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._kv: KeyValue | None = None
        self._js: JetStreamContext | None = None
        self._keys: dict[str, bytes] = {}
        self._ciphers: dict[str, AESGCM] = {}
        self._erased: set[str] = set()
        self._synced = asyncio.Event()

    # --- connecting ---------------------------------------------------------------------------

    async def connect(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        """Open the bucket, creating it with ``replicas`` copies if missing, or raising an existing
        one with fewer to ``replicas`` (idempotent, like the event streams): on a single copy, a
        node's lost disk would erase every patient's key at once.

        Created as a plain stream rather than with ``create_key_value`` for one reason: KV
        buckets deny message deletion, and :meth:`erase` deletes the key's message with the
        server's secure erase (overwritten on disk) before it leaves the purge marker.
        """
        self._js = js
        await ensure_stream(js, StreamConfig(
            name=self.stream, subjects=[f"$KV.{self.bucket}.>"], storage=StorageType.FILE,
            max_msgs_per_subject=1, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True, deny_delete=False,
            duplicate_window=120.0, num_replicas=replicas,
        ))
        self._kv = await js.key_value(self.bucket)

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("the key vault is not connected")
        return self._kv

    async def watch(self) -> None:
        """Mirror the bucket until cancelled: every current key and delete marker first, then
        each change. Run it as a background task; :meth:`synced` waits for the first pass."""
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the initial values have all arrived
                    self._synced.set()
                    continue
                try:
                    subject_id = _subject_of(entry.key)
                except ValueError:
                    continue  # not a key of ours
                if entry.operation in (KV_DEL, KV_PURGE):
                    self.mark_erased(subject_id)
                elif entry.value and subject_id not in self._erased:
                    self._keys[subject_id] = entry.value
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def synced(self, timeout: float = 10.0) -> None:
        await within(timeout, self._synced.wait())

    # --- reading ------------------------------------------------------------------------------

    def key(self, subject_id: str) -> bytes:
        """The subject's key from the mirror (no I/O): the hot path of every seal and open."""
        found = self._keys.get(subject_id)
        if found is not None:
            return found
        if subject_id in self._erased:
            raise KeyErased(subject_id)
        raise KeyMissing(subject_id)

    def cipher(self, subject_id: str) -> AESGCM:
        """The subject's AES-256-GCM cipher, made once per key: making one cost as much as
        sealing a payload with it (docs/labs.md#throughput). Gone with the key (:meth:`mark_erased`)."""
        found = self._ciphers.get(subject_id)
        if found is None:
            found = self._ciphers[subject_id] = AESGCM(self.key(subject_id))
        return found

    def has_key(self, subject_id: str) -> bool:
        """The mirror holds a key for the subject (no I/O; after :meth:`load` for fresh ones)."""
        return subject_id in self._keys

    def is_erased(self, subject_id: str) -> bool:
        return subject_id in self._erased

    async def load(self, subject_ids: set[str]) -> None:
        """Fetch from the bucket the keys the mirror does not hold yet (a key created a moment
        ago, before the watch delivered it). Subjects without a key stay missing."""
        for subject_id in subject_ids:
            if subject_id in self._keys or subject_id in self._erased:
                continue
            try:
                entry = await self.kv._get(key_name(subject_id))  # _get: tells deleted from absent
            except nats.js.errors.KeyDeletedError:
                self.mark_erased(subject_id)
            except nats.js.errors.KeyNotFoundError:
                continue
            else:
                if entry.value:
                    self._keys[subject_id] = entry.value

    # --- writing (enrollment) -----------------------------------------------------------------

    async def create(self, subject_id: str) -> bytes:
        """The subject's key, created if they have none; :class:`KeyErased` if it was erased
        (an erased subject id is never given a new key: its old payloads stay unreadable)."""
        await self.load({subject_id})
        try:
            return self.key(subject_id)
        except KeyMissing:
            pass
        try:  # "expected last subject sequence 0": refused if a key or a delete marker exists
            await self.kv.update(key_name(subject_id), os.urandom(KEY_BYTES), last=0)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # a concurrent enrollment created it, or it was erased meanwhile
        await self.load({subject_id})
        return self.key(subject_id)

    async def erase(self, subject_id: str) -> None:
        """Delete the subject's key for good: the key's message is securely erased (overwritten
        in the server's store), then a purge marker stays so that every reader — and a later
        :meth:`create` — knows the key was erased rather than never made. Idempotent."""
        self.mark_erased(subject_id)
        js = self._js
        assert js is not None
        try:
            entry = await self.kv._get(key_name(subject_id))
        except nats.js.errors.KeyDeletedError:
            return  # erased before
        except nats.js.errors.KeyNotFoundError:
            entry = None
        if entry is not None:
            await js.delete_msg(self.stream, entry.revision)  # secure erase (no_erase=False)
        await self.kv.purge(key_name(subject_id))

    def mark_erased(self, subject_id: str) -> None:
        """Drop the key from this process's mirror and remember the subject as erased."""
        self._keys.pop(subject_id, None)
        self._ciphers.pop(subject_id, None)
        self._erased.add(subject_id)

