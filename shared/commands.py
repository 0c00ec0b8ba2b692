"""What every use case's command carries besides its own fields (services/<name>/handlers.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from shared.clinical_dates import utc_today
from shared.events import CommandContext


@dataclass(frozen=True, kw_only=True)
class Command:
    """Who asks — the context of the events the use case records (actor, correlation id) — and
    today's date in UTC, read once by the adapter and passed in, so a use case run again after a
    concurrency conflict decides with the same day, and a test can choose it."""

    context: CommandContext = field(default_factory=CommandContext)
    today: date = field(default_factory=utc_today)
