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
jobs_app = typer.Typer(help="Training jobs on the server: list, show, follow, cancel.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
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


def _call(method: str, path: str, url, api_key, **kw) -> httpx.Response:
    settings = _settings(url=url, api_key=api_key)
    try:
        with _client(settings) as client:
            resp = client.request(method, path, **kw)
    except httpx.TransportError as e:
        err.print(f"[red]cannot reach the server at {settings.url}: {e}[/red] (is `atelier serve` running?)")
        raise typer.Exit(1) from None
    if resp.status_code >= 400:
        _fail(resp)
    return resp


UrlOpt = Annotated[Optional[str], typer.Option("--url", help="[ATELIER_URL]")]
KeyOpt = Annotated[Optional[str], typer.Option("--api-key", help="[ATELIER_API_KEY]")]


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
    try:
        application = create_app(settings)
    except ValueError as e:  # a data key that does not open the store, a malformed key, …
        err.print(f"[red]cannot start: {e}[/red]")
        raise typer.Exit(2)
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


# -- poem -------------------------------------------------------------------------------


@app.command()
def poem(form: Annotated[Optional[str], typer.Option(help="wujue | qijue | wulv | qilv | ci:<tune>, e.g. ci:浣溪沙")] = None,
         acrostic: Annotated[Optional[str], typer.Option(help="藏头: first character of each line")] = None,
         title: Annotated[Optional[str], typer.Option()] = None,
         keywords: Annotated[Optional[str], typer.Option(help="theme characters")] = None,
         rhyme: Annotated[str, typer.Option(help="平水韵 group such as 一东, or auto")] = "auto",
         scheme: Annotated[str, typer.Option("--rhyme-scheme", help="pingshui | xinyun")] = "pingshui",
         script: Annotated[str, typer.Option(help="simplified | traditional")] = "simplified",
         seed: Annotated[Optional[int], typer.Option()] = None,
         n: Annotated[int, typer.Option(help="how many poems")] = 1,
         check: Annotated[Optional[str], typer.Option("--check", help="check this poem instead of writing one")] = None,
         model: Annotated[str, typer.Option()] = "tang-poet",
         url: UrlOpt = None, api_key: KeyOpt = None):
    """Write poems that obey a classical form (or --check one), with a compliance report."""
    if check is not None:
        report = _call("POST", "/api/poems/check", url, api_key,
                       json={"text": check, "form": form, "rhyme_scheme": scheme, "model": model}).json()
        _print_report(report)
        raise typer.Exit(0 if report["compliant"] else 1)
    if form is None:
        err.print("[red]--form is required to write a poem (wujue, qijue, wulv, qilv, ci:<tune>)[/red]")
        raise typer.Exit(2)
    body = {"form": form, "acrostic": acrostic, "title": title, "keywords": keywords, "rhyme": rhyme,
            "rhyme_scheme": scheme, "script": script, "seed": seed, "n": n, "model": model}
    out = _call("POST", "/api/poems", url, api_key, json={k: v for k, v in body.items() if v is not None}).json()
    for p in out["poems"]:
        console.print(f"[bold]{p['title']}[/bold]  ({p['pattern']}, {p['rhyme_group']}, seed {p['seed']})")
        console.print(p["text"])
        _print_report(p["report"])


def _print_report(report: dict) -> None:
    if report["compliant"]:
        console.print(f"[green]compliant[/green]: {report['pattern']}, rhyme {report['rhyme_group']}\n")
        return
    console.print(f"[red]{len(report['violations'])} violation(s)[/red] against {report['pattern']}:")
    for v in report["violations"]:
        hint = f"  (try {'、'.join(v['suggestions'])})" if v.get("suggestions") else ""
        console.print(f"  {v['message']}{hint}")


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




@models_app.command("promote")
def models_promote(ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
                   alias: Annotated[str, typer.Option(help="alias to move")] = "production",
                   url: UrlOpt = None, api_key: KeyOpt = None):
    """Point an alias (default production) at a version."""
    name, _, number = ref.partition("@")
    if not number.isdigit():
        err.print("[red]give the version as NAME@VERSION, e.g. tang-poet@2[/red]")
        raise typer.Exit(2)
    _call("POST", f"/api/models/{name}/aliases", url, api_key, json={"alias": alias, "version": int(number)})
    console.print(f"{name}:{alias} → {ref}")


@models_app.command("rollback")
def models_rollback(name: str, alias: Annotated[str, typer.Option()] = "production",
                    url: UrlOpt = None, api_key: KeyOpt = None):
    """Move an alias back to the previous version."""
    out = _call("POST", f"/api/models/{name}/rollback", url, api_key, json={"alias": alias}).json()
    console.print(f"{name}:{alias} → {name}@{out['aliases'][alias]}")


@models_app.command("delete")
def models_delete(ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
                  force: Annotated[bool, typer.Option(help="also remove aliases pointing at it")] = False,
                  url: UrlOpt = None, api_key: KeyOpt = None):
    """Delete a version."""
    _call("DELETE", f"/api/models/{ref}", url, api_key, params={"force": force})
    console.print(f"deleted {ref}")


@models_app.command("export")
def models_export(ref: str, output: Annotated[Path, typer.Option("-o", "--output", help="archive (.zip) or folder (hf)")],
                  fmt: Annotated[str, typer.Option("--format", help="atelier (zip + manifest) | hf (GPT-2 folder)")] = "atelier",
                  url: UrlOpt = None, api_key: KeyOpt = None):
    """Export a version as one verified archive, or (chargpt) as a Hugging Face GPT-2 folder."""
    import io
    import zipfile

    if fmt not in ("atelier", "hf"):
        err.print(f"[red]--format {fmt!r} is not one of atelier, hf[/red]")
        raise typer.Exit(2)
    data = _call("GET", f"/api/models/{ref}/export", url, api_key).content
    if fmt == "atelier":
        from atelier.common.files import atomic_write_bytes

        atomic_write_bytes(output, data)
    else:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            manifest = json.loads(z.read("manifest.json"))
            if manifest["family"] != "chargpt":
                err.print(f"[red]{ref} is a {manifest['family']} model; only chargpt exports to Hugging Face[/red]")
                raise typer.Exit(2)
            output.mkdir(parents=True, exist_ok=True)
            for name in manifest["files"]:
                (output / name).write_bytes(z.read(name))
    console.print(f"exported {ref} to {output}")


@models_app.command("import")
def models_import(archive: Path, name: Annotated[Optional[str], typer.Option(help="register under this name")] = None,
                  url: UrlOpt = None, api_key: KeyOpt = None):
    """Import an exported archive as a new version (verified; safetensors/JSON only)."""
    with open(archive, "rb") as f:
        out = _call("POST", "/api/models/import", url, api_key, files={"file": (archive.name, f)},
                    data={"name": name} if name else {}).json()
    console.print(f"imported {out['latest']['ref']}")


# -- jobs -------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(url: UrlOpt = None, api_key: KeyOpt = None):
    """Recent jobs."""
    data = _call("GET", "/v1/fine_tuning/jobs", url, api_key, params={"limit": 50}).json()["data"]
    table = Table(title="Jobs")
    for col in ("id", "status", "model", "fine_tuned_model", "attempts"):
        table.add_column(col)
    for j in data:
        table.add_row(j["id"], j["status"], j["model"], j["fine_tuned_model"] or "", str(j["attempts"]))
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None):
    """One job as JSON."""
    console.print_json(data=_call("GET", f"/v1/fine_tuning/jobs/{job_id}", url, api_key).json())


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None):
    """Cancel a queued or running job."""
    _call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", url, api_key)
    console.print(f"cancelled {job_id}")


