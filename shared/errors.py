"""Domain refusals, shared by every service so adapters map them to one error shape.

Domain code raises these; HTTP adapters turn them into ``{"detail": reason}`` with the status
the contract names (404 unknown id, 409 conflict/duplicate, 422 invalid).
"""

from __future__ import annotations


class DomainError(Exception):
    """A command was refused. ``reason`` is specific and safe to show to the caller."""

    status_code = 422

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code or type(self).__name__


class Invalid(DomainError):
    """The command breaks a rule of the protocol or is malformed (422)."""

    status_code = 422


class Conflict(DomainError):
    """The command duplicates or contradicts what is already recorded (409)."""

    status_code = 409


class NotFound(DomainError):
    """The command names an id nobody has recorded (404)."""

    status_code = 404
