"""``nephrotrack``: run the stack, migrate databases, load the demo study, rebuild projections."""

from __future__ import annotations

import typer

from shared.database import migrate as migrate_database
from shared.settings import SERVICES, database_url

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.command()
def run() -> None:
    """Start the embedded NATS (unless NATS_URL is set) and all five services; Ctrl-C stops."""
    from nephrotrack.runtime import Supervisor

    raise typer.Exit(Supervisor().run())


@app.command()
def migrate(service: list[str] = typer.Argument(None, help="services to migrate (default: all)")) -> None:
    """Create or upgrade each service's database schema (Alembic)."""
    for name in service or SERVICES:
        if name not in SERVICES:
            raise typer.BadParameter(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
        migrate_database(name, database_url(name))
        typer.echo(f"{name}: migrated")


if __name__ == "__main__":
    app()