@jobs_app.command("follow")
def jobs_follow(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None):
    """A progress bar fed by the job's events, until it ends."""
    follow(job_id, _settings(url=url, api_key=api_key))


def _progress():
    """The progress bar of every long CLI command: description, bar, step/total, info, times."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _training_events(progress, task):
    """A local trainer's events → the progress bar (train steps) and printed lines (the rest)."""
    def on_event(e: dict) -> None:
        kind = e["type"]
        if kind == "train":
            rate = f"{e['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in e else f"{e['images_per_s']:.0f} img/s"
            progress.update(task, completed=e["step"], info=f"loss {e['loss']:.4f} · {rate} · lr {e['lr']:.2e}")
        elif kind == "resumed":
            progress.update(task, completed=e["step"])
            progress.console.print(f"resumed from step {e['step']} ({e['path']})")
        elif kind == "eval":
            score = (f"val loss {e['val_loss']:.4f} (ppl {e['val_ppl']:.1f})" if "val_ppl" in e
                     else ", ".join(f"{k} {v:.4f}" for k, v in e.items() if isinstance(v, float)))
            progress.console.print(f"step {e['step']}: {score}" + ("  ★ best" if e["improved"] else ""))
        elif kind == "early_stop":
            progress.console.print(f"early stop at step {e['step']}; best step {e['best_step']}")

    return on_event


