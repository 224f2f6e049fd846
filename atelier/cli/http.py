"""The one place the CLI talks HTTP: settings, the authenticated client, error printing, `call`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn, Optional

import httpx
import typer
from rich.console import Console

from atelier.config import Settings, get_settings

console = Console()
err = Console(stderr=True)  # errors go to stderr so stdout stays pipeable (generated text, JSON)

UrlOpt = Annotated[Optional[str], typer.Option("--url", help="[ATELIER_URL]")]
KeyOpt = Annotated[Optional[str], typer.Option("--api-key", help="[ATELIER_API_KEY]")]


def _settings(**overrides) -> Settings:
    """The environment's settings, with the command-line options that were given laid over them."""
    base = get_settings()
    return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def client(settings: Settings) -> httpx.Client:
    if not settings.api_key:
        err.print("[red]set ATELIER_API_KEY (or pass --api-key) to talk to the server[/red]")
        raise typer.Exit(2)
    # Generation and training uploads can take minutes: a short connect timeout, a long read one.
    return httpx.Client(base_url=settings.url, headers={"Authorization": f"Bearer {settings.api_key}"},
                        timeout=httpx.Timeout(10.0, read=300.0))


def fail(resp: httpx.Response) -> NoReturn:
    """Print the server's error (message and param) in red and exit 1."""
    try:
        e = resp.json()["error"]
        msg = f"{e['message']}" + (f" (param: {e['param']})" if e.get("param") else "")
    except Exception:  # noqa: BLE001 — not our error shape; show the raw text
        msg = resp.text[:500]
    err.print(f"[red]error {resp.status_code}:[/red] {msg}")
    raise typer.Exit(1)


def _unreachable(settings: Settings, e: Exception) -> NoReturn:
    err.print(f"[red]cannot reach the server at {settings.url}: {e}[/red] (is `atelier serve` running?)")
    raise typer.Exit(1) from None


def call(method: str, path: str, url: Optional[str], api_key: Optional[str], **kw) -> httpx.Response:
    """One request; a server error or an unreachable server ends the command with a readable message."""
    settings = _settings(url=url, api_key=api_key)
    try:
        with client(settings) as c:
            resp = c.request(method, path, **kw)
    except httpx.TransportError as e:
        _unreachable(settings, e)
    if resp.status_code >= 400:
        fail(resp)
    return resp


@contextmanager
def stream(method: str, path: str, url: Optional[str], api_key: Optional[str], **kw) -> Iterator[httpx.Response]:
    """`call` for streamed responses (server-sent events): yields the open response once its status is OK."""
    settings = _settings(url=url, api_key=api_key)
    try:
        with client(settings) as c, c.stream(method, path, **kw) as resp:
            if resp.status_code >= 400:
                resp.read()  # the error body is JSON, not a stream
                fail(resp)
            yield resp
    except httpx.TransportError as e:
        _unreachable(settings, e)
