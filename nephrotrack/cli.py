"""``nephrotrack``: run the stack, migrate databases, load the demo study, rebuild projections."""

from __future__ import annotations

import typer

from shared.database import migrate as migrate_database
from shared.settings import SERVICES, database_url

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.command()
def run() -> None:
    """Start the embedded NATS (unless NATS_URL is set) and all five services; Ctrl-C stops.
    Every port is checked first; where the stack listens is recorded in <var>/runtime.json."""
    from nephrotrack.runtime import Supervisor

    raise typer.Exit(Supervisor().run())


@app.command()
def cluster() -> None:
    """The three-node NATS cluster (streams in three replicas) and two replicas of each service, as
    local processes: no Docker needed. Ctrl-C stops everything (deploy/README.md)."""
    from nephrotrack.cluster import ClusterSupervisor

    raise typer.Exit(ClusterSupervisor().run())


@app.command()
def migrate(service: list[str] = typer.Argument(None, help="services to migrate (default: all)")) -> None:
    """Create or upgrade each service's database schema (Alembic)."""
    for name in service or SERVICES:
        if name not in SERVICES:
            raise typer.BadParameter(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
        migrate_database(name, database_url(name))
        typer.echo(f"{name}: migrated")


@app.command()
def demo(timeout: float = typer.Option(120.0, help="seconds to wait for the outcomes service to show the cohort")) -> None:
    """Send the seed study through the running stack's public interfaces and print the cohort table."""
    from nephrotrack.demo import DemoError, run_demo

    try:
        run_demo(timeout=timeout)
    except DemoError as exc:
        typer.secho(f"demo failed: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command()
def rebuild(restart: bool = typer.Option(False, help="discard an interrupted rebuild instead of resuming it")) -> None:
    """Replay the JetStream log into a fresh outcomes projection, then swap it in (blue/green)."""
    from nephrotrack.rebuild import run_rebuild
    from services.outcomes.rebuild.lease import RebuildError
    from shared.service import tune_garbage_collector

    tune_garbage_collector()
    try:
        done = run_rebuild(restart=restart)
    except RebuildError as exc:
        typer.secho(f"rebuild failed: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.secho("rebuild interrupted; run `nephrotrack rebuild` again to resume it", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    typer.echo(
        f"outcomes projection rebuilt: generation {done.generation} is live "
        f"({done.applied:,} events in {done.elapsed_seconds:.1f} s, {done.events_per_second:,.0f} events/s)"
    )


if __name__ == "__main__":
    app()