def follow(job_id: str, settings: Settings) -> dict:
    import time

    progress = _progress()
    after = None
    with _client(settings) as client, progress:
        task = progress.add_task(job_id, total=None, info="")
        while True:
            params = {"order": "asc", "limit": 500} | ({"after": after} if after else {})
            events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
            if events.status_code != 200:
                _fail(events)
            for e in events.json()["data"]:
                after = e["id"]
                d = e["data"]
                if "train_loss" in d:
                    rate = (f"{d['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in d
                            else f"{d.get('images_per_s', 0):.1f} img/s")
                    progress.update(task, total=d["total_steps"], completed=d["step"],
                                    info=f"loss {d['train_loss']:.3f} · {rate} · lr {d['lr']:.2e}")
                else:
                    progress.console.print(e["message"])
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled") and not events.json()["has_more"]:
                break
            time.sleep(0.5)
    color = {"succeeded": "green", "failed": "red"}.get(job["status"], "yellow")
    console.print(f"[{color}]{job_id} {job['status']}[/{color}]" +
                  (f": {job['fine_tuned_model']}" if job["fine_tuned_model"] else "") +
                  (f": {job['error']['message']}" if job.get("error") else ""))
    return job


# -- keys -------------------------------------------------------------------------------


def _local_db(home: Optional[Path]):
    from atelier.storage.db import make_engine, make_sessionmaker

    settings = _settings(home=home)
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    return make_sessionmaker(make_engine(settings.db_url))()


@keys_app.command("create")
def keys_create(scopes: Annotated[list[str], typer.Option("--scope", help="admin | generate | train | read")] = ["generate"],  # noqa: B006
                name: Annotated[str, typer.Option()] = "",
                home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None):
    """Create a key and print its secret (shown once)."""
    from atelier.storage import audit
    from atelier.storage.keys import create_key

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
    from atelier.storage.keys import list_keys

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


# -- train ------------------------------------------------------------------------------


