"""`atelier generate`: stream a text continuation from the server to the terminal."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from atelier.cli.http import KeyOpt, UrlOpt, err, stream


def generate(prompt: Annotated[str, typer.Argument(help="opening of a poem, e.g. 床前明月光，")],
             model: Annotated[str, typer.Option(help="name, name:alias or name@version")] = "tang-poet",
             max_tokens: Annotated[int, typer.Option(help="characters to generate at most")] = 64,
             temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
             top_p: Annotated[float, typer.Option()] = 1.0,
             top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
             seed: Annotated[Optional[int], typer.Option(help="same seed, same text")] = None,
             stop: Annotated[Optional[list[str]], typer.Option(help="stop sequence (repeatable)")] = None,
             usage: Annotated[bool, typer.Option("--usage", help="then say on stderr how many tokens it took, and "
                                                 "how many of the prompt's the server had cached")] = False,
             url: UrlOpt = None, api_key: KeyOpt = None):
    """Stream a continuation of PROMPT to the terminal."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "seed": seed, "stop": stop or None, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    counted = None
    with stream("POST", "/v1/completions", url, api_key, json=body) as resp:
        # Plain stdout, not rich: the text is the output and must pipe unchanged.
        sys.stdout.write(prompt)
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # the stream had already started with 200 when this happened
                err.print(f"\n[red]{chunk['error']['message']}[/red]")
                raise typer.Exit(1)
            for choice in chunk.get("choices", []):
                sys.stdout.write(choice.get("text", ""))
                sys.stdout.flush()
            counted = chunk.get("usage") or counted
        sys.stdout.write("\n")
    if counted:
        cached = (counted.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        err.print(f"{counted['prompt_tokens']} prompt tokens ({cached} cached), "
                  f"{counted['completion_tokens']} completion tokens")
