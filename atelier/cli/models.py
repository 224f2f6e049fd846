"""`atelier models`: list, inspect, promote, roll back, quantize, delete, export, import, load and unload models on the
server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress
from rich.table import Table

from atelier.cli.http import KeyOpt, UrlOpt, call, console, err

app = typer.Typer(help="List, inspect, publish and load models (through the server).", no_args_is_help=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@app.command("list")
def models_list(url: UrlOpt = None, api_key: KeyOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """Models with their versions, aliases, sizes and metrics."""
    data = call("GET", "/v1/models", url, api_key).json()["data"]
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


@app.command("show")
def models_show(model: str, url: UrlOpt = None, api_key: KeyOpt = None):
    """One model (name, name:alias or name@version) as JSON."""
    console.print_json(data=call("GET", f"/v1/models/{model}", url, api_key).json())


@app.command("promote")
def models_promote(ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
                   alias: Annotated[str, typer.Option(help="alias to move")] = "production",
                   url: UrlOpt = None, api_key: KeyOpt = None):
    """Point an alias (default production) at a version."""
    name, _, number = ref.partition("@")
    if not number.isdigit():  # an alias must name a fixed version, never another alias
        err.print("[red]give the version as NAME@VERSION, e.g. tang-poet@2[/red]")
        raise typer.Exit(2)
    call("POST", f"/api/models/{name}/aliases", url, api_key, json={"alias": alias, "version": int(number)})
    console.print(f"{name}:{alias} → {ref}")


@app.command("rollback")
def models_rollback(name: str, alias: Annotated[str, typer.Option()] = "production",
                    url: UrlOpt = None, api_key: KeyOpt = None):
    """Move an alias back to the previous version."""
    out = call("POST", f"/api/models/{name}/rollback", url, api_key, json={"alias": alias}).json()
    console.print(f"{name}:{alias} → {name}@{out['aliases'][alias]}")


@app.command("quantize")
def models_quantize(ref: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME:ALIAS)")],
                    method: Annotated[str, typer.Option(help="int8: weight-only, one scale per row")] = "int8",
                    alias: Annotated[str, typer.Option(help="alias the new version gets")] = "int8",
                    url: UrlOpt = None, api_key: KeyOpt = None):
    """Make a new version with quantized weights; the source version is left as it is."""
    out = call("POST", f"/api/models/{ref}/quantize", url, api_key, json={"method": method, "alias": alias}).json()
    name = out["id"].split("@")[0]
    console.print(f"{out['id']} ({name}:{out['alias']}): {out['method']} from {out['quantized_from']}, "
                  f"{_size(out['size_bytes'])} (was {_size(out['source_size_bytes'])})")


@app.command("delete")
def models_delete(ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
                  force: Annotated[bool, typer.Option(help="also remove aliases pointing at it")] = False,
                  url: UrlOpt = None, api_key: KeyOpt = None):
    """Delete a version."""
    call("DELETE", f"/api/models/{ref}", url, api_key, params={"force": force})
    console.print(f"deleted {ref}")


@app.command("export")
def models_export(ref: str, output: Annotated[Path, typer.Option("-o", "--output", help="archive (.zip) or folder (hf)")],
                  fmt: Annotated[str, typer.Option("--format", help="atelier (zip + manifest) | hf (GPT-2 folder)")] = "atelier",
                  url: UrlOpt = None, api_key: KeyOpt = None):
    """Export a version as one verified archive, or (chargpt) as a Hugging Face GPT-2 folder."""
    import io
    import zipfile

    if fmt not in ("atelier", "hf"):
        err.print(f"[red]--format {fmt!r} is not one of atelier, hf[/red]")
        raise typer.Exit(2)
    data = call("GET", f"/api/models/{ref}/export", url, api_key).content
    if fmt == "atelier":
        from atelier.common.files import atomic_write_bytes

        atomic_write_bytes(output, data)  # never a half-written archive that `import` would reject later
    else:
        # The hf folder is the archive's payload unpacked; the manifest says which files belong to it.
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            manifest = json.loads(z.read("manifest.json"))
            if manifest["family"] != "chargpt":
                err.print(f"[red]{ref} is a {manifest['family']} model; only chargpt exports to Hugging Face[/red]")
                raise typer.Exit(2)
            output.mkdir(parents=True, exist_ok=True)
            for name in manifest["files"]:
                (output / name).write_bytes(z.read(name))
        # Versions registered before the tokenizer was saved in the tokenizers format: rewrite it, so
        # AutoTokenizer.from_pretrained reads the folder too.
        from atelier.models.tokenizer import CharTokenizer

        CharTokenizer.load(output / "tokenizer.json").save(output / "tokenizer.json")
    console.print(f"exported {ref} to {output}")


@app.command("import")
def models_import(path: Annotated[Path, typer.Argument(help="a model folder (transformers causal LM, diffusers "
                                                            "pipeline), an .onnx file, or an exported .zip")],
                  name: Annotated[Optional[str], typer.Option(help="register under this name")] = None,
                  url: UrlOpt = None, api_key: KeyOpt = None):
    """Register a model you bring (or an exported archive) as a new version; the server checks it by loading it."""
    if not path.exists():
        err.print(f"[red]{path} does not exist[/red]")
        raise typer.Exit(2)
    if path.is_dir():
        data, filename = _zip_folder(path), f"{path.name}.zip"
    else:
        data, filename = path.read_bytes(), path.name
    out = call("POST", "/api/models/import", url, api_key, files={"file": (filename, data)},
               data={"name": name} if name else {}, timeout=600).json()
    console.print(f"imported {out['latest']['ref']} ({out['family']}, {out['task']})")


def _zip_folder(folder: Path) -> bytes:
    """The folder's files (subfolders kept, hidden files and links left out) as one zip, in memory."""
    import io
    import zipfile

    buf = io.BytesIO()
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    with Progress() as progress, zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        task = progress.add_task(f"packing {folder.name}", total=sum(p.stat().st_size for p in files))
        for p in files:
            z.write(p, p.relative_to(folder).as_posix())
            progress.advance(task, p.stat().st_size)
    return buf.getvalue()


@app.command("load")
def models_load(ref: Annotated[str, typer.Argument(help="name, name:alias or name@version")],
                keep_alive: Annotated[Optional[str], typer.Option(help="how long it stays loaded once idle: "
                                                                  "5m, 1h, 0 (unload when idle), -1 (forever) "
                                                                  "[server default]")] = None,
                url: UrlOpt = None, api_key: KeyOpt = None):
    """Load a model into the server's memory now, so the first request does not wait for it."""
    # keep_alive is left out when not given so that the server's own default applies.
    call("POST", f"/api/models/{ref}/load", url, api_key,
         json={"keep_alive": keep_alive} if keep_alive is not None else {})
    console.print(f"loaded {ref}")


@app.command("unload")
def models_unload(ref: Annotated[str, typer.Argument(help="name, name:alias or name@version")],
                  url: UrlOpt = None, api_key: KeyOpt = None):
    """Free a loaded model's memory on the server (it loads again on its next request)."""
    out = call("POST", f"/api/models/{ref}/unload", url, api_key).json()
    console.print(f"unloaded {ref}" if out.get("unloaded") else f"{ref} was not loaded")
