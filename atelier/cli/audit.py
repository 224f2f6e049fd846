"""`atelier audit verify`: check the audit chain and its signed head in the local registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from atelier.cli.http import console, err
from atelier.cli.keys import _local_db

app = typer.Typer(help="The tamper-evident audit log (in the local registry).", no_args_is_help=True)


@app.command("verify")
def audit_verify(home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None):
    """Recompute every entry's MAC and check the signed head; exit 1 naming the first bad entry."""
    from atelier.storage import audit

    with _local_db(home) as db:
        result = audit.verify(db)
    if result["ok"]:
        console.print(f"audit chain ok: {result['entries']} entries")
        return
    err.print(f"[red]audit chain broken at entry {result['first_bad_id']}: {result['reason']}[/red]")
    raise typer.Exit(1)
