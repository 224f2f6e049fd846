"""The family registry: every model family Atelier knows, by the name stored on its models.

The runtime, the API, the job runner, shipped-model registration and the CLI read this
dict and nothing else about families. Adding a family is one file implementing the
contract (atelier/families/base.py) and one line here.
"""

from __future__ import annotations

from atelier.families import abc_gpt, chargpt, dcgan, ddpm, diffusers, hf_causal_lm, onnx, sklearn, style, tagger, upscaler
from atelier.families.base import Family, TrainError, TrainJob

FAMILIES: dict[str, Family] = {
    "chargpt": chargpt.family,
    "ddpm": ddpm.family,
    "dcgan": dcgan.family,
    "sklearn": sklearn.family,
    "onnx": onnx.family,
    "gram": style.family,
    "upscaler": upscaler.family,
    "hf-causal-lm": hf_causal_lm.family,
    "diffusers": diffusers.family,
    "abc-gpt": abc_gpt.family,
    "image-tagger": tagger.family,
}


def get_family(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; families: {', '.join(FAMILIES)}") from None


def trainable() -> list[str]:
    """Families a job can train from scratch (they read some upload format)."""
    return [name for name, f in FAMILIES.items() if f.train_formats]


__all__ = ["FAMILIES", "Family", "TrainError", "TrainJob", "get_family", "trainable"]
