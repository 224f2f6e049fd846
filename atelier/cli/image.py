"""`atelier image`: generate images through the server and save them as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from atelier.cli.http import KeyOpt, UrlOpt, call, console


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

    from atelier.common.files import atomic_write_bytes

    body = {"model": model, "prompt": prompt, "n": n, "size": size, "seed": seed, "steps": steps,
            "guidance": guidance, "negative_prompt": negative_prompt, "upscaler": upscaler, "response_format": "b64_json"}
    # Unset options are left out so the server's per-model defaults apply.
    data = call("POST", "/v1/images/generations", url, api_key,
                json={k: v for k, v in body.items() if v is not None}).json()
    for i, item in enumerate(data["data"]):
        path = output if len(data["data"]) == 1 else output.with_name(f"{output.stem}-{i + 1}{output.suffix}")
        atomic_write_bytes(path, base64.b64decode(item["b64_json"]))
        console.print(f"{path}  seed {item.get('seed')}  {data['model']}"
                      + (f"  artifact {item['artifact_id']}" if item.get("artifact_id") else ""))
