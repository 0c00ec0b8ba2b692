"""``nephrotrack rebuild``: rebuild the outcomes projection from the JetStream log, with a
progress bar (events/s, ETA). Interrupted, it resumes where it stopped when run again."""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from contracts import register_all
from nephrotrack.runtime import local_broker_url
from services.outcomes.rebuild.job import RebuildProgress
from services.outcomes.rebuild.wiring import default_streams, rebuild
from shared.database import migrate
from shared.events import registry
from shared.settings import RuntimeSettings, database_url


def _eta(progress: RebuildProgress) -> str:
    seconds = progress.eta_seconds
    if seconds is None:
        return "ETA –"
    minutes, seconds = divmod(round(seconds), 60)
    return f"ETA {minutes}:{seconds:02d}"


def run_rebuild(*, restart: bool = False, console: Console | None = None) -> RebuildProgress:
    """Migrate the outcomes database if needed, rebuild, swap; returns the final progress."""
    console = console or Console(stderr=True)
    register_all(registry)
    settings = RuntimeSettings()
    url = database_url("outcomes", settings)
    migrate("outcomes", url)
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} events/s"), TextColumn("{task.fields[eta]}"), TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("starting", total=None, rate="0", eta="ETA –")

        def show(progress: RebuildProgress) -> None:
            bar.update(
                task, completed=progress.applied, total=progress.total or None,
                description=f"{progress.phase} (generation {progress.generation}"
                + (", resumed)" if progress.resumed else ")"),
                rate=f"{progress.events_per_second:,.0f}", eta=_eta(progress),
            )

        # As the outcomes service's NATS user (it may create the replay consumers).
        broker = local_broker_url("outcomes", settings)
        return asyncio.run(rebuild(broker, url, default_streams(), restart=restart, on_progress=show))
