"""`atelier serve | generate | models | keys | train` — the command line.

`serve` runs the server; `generate` and `models` are HTTP clients of it (ATELIER_URL,
ATELIER_API_KEY); `keys` and `train` work on the local registry (ATELIER_HOME) directly,
so an operator who lost the admin key can still mint one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

from atelier.config import Settings, get_settings

app = typer.Typer(help="Atelier: creative models as a service.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="List and inspect models (through the server).", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys (in the local registry).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)


def _settings(**overrides) -> Settings:
    base = get_settings()
    return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _client(settings: Settings) -> httpx.Client:
    if not settings.api_key:
        err.print("[red]set ATELIER_API_KEY (or pass --api-key) to talk to the server[/red]")
        raise typer.Exit(2)
    return httpx.Client(base_url=settings.url, headers={"Authorization": f"Bearer {settings.api_key}"},
                        timeout=httpx.Timeout(10.0, read=300.0))


def _fail(resp: httpx.Response) -> None:
    try:
        e = resp.json()["error"]
        msg = f"{e['message']}" + (f" (param: {e['param']})" if e.get("param") else "")
    except Exception:  # noqa: BLE001 — not our error shape; show the raw text
        msg = resp.text[:500]
    err.print(f"[red]error {resp.status_code}:[/red] {msg}")
    raise typer.Exit(1)


# -- serve ------------------------------------------------------------------------------


@app.command()
def serve(host: Annotated[Optional[str], typer.Option(help="bind address [ATELIER_HOST]")] = None,
          port: Annotated[Optional[int], typer.Option(help="port [ATELIER_PORT]")] = None,
          home: Annotated[Optional[Path], typer.Option(help="data folder [ATELIER_HOME]")] = None):
    """Run the server (API, studio, metrics) until interrupted."""
    import logging

    import uvicorn

    from atelier.api.app import create_app

    settings = _settings(host=host, port=port, home=home)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    application = create_app(settings)
    if application.state.new_admin_secret and not settings.admin_key:
        console.print(f"[bold]Admin API key[/bold] (shown once, only its hash is stored):\n"
                      f"  {application.state.new_admin_secret}\n  export ATELIER_API_KEY={application.state.new_admin_secret}")
    console.print(f"Atelier on http://{settings.host}:{settings.port}  (data: {settings.home_dir})")
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=settings.log_level)


# -- generate ---------------------------------------------------------------------------


@app.command()
def generate(prompt: Annotated[str, typer.Argument(help="opening of a poem, e.g. 床前明月光，")],
             model: Annotated[str, typer.Option(help="name, name:alias or name@version")] = "tang-poet",
             max_tokens: Annotated[int, typer.Option(help="characters to generate at most")] = 64,
             temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
             top_p: Annotated[float, typer.Option()] = 1.0,
             top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
             seed: Annotated[Optional[int], typer.Option(help="same seed, same text")] = None,
             stop: Annotated[Optional[list[str]], typer.Option(help="stop sequence (repeatable)")] = None,
             url: Annotated[Optional[str], typer.Option(help="[ATELIER_URL]")] = None,
             api_key: Annotated[Optional[str], typer.Option(help="[ATELIER_API_KEY]")] = None):
    """Stream a continuation of PROMPT to the terminal."""
    settings = _settings(url=url, api_key=api_key)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "seed": seed, "stop": stop or None, "stream": True}
    with _client(settings) as client, client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            _fail(resp)
        sys.stdout.write(prompt)
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                err.print(f"\n[red]{chunk['error']['message']}[/red]")
                raise typer.Exit(1)
            for choice in chunk.get("choices", []):
                sys.stdout.write(choice.get("text", ""))
                sys.stdout.flush()
        sys.stdout.write("\n")


# -- models -----------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@models_app.command("list")
def models_list(url: Annotated[Optional[str], typer.Option()] = None,
                api_key: Annotated[Optional[str], typer.Option()] = None,
                as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """Models with their versions, aliases, sizes and metrics."""
    settings = _settings(url=url, api_key=api_key)
    with _client(settings) as client:
        resp = client.get("/v1/models")
    if resp.status_code != 200:
        _fail(resp)
    data = resp.json()["data"]
    if as_json:
        console.print_json(data=data)
        return
    table = Table(title="Models")
    for col in ("model", "version", "aliases", "family", "task", "size", "metrics"):
        table.add_column(col)
    for m in data:
        for v in m["versions"]:
            aliases = ", ".join(a for a, n in m["aliases"].items() if n == v["version"])
            metrics = ", ".join(f"{k}={v['metrics'][k]:.3f}" for k in ("val_loss", "val_ppl") if k in v["metrics"])
            table.add_row(m["id"], str(v["version"]), aliases, m["family"], m["task"], _size(v["size_bytes"]), metrics)
    console.print(table)


@models_app.command("show")
def models_show(model: str, url: Annotated[Optional[str], typer.Option()] = None,
                api_key: Annotated[Optional[str], typer.Option()] = None):
    """One model (name, name:alias or name@version) as JSON."""
    settings = _settings(url=url, api_key=api_key)
    with _client(settings) as client:
        resp = client.get(f"/v1/models/{model}")
    if resp.status_code != 200:
        _fail(resp)
    console.print_json(data=resp.json())


# -- keys -------------------------------------------------------------------------------


def _local_db(home: Optional[Path]):
    from atelier.registry.db import make_engine, make_sessionmaker

    settings = _settings(home=home)
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    return make_sessionmaker(make_engine(settings.db_url))()


@keys_app.command("create")
def keys_create(scopes: Annotated[list[str], typer.Option("--scope", help="admin | generate | train | read")] = ["generate"],  # noqa: B006
                name: Annotated[str, typer.Option()] = "",
                home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None):
    """Create a key and print its secret (shown once)."""
    from atelier.safety import audit
    from atelier.safety.keys import create_key

    with _local_db(home) as db:
        try:
            key, secret = create_key(db, name=name, scopes=scopes)
        except ValueError as e:
            err.print(f"[red]{e}[/red]")
            raise typer.Exit(2)
        audit.record(db, action="key.create", target=key.id, detail={"scopes": key.scopes, "via": "cli"})
    console.print(f"{key.id}  scopes={','.join(key.scopes)}\n{secret}")


@keys_app.command("list")
def keys_list(home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None):
    """Every key: id, name, prefix, scopes, created, revoked."""
    from atelier.safety.keys import list_keys

    table = Table(title="API keys")
    for col in ("id", "name", "prefix", "scopes", "created", "revoked"):
        table.add_column(col)
    with _local_db(home) as db:
        for k in list_keys(db):
            table.add_row(k.id, k.name, k.prefix + "…", ",".join(k.scopes), f"{k.created_at:%Y-%m-%d %H:%M}",
                          f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None):
    """Revoke a key by id; it stops working at once."""
    from atelier.safety import audit
    from atelier.safety.keys import revoke_key

    with _local_db(home) as db:
        try:
            revoke_key(db, key_id=key_id)
        except LookupError as e:
            err.print(f"[red]{e}[/red]")
            raise typer.Exit(1)
        audit.record(db, action="key.revoke", target=key_id, detail={"via": "cli"})
    console.print(f"revoked {key_id}")


# -- train ------------------------------------------------------------------------------


@app.command()
def train(data: Annotated[Path, typer.Option(help="poetry folder (tang.jsonl + songci.jsonl), .txt or .jsonl")],
          name: Annotated[str, typer.Option(help="model name to register the result under")],
          workdir: Annotated[Optional[Path], typer.Option(help="checkpoints; rerun to resume [runs/<name>]")] = None,
          context: Annotated[int, typer.Option(help="context length (characters)")] = 192,
          n_embd: Annotated[int, typer.Option()] = 192,
          n_layer: Annotated[int, typer.Option()] = 6,
          n_head: Annotated[int, typer.Option()] = 6,
          dropout: Annotated[float, typer.Option()] = 0.0,
          min_count: Annotated[int, typer.Option(help="drop characters seen fewer times (→ <unk>)")] = 1,
          steps: Annotated[int, typer.Option(help="maximum optimiser steps")] = 2000,
          batch_size: Annotated[int, typer.Option()] = 20,
          lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-3,
          optimizer: Annotated[str, typer.Option(help="adamw | sgd")] = "adamw",
          schedule: Annotated[str, typer.Option(help="cosine | linear | constant")] = "cosine",
          warmup: Annotated[int, typer.Option(help="warm-up steps")] = 100,
          grad_clip: Annotated[float, typer.Option(help="0 = off")] = 1.0,
          precision: Annotated[str, typer.Option(help="fp32 | bf16 (autocast)")] = "fp32",
          eval_every: Annotated[int, typer.Option()] = 200,
          patience: Annotated[int, typer.Option(help="evaluations without improvement before stopping")] = 4,
          max_minutes: Annotated[Optional[float], typer.Option(help="wall-time budget")] = None,
          seed: Annotated[int, typer.Option()] = 1337,
          threads: Annotated[Optional[int], typer.Option(help="torch threads")] = None,
          register: Annotated[bool, typer.Option(help="register the result in ATELIER_HOME")] = True,
          home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None):
    """Train a chargpt model (progress bar, eval, early stop, resumable) and register it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from atelier.training.run import train_chargpt
    from atelier.training.trainer import TrainConfig

    try:
        cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
                          warmup_steps=warmup, grad_clip=grad_clip, precision=precision, eval_every=eval_every,
                          patience=patience, max_minutes=max_minutes, seed=seed)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    workdir = workdir or Path("runs") / name
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task("training", total=steps, info="")

        def on_event(e: dict) -> None:
            kind = e["type"]
            if kind == "train":
                progress.update(task, completed=e["step"],
                                info=f"loss {e['loss']:.3f} · {e['tokens_per_s']:.0f} tok/s · lr {e['lr']:.2e}")
            elif kind == "resumed":
                progress.update(task, completed=e["step"])
                progress.console.print(f"resumed from step {e['step']} ({e['path']})")
            elif kind == "eval":
                progress.console.print(f"step {e['step']}: val loss {e['val_loss']:.4f} (ppl {e['val_ppl']:.1f})"
                                       + ("  ★ best" if e["improved"] else ""))
            elif kind == "early_stop":
                progress.console.print(f"early stop at step {e['step']}; best step {e['best_step']}")

        best = train_chargpt(data, workdir, dict(n_positions=context, n_embd=n_embd, n_layer=n_layer,
                                                 n_head=n_head, dropout=dropout),
                             cfg, min_count=min_count, threads=threads, on_event=on_event)
    record = json.loads((best / "training.json").read_text())
    console.print(f"best weights: {best}  val loss {record['metrics']['val_loss']:.4f}")
    if register:
        from atelier.registry.store import BlobStore, register_version

        settings = _settings(home=home)
        with _local_db(home) as db:
            v = register_version(db, BlobStore(settings.blobs_dir), name=name, family="chargpt",
                                 task="text-generation", folder=best, metrics=record["metrics"], training=record)
            console.print(f"registered {name}@{v.number} (alias latest) in {settings.home_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
