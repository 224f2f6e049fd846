"""`atelier serve`: run the server (API, studio, metrics) in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from atelier.cli.http import _settings, console, err


def serve(host: Annotated[Optional[str], typer.Option(help="bind address [ATELIER_HOST]")] = None,
          port: Annotated[Optional[int], typer.Option(help="port [ATELIER_PORT]")] = None,
          home: Annotated[Optional[Path], typer.Option(help="data folder [ATELIER_HOME]")] = None):
    """Run the server (API, studio, metrics) until interrupted."""
    import logging

    import uvicorn

    from atelier.api.app import create_app

    settings = _settings(host=host, port=port, home=home)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from atelier.safety.redact import RedactingFilter

    for handler in logging.getLogger().handlers:  # Atelier's own log lines: no personal data either
        handler.addFilter(RedactingFilter())
    from atelier.storage.db import DatabaseUnreachable

    try:
        application = create_app(settings)
    except DatabaseUnreachable as e:  # exit status 3: start it (or fix the URL) and start Atelier again
        err.print(f"[red]cannot start: {e}[/red]")
        raise typer.Exit(3)
    except ValueError as e:  # a data key that does not open the store, a malformed key, …
        err.print(f"[red]cannot start: {e}[/red]")
        raise typer.Exit(2)
    if application.state.new_admin_secret and not settings.admin_key:
        console.print(f"[bold]Admin API key[/bold] (shown once, only its hash is stored):\n"
                      f"  {application.state.new_admin_secret}\n  export ATELIER_API_KEY={application.state.new_admin_secret}")
    console.print(f"Atelier on http://{settings.host}:{settings.port}  (data: {settings.home_dir})")
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=redacted_log_config())


def redacted_log_config() -> dict:
    """uvicorn's logging, with every handler redacting personal data (request lines carry query strings)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": "atelier.safety.redact.RedactingFilter"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    return config
