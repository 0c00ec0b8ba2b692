"""``POST /v1/locks`` (an analyst freezes the answers under a name) and ``GET /v1/locks``
(contract, "Outcome statistics (v2)", time travel): thin adapters over
:func:`services.outcomes.handlers.lock_analysis` and the ``analysis_locks`` rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from services.outcomes import handlers
from services.outcomes.locks import NAME_PATTERN, AnalysisLock
from services.outcomes.projection_store import ProjectionStore
from services.outcomes.queries import OutcomesQueries
from services.outcomes.viewpoint import Viewpoint
from shared.http import command_context
from shared.service import Service


class LockRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200, description=f"the lock's name, {NAME_PATTERN}", examples=["interim-2026"])


class LockView(BaseModel):
    """A lock: pass its name as ``lock=`` to any outcomes GET for the answer frozen under it."""

    name: str
    locked_at: datetime = Field(description="when it was recorded (UTC)")
    actor: str = Field(description="who locked it: <role>:<key fingerprint>")
    positions: dict[str, int] = Field(description="per source service, the stream sequence applied when locked")
    position: str = Field(description="the same as X-Projection-Position reads")
    generation: int = Field(description="the frozen copy's generation (X-Projection-Generation of its answers)")


def lock_view(lock: AnalysisLock, streams: Mapping[str, str]) -> LockView:
    positions = {source: lock.positions.get(stream, 0) for source, stream in streams.items()}
    return LockView(
        name=lock.name, locked_at=lock.locked_at, actor=lock.actor, positions=positions,
        position=",".join(f"{source}:{sequence}" for source, sequence in positions.items()),
        generation=lock.generation,
    )


def lock_routes(
    service: Service, projection: ProjectionStore, queries: OutcomesQueries, viewpoint: Callable[..., Viewpoint]
) -> APIRouter:
    router = APIRouter(prefix="/v1/locks", tags=["time travel"])
    at_viewpoint = Depends(viewpoint)  # as_of / lock (a default: annotations are strings here)

    @router.post("", status_code=201, response_model=LockView,
                 responses={409: {"description": "the name is taken"}, 422: {"description": "the name is not allowed"}},
                 summary="Freeze the current answers under a name (analyst; an audited AnalysisLocked event)")
    async def lock(command: LockRequest, request: Request) -> LockView:
        locked = await service.transact(partial(
            handlers.lock_analysis, handlers.LockAnalysis(command.name, command_context(request)), projection=projection,
        ))
        return lock_view(locked, queries.streams)

    @router.get("", response_model=list[LockView], summary="The analysis locks, oldest first")
    async def locks(at: Viewpoint = at_viewpoint) -> list[LockView]:
        """With ``as_of``: the locks recorded by then; with ``lock``: that one (404 if unknown)."""
        async with queries.snapshot() as connection:
            found = await queries.locks(connection)
        if at.lock is not None:
            found = [lock for lock in found if lock.name == at.lock]
            if not found:
                raise HTTPException(404, f"no analysis lock is named {at.lock[:80]!r}")
        if at.as_of is not None:
            found = [lock for lock in found if lock.locked_at <= at.as_of]
        return [lock_view(lock, queries.streams) for lock in found]

    return router
