"""`atelier poem`: write classical-form poems (or --check one, or co-write: --next) with a compliance report."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated, Optional

import typer

from atelier.cli.http import KeyOpt, UrlOpt, call, console, err


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
         after: Annotated[Optional[str], typer.Option("--next", help="co-write: suggest the line after these "
                                                       "(lines separated by commas or newlines)")] = None,
         image: Annotated[Optional[Path], typer.Option("--image", help="write about this picture (PNG, JPEG, "
                                                       "WebP, GIF): its keywords join --keywords")] = None,
         model: Annotated[str, typer.Option()] = "tang-poet",
         url: UrlOpt = None, api_key: KeyOpt = None):
    """Write poems that obey a classical form (or --check one), with a compliance report."""
    if check is not None:
        report = call("POST", "/api/poems/check", url, api_key,
                      json={"text": check, "form": form, "rhyme_scheme": scheme, "model": model}).json()
        _print_report(report)
        # The exit status is the verdict, so scripts can use `atelier poem --check` as a linter.
        raise typer.Exit(0 if report["compliant"] else 1)
    if form is None:
        err.print("[red]--form is required to write a poem (wujue, qijue, wulv, qilv, ci:<tune>)[/red]")
        raise typer.Exit(2)
    if after is not None:
        import re

        lines = [line for line in re.split(r"[，。,.\n；;！!？?]+", after) if line.strip()]
        body = {"form": form, "lines": lines, "keywords": keywords, "seed": seed, "n": max(n, 3), "model": model}
        out = call("POST", "/api/poems/suggest", url, api_key,
                   json={k: v for k, v in body.items() if v is not None}).json()
        for s in out["suggestions"]:
            console.print(f"[bold]{s['line']}[/bold]  line {s['index'] + 1} · log-prob {s['logprob']:.2f} · "
                          f"seed {s['seed']} · in: {'，'.join(s['lines'])}")
        return
    body = {"form": form, "acrostic": acrostic, "title": title, "keywords": keywords, "rhyme": rhyme,
            "rhyme_scheme": scheme, "script": script, "seed": seed, "n": n, "model": model}
    if image is not None:
        if not image.is_file():
            err.print(f"[red]--image {image}: no such file[/red]")
            raise typer.Exit(2)
        body["image"] = base64.b64encode(image.read_bytes()).decode()
    out = call("POST", "/api/poems", url, api_key, json={k: v for k, v in body.items() if v is not None}).json()
    if "picture" in out:
        seen = "  ".join(f"{k['keyword']} {k['gloss']} ({k['score']:.2f})" for k in out["picture"]["keywords"])
        console.print(f"{out['picture']['model']} sees: {seen}")
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
