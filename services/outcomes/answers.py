"""Live cohort answers remembered as the bytes sent, per projection version: a request reads the
served generation's freshness with its mark rows' versions (one statement) and, while they are
those an answer was computed at, sends that answer again instead of decoding every patient's
outcome and recomputing it — constant time in patients and events. Equal versions mean equal
rows (every batch rewrites its mark rows with its patients, services/outcomes/queries.py), so a
remembered answer is never older than the rows it would be computed from, on any replica and
across a rebuild's swap (the generation changes). Locks and ``as_of`` are computed every time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from fastapi import Response
from pydantic import TypeAdapter

from services.outcomes.reading import ProjectionView
from services.outcomes.viewpoint import Viewpoint


class RememberedAnswers:
    """The last live answer per question (a route and its group), as the body FastAPI renders
    for ``shape`` (the route's ``response_model``): validated, then dumped by alias to JSON."""

    def __init__(self) -> None:
        self._answers: dict[Hashable, tuple[tuple[Any, ...], bytes]] = {}

    async def answer(
        self, question: Hashable, at: Viewpoint, stamp: Response, shape: TypeAdapter[Any],
        compute: Callable[[ProjectionView], Awaitable[Any]],
    ) -> Any:
        """The response to ``question``, with the freshness headers (on ``stamp`` too); a past
        answer (lock, ``as_of``) is returned as computed, for FastAPI to render."""
        current = await at.live_freshness()
        found = self._answers.get(question)
        if current is not None and found is not None and found[0] == current.live_key:
            stamp.headers.update(current.headers())
            return _response(found[1], stamp)
        async with at.open(stamp) as view:
            answer = await compute(view)
            key = view.freshness.live_key
            if key is None:
                return answer
            body = shape.dump_json(shape.validate_python(answer), by_alias=True)
            self._answers[question] = key, body
            return _response(body, stamp)


def _response(body: bytes, stamp: Response) -> Response:
    """As FastAPI sends a route's JSON: its body, then the headers the route set on ``stamp``."""
    response = Response(body, media_type="application/json")
    response.headers.raw.extend(stamp.headers.raw)
    return response