@app.command()
def train(data: Annotated[Path, typer.Option(help="chargpt: poetry folder (tang.jsonl + songci.jsonl), .txt or "
                                                  ".jsonl; images: the emoji folder or an .npz")],
          name: Annotated[str, typer.Option(help="model name to register the result under")],
          family: Annotated[str, typer.Option(help="chargpt | ddpm | dcgan | upscaler")] = "chargpt",
          workdir: Annotated[Optional[Path], typer.Option(help="checkpoints; rerun to resume [runs/<name>]")] = None,
          context: Annotated[int, typer.Option(help="context length (characters)")] = 192,
          n_embd: Annotated[int, typer.Option()] = 192,
          n_layer: Annotated[int, typer.Option()] = 6,
          n_head: Annotated[int, typer.Option()] = 6,
          dropout: Annotated[float, typer.Option()] = 0.0,
          min_count: Annotated[int, typer.Option(help="drop characters seen fewer times (→ <unk>)")] = 1,
          steps: Annotated[int, typer.Option(help="maximum optimiser steps")] = 2000,
          batch_size: Annotated[int, typer.Option()] = 20,
          lr: Annotated[Optional[float], typer.Option(help="peak learning rate [chargpt 2e-3 (3e-4 with --base), "
                                                           "ddpm 8e-4, dcgan 2e-4, upscaler 1e-3]")] = None,
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
          home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None,
          follow_job: Annotated[bool, typer.Option("--follow", help="run as a job on the server and follow it")] = False,
          base: Annotated[Optional[str], typer.Option(help="with --follow: fine-tune this model instead")] = None,
          base_channels: Annotated[int, typer.Option(help="ddpm: UNet width")] = 32,
          text_from: Annotated[Optional[Path], typer.Option(help="dcgan: a ddpm folder whose text encoder to reuse")] = None,
          attach_to: Annotated[Optional[str], typer.Option(help="upscaler: register a new version of this image "
                                                                "model (NAME or NAME@N) carrying it")] = None,
          url: UrlOpt = None, api_key: KeyOpt = None):
    """Train a model (progress bar, evaluation, checkpoints; rerun to resume) and register it.

    --family chargpt (text, early stopping), ddpm or dcgan (images), or upscaler (a ×2
    upscaler that --attach-to adds to an image model, which then serves twice its size).
    Locally by default; with --follow, the data is uploaded and trained by the server's
    job worker (from scratch, or fine-tuning --base), with this terminal following it.
    """
    if family not in ("chargpt", "ddpm", "dcgan", "upscaler"):
        err.print(f"[red]--family {family!r} is not one of chargpt, ddpm, dcgan, upscaler[/red]")
        raise typer.Exit(2)
    default_lr = {"chargpt": 3e-4 if base else 2e-3, "ddpm": 8e-4, "dcgan": 2e-4, "upscaler": 1e-3}[family]
    lr = lr or default_lr
    if follow_job:
        if data.is_dir() or family == "upscaler":
            err.print("[red]--follow uploads one file (.txt or .jsonl; .npz for ddpm/dcgan) and trains chargpt, "
                      "ddpm or dcgan[/red]")
            raise typer.Exit(2)
        hyper = {"max_steps": steps, "batch_size": batch_size, "learning_rate_multiplier": lr / default_lr,
                 "eval_every": eval_every}
        if family == "chargpt":
            hyper |= {"optimizer": optimizer, "schedule": schedule, "warmup_steps": warmup, "grad_clip": grad_clip,
                      "precision": precision, "early_stopping_patience": patience}
            if not base:
                hyper |= {"n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "context": context,
                          "min_count": min_count}
        with open(data, "rb") as f:
            up = _call("POST", "/v1/files", url, api_key, files={"file": (data.name, f)},
                       data={"purpose": "fine-tune"}).json()
        job = _call("POST", "/v1/fine_tuning/jobs", url, api_key,
                    json={"model": base or family, "training_file": up["id"], "suffix": name,
                          "hyperparameters": hyper, "seed": seed}).json()
        console.print(f"job {job['id']} queued")
        done = follow(job["id"], _settings(url=url, api_key=api_key))
        raise typer.Exit(0 if done["status"] == "succeeded" else 1)
    if family != "chargpt":
        _train_image_family(family, data=data, name=name, workdir=workdir or Path("runs") / name, steps=steps,
                            batch_size=batch_size, lr=lr, eval_every=eval_every, max_minutes=max_minutes, seed=seed,
                            threads=threads, base_channels=base_channels, text_from=text_from,
                            attach_to=attach_to, register=register, home=home)
        return
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
    with (progress := _progress()):
        on_event = _training_events(progress, progress.add_task("training", total=steps, info=""))
        best = train_chargpt(data, workdir, dict(n_positions=context, n_embd=n_embd, n_layer=n_layer,
                                                 n_head=n_head, dropout=dropout),
                             cfg, min_count=min_count, threads=threads, on_event=on_event)
    record = json.loads((best / "training.json").read_text())
    console.print(f"best weights: {best}  val loss {record['metrics']['val_loss']:.4f}")
    if register:
        from atelier.storage.blobs import open_blobs
        from atelier.storage.registry import register_version

        settings = _settings(home=home)
        with _local_db(home) as db:
            v = register_version(db, open_blobs(settings), name=name, family="chargpt",
                                 task="text-generation", folder=best, metrics=record["metrics"], training=record)
            from atelier.storage import audit

            audit.record(db, action="model.register", target=f"{name}@{v.number}", detail={"via": "cli"})
            console.print(f"registered {name}@{v.number} (alias latest) in {settings.home_dir}")


