"""`atelier db upgrade | current`: the database's schema revision (Alembic), for operators.

The server migrates at every start, so these are for looking before a deploy, or upgrading a shared
PostgreSQL once before rolling new replicas onto it.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from atelier.cli.http import console, err

app = typer.Typer(help="The registry database's schema (migrations).", no_args_is_help=True)

DatabaseOption = Annotated[Optional[str], typer.Option("--database-url", help="[ATELIER_DATABASE_URL]")]


def _engine(database_url: str | None):
    from atelier.config import get_settings
    from atelier.storage.db import DatabaseUnreachable, make_engine, safe_url

    url = database_url or get_settings().db_url
    try:
        return make_engine(url, upgrade=False), safe_url(url)
    except DatabaseUnreachable as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(3) from None


@app.command("upgrade")
def db_upgrade(database_url: DatabaseOption = None):
    """Apply every migration the database lacks (a database from before migrations is adopted first)."""
    from atelier.storage.db import migrate

    engine, shown = _engine(database_url)
    before, after = migrate(engine)
    if before == after:
        console.print(f"{shown}: already at revision {after}")
    else:
        console.print(f"{shown}: upgraded from revision {before or 'none'} to {after}")


@app.command("current")
def db_current(database_url: DatabaseOption = None):
    """Print the database's revision and the newest one; exit 1 if the database is behind."""
    from atelier.storage.db import head_revision, revision_of

    engine, shown = _engine(database_url)
    current, head = revision_of(engine), head_revision()
    console.print(f"{shown}: revision {current or 'none'} (newest {head})")
    if current != head:
        err.print("run `atelier db upgrade` (or start the server, which upgrades it)")
        raise typer.Exit(1)
