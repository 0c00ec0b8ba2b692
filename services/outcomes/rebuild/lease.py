"""One rebuild at a time: the lease in ``projection_state`` (owner + heartbeat) — pure rules.

It keeps two rebuilds (the CLI and the admin endpoint, say) from writing one generation at once.
A rebuild renews it with every write; one killed without giving it back is taken over once its
heartbeat is ``LEASE_SECONDS`` old. The use cases that take, renew and give it back are in
:mod:`services.outcomes.handlers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.outcomes.projection_store import ProjectionState

LEASE_SECONDS = 30.0


class RebuildError(RuntimeError):
    """The rebuild cannot go on; the reason says why. The live projection is untouched."""


class RebuildBusy(RebuildError):
    """Another rebuild holds the lease."""


@dataclass(frozen=True)
class Lease:
    """The rebuild ``owner`` holds, of ``generation``."""

    owner: str
    generation: int


def ensure_free(state: ProjectionState, now: datetime) -> None:
    """Refuse (RebuildBusy) while another rebuild's heartbeat is younger than ``LEASE_SECONDS``."""
    heartbeat = state.rebuild_heartbeat_at
    if state.rebuild_owner and heartbeat and now - heartbeat < timedelta(seconds=LEASE_SECONDS):
        raise RebuildBusy(
            f"another rebuild of generation {state.rebuilding_generation} is running "
            f"(last heartbeat {(now - heartbeat).total_seconds():.0f} s ago); wait for it to finish"
        )


def ensure_held(state: ProjectionState, lease: Lease, *, lost: str) -> None:
    """Refuse (RebuildError, ``lost`` saying when) unless ``lease`` is still the state's."""
    if state.rebuild_owner != lease.owner or state.rebuilding_generation != lease.generation:
        raise RebuildError(f"the rebuild of generation {lease.generation} was {lost}")