def _train_image_family(family: str, *, data: Path, name: str, workdir: Path, steps: int, batch_size: int, lr: float,
                        eval_every: int, max_minutes, seed: int, threads, base_channels: int, text_from, attach_to,
                        register: bool, home) -> None:
    """`atelier train --family ddpm|dcgan|upscaler`: the image trainers behind the same progress bar."""
    import torch

    from atelier.training.image_trainer import ImageTrainConfig, train_images
    from atelier.training.upscaler_trainer import UpscalerTrainConfig, train_upscaler

    if family == "upscaler" and register and not attach_to:
        err.print("[red]an upscaler is registered as part of an image model: pass --attach-to NAME "
                  "(or --no-register)[/red]")
        raise typer.Exit(2)
    try:
        if family == "upscaler":
            cfg = UpscalerTrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every,
                                      max_minutes=max_minutes, seed=seed)
        else:
            cfg = ImageTrainConfig(family=family, max_steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every,
                                   max_minutes=max_minutes, seed=seed, warmup_steps=200 if family == "ddpm" else 0)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    if threads:
        torch.set_num_threads(threads)
    with (progress := _progress()):
        on_event = _training_events(progress, progress.add_task(f"training {family}", total=steps, info=""))
        if family == "upscaler":
            best = train_upscaler(cfg, workdir, data=data, on_event=on_event)
        else:
            best = train_images(cfg, workdir, data=data, model_cfg={"base_channels": base_channels} if family == "ddpm"
                                else {}, text_from=text_from, on_event=on_event)
    record_file = best / ("upscaler-training.json" if family == "upscaler" else "training.json")
    record = json.loads(record_file.read_text())
    console.print(f"best weights: {best}  metrics {record['metrics']}")
    if not register:
        return
    from atelier.storage.blobs import open_blobs
    from atelier.storage.registry import register_version, resolve, version_folder
    from atelier.storage import audit

    settings = _settings(home=home)
    blobs = open_blobs(settings)
    with _local_db(home) as db:
        if family == "upscaler":  # a new version of the image model: its files plus the upscaler's
            import shutil
            import tempfile

            try:
                base_v = resolve(db, ref=attach_to)
            except Exception as e:  # noqa: BLE001 — NotFound / bad reference: say which
                err.print(f"[red]--attach-to {attach_to}: {e}[/red]")
                raise typer.Exit(2)
            if base_v.model.task != "image-generation":
                err.print(f"[red]--attach-to {attach_to}: a {base_v.model.family} model does not make images[/red]")
                raise typer.Exit(2)
            with tempfile.TemporaryDirectory() as tmp:
                src = version_folder(blobs, base_v, settings.home_dir / "versions")
                for f in src.iterdir():
                    shutil.copyfile(f, Path(tmp) / f.name)
                for f in best.iterdir():
                    shutil.copyfile(f, Path(tmp) / f.name)
                v = register_version(db, blobs, name=base_v.model.name, family=base_v.model.family,
                                     task=base_v.model.task, folder=Path(tmp), metrics=base_v.metrics,
                                     training=base_v.training | {"upscaler": record})
            target = f"{base_v.model.name}@{v.number}"
        else:
            v = register_version(db, blobs, name=name, family=family, task="image-generation", folder=best,
                                 metrics=record["metrics"], training=record)
            target = f"{name}@{v.number}"
        audit.record(db, action="model.register", target=target, detail={"via": "cli", "family": family})
        console.print(f"registered {target} (alias latest) in {settings.home_dir}")


# -- images -----------------------------------------------------------------------------


@app.command()
def image(prompt: Annotated[str, typer.Argument(help="what to draw, e.g. 'smiling cat face'")],
          output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write (n > 1: out-1.png, …)")] = Path("out.png"),
          model: Annotated[str, typer.Option(help="name, name:alias or name@version")] = "emoji-diffusion",
          n: Annotated[int, typer.Option(help="number of images")] = 1,
          size: Annotated[Optional[str], typer.Option(help="e.g. 32x32 (see `models show`)")] = None,
          seed: Annotated[Optional[int], typer.Option(help="same seed, same image")] = None,
          steps: Annotated[Optional[int], typer.Option(help="denoising steps (ddpm)")] = None,
          guidance: Annotated[Optional[float], typer.Option(help="classifier-free guidance scale (ddpm)")] = None,
          negative_prompt: Annotated[Optional[str], typer.Option(help="what to steer away from (ddpm)")] = None,
          upscaler: Annotated[Optional[str], typer.Option(help="above the native size: learned | nearest")] = None,
          url: UrlOpt = None, api_key: KeyOpt = None):
    """Generate images through the server and save them as PNG (parameters inside)."""
    import base64

    settings = _settings(url=url, api_key=api_key)
    body = {"model": model, "prompt": prompt, "n": n, "size": size, "seed": seed, "steps": steps,
            "guidance": guidance, "negative_prompt": negative_prompt, "upscaler": upscaler, "response_format": "b64_json"}
    with _client(settings) as client:
        resp = client.post("/v1/images/generations", json={k: v for k, v in body.items() if v is not None})
    if resp.status_code != 200:
        _fail(resp)
    data = resp.json()
    from atelier.common.files import atomic_write_bytes

    for i, item in enumerate(data["data"]):
        path = output if len(data["data"]) == 1 else output.with_name(f"{output.stem}-{i + 1}{output.suffix}")
        atomic_write_bytes(path, base64.b64decode(item["b64_json"]))
        console.print(f"{path}  seed {item.get('seed')}  {data['model']}"
                      + (f"  artifact {item['artifact_id']}" if item.get("artifact_id") else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
