"""`atelier keys`: create, list and revoke API keys in the local registry (works with the server down)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from atelier.cli.http import _settings, console, err

# Straight to ATELIER_HOME's database, not through the server: an operator who lost the admin key
# can still mint one.
app = typer.Typer(help="Manage API keys (in the local registry).", no_args_is_help=True)

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="[ATELIER_HOME]")]


def _local_db(home: Optional[Path]):
    """A session on ATELIER_HOME's database (created if missing); `train` registers through it too."""
    from atelier.safety.crypto import audit_mac_key
    from atelier.storage.db import make_engine, make_sessionmaker

    settings = _settings(home=home)
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    try:
        mac_key = audit_mac_key(settings)
    except ValueError as e:  # a data key that does not open this home's store
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    return make_sessionmaker(make_engine(settings.db_url), audit_key=mac_key)()


@app.command("create")
def keys_create(scopes: Annotated[list[str], typer.Option("--scope", help="admin | generate | train | read")] = ["generate"],  # noqa: B006
                name: Annotated[str, typer.Option()] = "",
                rpm: Annotated[Optional[int], typer.Option(help="requests per minute")] = None,
                tpm: Annotated[Optional[int], typer.Option(help="tokens per minute")] = None,
                images_per_day: Annotated[Optional[int], typer.Option(help="images per UTC day")] = None,
                max_parallel: Annotated[Optional[int], typer.Option(help="requests at once")] = None,
                tokens_per_month: Annotated[Optional[int], typer.Option(help="tokens per calendar month")] = None,
                moderation: Annotated[Optional[str], typer.Option(help="off | flag | block: this key's policy "
                                                                       "[ATELIER_MODERATION]")] = None,
                home: HomeOpt = None):
    """Create a key (with rate limits and quotas, if given) and print its secret (shown once)."""
    from atelier.storage import audit
    from atelier.storage.keys import create_key

    limits = {"rpm": rpm, "tpm": tpm, "images_per_day": images_per_day, "max_parallel": max_parallel,
              "tokens_per_month": tokens_per_month}
    with _local_db(home) as db:
        try:
            key, secret = create_key(db, name=name, scopes=scopes, limits=limits, moderation=moderation)
        except ValueError as e:
            err.print(f"[red]{e}[/red]")
            raise typer.Exit(2)
        audit.record(db, action="key.create", target=key.id, detail={"scopes": key.scopes, "via": "cli"})
    shown = " ".join(f"{k}={v}" for k, v in ((key.limits or {}) | ({"moderation": moderation} if moderation else {})).items())
    console.print(f"{key.id}  scopes={','.join(key.scopes)}" + (f"  {shown}" if shown else "") + f"\n{secret}")


@app.command("list")
def keys_list(home: HomeOpt = None):
    """Every key: id, name, prefix, scopes, created, revoked."""
    from atelier.storage.keys import list_keys

    table = Table(title="API keys")
    for col in ("id", "name", "prefix", "scopes", "created", "revoked"):
        table.add_column(col)
    with _local_db(home) as db:
        for k in list_keys(db):
            table.add_row(k.id, k.name, k.prefix + "…", ",".join(k.scopes), f"{k.created_at:%Y-%m-%d %H:%M}",
                          f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    console.print(table)


@app.command("revoke")
def keys_revoke(key_id: str, home: HomeOpt = None):
    """Revoke a key by id; a running server refuses it within ATELIER_LOOKUP_CACHE_S (2 s)."""
    from atelier.storage import audit
    from atelier.storage.keys import revoke_key

    with _local_db(home) as db:
        try:
            revoke_key(db, key_id=key_id)
        except LookupError as e:
            err.print(f"[red]{e}[/red]")
            raise typer.Exit(1)
        audit.record(db, action="key.revoke", target=key_id, detail={"via": "cli"})
    console.print(f"revoked {key_id}")
