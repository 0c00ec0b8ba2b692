"""Outages: failures that are the infrastructure's, not the message's — and waiting them out.

A handler can fail for two kinds of reason. A *permanent* one belongs to the message (it cannot
be parsed, it breaks a rule, a bug meets it): retrying it a few times and then setting it aside
on the dead-letter subject, with the reason, is right. A *transient* one belongs to what the
handler depends on — the database restarting or refusing connections, the broker gone, the
key vault not loaded yet: the message is fine, and dead-lettering it would lose good data
(nothing replays the dead-letter subject). :func:`outage_of` tells the two apart;
:class:`Outages` pauses the service's consumers until the dependency answers again and tells
``/readyz`` why, so a database outage of any length costs only time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

import nats.errors
import structlog
from sqlalchemy import exc as sa_exc

from shared import metrics
from shared.keys import KeyMissing
from shared.tasks import cancel_and_wait, within, woken

log = structlog.get_logger(__name__)


class Dependency(StrEnum):
    STORE = "store"
    BROKER = "broker"
    KEY_VAULT = "key_vault"


_POSTGRES_OUTAGE_CLASSES = ("08", "53", "57", "58")
"""SQLSTATE classes of an unreachable or overloaded server: connection exception, insufficient
resources (too many connections), operator intervention (shutdown, cannot connect now) and
system error (I/O)."""
_POSTGRES_OUTAGE_STATES = frozenset({
    "55000",  # object_not_in_prerequisite_state: "database … is not currently accepting connections"
    "3D000",  # invalid_catalog_name: the database is gone (a failover or restore in progress)
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
})
_BROKER_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.errors.OutboundBufferLimitError,
)


def outage_of(error: BaseException) -> Dependency | None:
    """The dependency whose outage caused ``error``, or None when the error is the message's own.

    Follows the chain of causes (SQLAlchemy wraps the driver's error, which may wrap an OSError):
    a lost or refused database connection, PostgreSQL's outage SQLSTATEs, SQLite's busy or
    unopenable file, the broker's connection errors, a key the vault has not loaded yet."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _outage_of_one(current)
        if found is not None:
            return found
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return None


def _outage_of_one(error: BaseException) -> Dependency | None:
    if isinstance(error, KeyMissing):
        return Dependency.KEY_VAULT
    if isinstance(error, _BROKER_ERRORS):
        return Dependency.BROKER
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return Dependency.STORE
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return Dependency.STORE
    state = getattr(error, "sqlstate", None)
    if isinstance(state, str) and (state[:2] in _POSTGRES_OUTAGE_CLASSES or state in _POSTGRES_OUTAGE_STATES):
        return Dependency.STORE
    if isinstance(error, OSError | TimeoutError):
        return Dependency.STORE  # the socket under the driver: refused, reset, unreachable, timed out
    return None


Probe = Callable[[], Awaitable[None]]
Keepalive = Callable[[], Awaitable[None]]
T = TypeVar("T")

RETRIES_WHEN_UP = 3
"""How often a failure that looks like an outage is tried again although the dependency answers
at once (a pooled connection the database had dropped: the next try reconnects). Beyond this it
is the work's own failure."""


class Outages:
    """The dependencies a service's consumers are waiting for, shared by all of them.

    A consumer that meets an outage calls :meth:`wait_out`: the dependency is marked down (seen
    by ``/readyz`` and ``nephrotrack_dependency_up``), one probe loop per dependency asks it
    again with growing pauses until it answers, and every consumer waiting for it resumes then.
    While it waits, ``keepalive`` runs every :attr:`keepalive_every` seconds (a consumer tells
    JetStream it is still working on the messages it holds, so they are not redelivered)."""

    def __init__(self, probes: dict[Dependency, Probe], *, first_pause: float = 0.5, max_pause: float = 5.0,
                 keepalive_every: float = 15.0) -> None:
        self.probes = probes
        self.first_pause, self.max_pause, self.keepalive_every = first_pause, max_pause, keepalive_every
        self._down: dict[Dependency, tuple[float, str]] = {}
        self._back: dict[Dependency, asyncio.Event] = {}
        self._probing: set[asyncio.Task[None]] = set()
        for dependency in Dependency:
            metrics.DEPENDENCY_UP.labels(dependency=dependency).set(1)

    def problems(self) -> dict[str, str]:
        """What the consumers wait for, for ``/readyz``."""
        now = time.monotonic()
        return {
            f"consumers_paused_for_{dependency}": f"unreachable for {now - since:.0f} s: {reason}"
            for dependency, (since, reason) in self._down.items()
        }

    def is_down(self, dependency: Dependency) -> bool:
        return dependency in self._down

    async def outlast(
        self, work: Callable[[], Awaitable[T]], *, keepalive: Keepalive | None = None,
        on_outage: Callable[[Dependency], None] | None = None,
    ) -> T:
        """``work()`` again and again until it succeeds or fails for a reason of its own, waiting
        out every outage in between (:meth:`wait_out`); ``on_outage`` is told of each."""
        answered_at_once = 0
        while True:
            try:
                return await work()
            except Exception as error:
                dependency = outage_of(error)
                if dependency is None or answered_at_once >= RETRIES_WHEN_UP:
                    raise
                if on_outage is not None:
                    on_outage(dependency)
                if await self.wait_out(dependency, keepalive):
                    answered_at_once = 0
                else:
                    answered_at_once += 1

    async def wait_out(self, dependency: Dependency, keepalive: Keepalive | None = None) -> bool:
        """Return once ``dependency`` answers. False when it answered the first probe (it was not
        down: a connection lost mid-use, which the next try replaces), True after an outage."""
        if dependency not in self._back:
            failure = await self._probe(dependency)
            if dependency not in self._back:  # nobody marked it down while this probe ran
                if failure is None:
                    return False
                self._mark_down(dependency, failure)
        back = self._back[dependency]
        while not back.is_set():
            await woken(back, self.keepalive_every)
            if not back.is_set() and keepalive is not None:
                with contextlib.suppress(Exception):
                    await keepalive()
        return True

    def _mark_down(self, dependency: Dependency, failure: BaseException) -> None:
        back = self._back[dependency] = asyncio.Event()
        self._down[dependency] = (time.monotonic(), _describe(failure))
        metrics.DEPENDENCY_UP.labels(dependency=dependency).set(0)
        log.warning("dependency unavailable: consumers paused until it answers",
                    dependency=str(dependency), error=_describe(failure))
        probing = asyncio.get_running_loop().create_task(self._probe_until_back(dependency, back))
        self._probing.add(probing)
        probing.add_done_callback(self._probing.discard)

    async def close(self) -> None:
        """Stop probing (the service stops): a probe loop left behind would ask a dropped
        database or a closed connection for ever."""
        await cancel_and_wait(list(self._probing))

    async def _probe(self, dependency: Dependency) -> BaseException | None:
        """None when the dependency answers, else why not."""
        probe = self.probes.get(dependency)
        if probe is None:
            return None
        try:
            await within(2.0, probe())
        except Exception as failure:  # noqa: BLE001 - any failure of the probe means: not answering
            return failure
        return None

    async def _probe_until_back(self, dependency: Dependency, back: asyncio.Event) -> None:
        pause = self.first_pause
        while True:
            await asyncio.sleep(pause)
            failure = await self._probe(dependency)
            if failure is None:
                break
            self._down[dependency] = (self._down[dependency][0], _describe(failure))
            pause = min(pause * 2, self.max_pause)
        since, _ = self._down.pop(dependency)
        del self._back[dependency]
        metrics.DEPENDENCY_UP.labels(dependency=dependency).set(1)
        log.info("dependency available again: consumers resume", dependency=str(dependency),
                 down_seconds=round(time.monotonic() - since, 1))
        back.set()


def _describe(error: BaseException) -> str:
    """The error's class and first line: enough for an operator, never a payload."""
    root = getattr(error, "orig", None) or error
    first_line = str(root).splitlines()[0] if str(root) else ""
    return f"{type(root).__name__}: {first_line}"[:300]
