"""`atelier music`: write a folk tune (or --check / --render one) through the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from atelier.cli.http import KeyOpt, UrlOpt, call, console, err


def music(meter: Annotated[str, typer.Option(help="M: 6/8, 4/4, 3/4, 2/4, 9/8 …")] = "6/8",
          key: Annotated[str, typer.Option(help="K: D, G, Em, Ador, Dmix …")] = "D",
          bars: Annotated[Optional[int], typer.Option(help="written bars (default: the AABB form, 2 × 8 bars)")] = None,
          title: Annotated[Optional[str], typer.Option()] = None,
          prime: Annotated[Optional[str], typer.Option(help="opening bars (ABC music) to continue")] = None,
          chords: Annotated[bool, typer.Option(help="write chord symbols")] = True,
          temperature: Annotated[float, typer.Option()] = 1.0,
          seed: Annotated[Optional[int], typer.Option()] = None,
          n: Annotated[int, typer.Option(help="how many tunes")] = 1,
          out: Annotated[Optional[Path], typer.Option("-o", "--out", help="write the ABC here (tune 1; more: -2, -3 …)")] = None,
          midi: Annotated[Optional[Path], typer.Option("--midi", help="also save a MIDI file")] = None,
          wav: Annotated[Optional[Path], typer.Option("--wav", help="also save a WAV file")] = None,
          instrument: Annotated[str, typer.Option(help="fiddle | flute | whistle | accordion | piano | guitar | harp")] = "fiddle",
          check: Annotated[Optional[Path], typer.Option("--check", help="check this .abc file instead")] = None,
          model: Annotated[str, typer.Option()] = "folk-tunes",
          url: UrlOpt = None, api_key: KeyOpt = None):
    """Write folk tunes that parse and scan (ABC), with a report per tune; save ABC, MIDI or WAV."""
    if check is not None:
        report = call("POST", "/api/music/check", url, api_key, json={"abc": check.read_text(encoding="utf-8")}).json()
        _print_report(report)
        raise typer.Exit(0 if report["valid"] else 1)  # the verdict, for scripts
    body = {"meter": meter, "key": key, "bars": bars, "title": title, "prime": prime, "chords": chords,
            "temperature": temperature, "seed": seed, "n": n, "model": model}
    reply = call("POST", "/api/music", url, api_key, json={k: v for k, v in body.items() if v is not None}).json()
    for i, tune in enumerate(reply["tunes"]):
        if out is None:
            console.print(tune["abc"], markup=False, highlight=False)
        else:
            path = out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
            path.write_text(tune["abc"], encoding="utf-8")
            console.print(f"wrote {path}")
        _print_report(tune["report"], seed=tune["seed"])
        for fmt, path in (("mid", midi), ("wav", wav)):
            if path is None:
                continue
            path = path if i == 0 else path.with_name(f"{path.stem}-{i + 1}{path.suffix}")
            data = call("POST", "/api/music/render", url, api_key,
                        json={"abc": tune["abc"], "format": fmt, "instrument": instrument}).content
            path.write_bytes(data)
            console.print(f"wrote {path} ({len(data):,} bytes)")


def _print_report(report: dict, seed: int | None = None) -> None:
    where = f", seed {seed}" if seed is not None else ""
    if report["valid"]:
        console.print(f"[green]valid[/green]: {report['bars']} bars of {report['meter']} in {report['key']}{where}")
        return
    err.print(f"[red]bars that do not scan[/red]: {', '.join(map(str, report['wrong_bars']))}")
    for b in report["bar_lengths"]:
        if not b["ok"]:
            err.print(f"  bar {b['number']} (line {b['line']}, column {b['col']}): {b['length']} units, "
                      f"{b['expected']} expected")
