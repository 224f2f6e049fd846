"""Model compression as lifecycle operations: each makes a new version (or model) with its lineage.

  quantize   int8 weights, one scale per row (atelier/models/int8.py): a new version of the same
             model, a quarter of the weights' bytes on disk; loads back to floats
  prune      structured: whole MLP channels, least important first, so the pruned model is
             smaller for real (its config's n_inner shrinks; no masks), then a short fine-tune
             that distils from the original to win back what pruning lost
  distill    a smaller student trained on the teacher's output distribution over a corpus
             (KL divergence to the teacher's softened logits, mixed with the usual cross-entropy)

`prune` and `distill` run as jobs (method "prune" / "distill" of POST /v1/fine_tuning/jobs), with
the job runner's events, checkpoints, cancel and resume; `benchmarks/compress_eval.py` measures
what each buys and costs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from atelier.common.files import atomic_write_bytes, atomic_write_json
from atelier.models import int8
from atelier.models.chargpt import CONFIG_FILE, WEIGHTS_FILE, CharGPT, ChargptConfig
from atelier.training.trainer import encode_stream

METHODS = ("int8",)


def quantize_folder(src: Path, dst: Path, method: str = "int8") -> dict:
    """Copy a version folder into `dst` with its weights quantized; returns the config entry it wrote."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not supported; methods: {', '.join(METHODS)}")
    src, dst = Path(src), Path(dst)
    config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    if int8.CONFIG_KEY in config:
        raise ValueError(f"this version is already quantized ({config[int8.CONFIG_KEY]['method']})")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(WEIGHTS_FILE, CONFIG_FILE))
    tensors = int8.quantize(load_file(str(src / WEIGHTS_FILE)))
    atomic_write_bytes(dst / WEIGHTS_FILE, save(tensors, metadata={"format": "pt", "quantization": method}))
    entry = {"method": method, "scheme": "weight-only, symmetric, one fp32 scale per row",
             "tensors": int8.quantized_count(tensors)}
    atomic_write_json(dst / CONFIG_FILE, config | {int8.CONFIG_KEY: entry})
    return entry


# -- pruning --------------------------------------------------------------------------------------
def sample_windows(texts: list[str], tokenizer, block: int, windows: int = 8) -> list[torch.Tensor]:
    """The first `windows` windows of `block` tokens of `texts` (one shorter window for a tiny corpus): what
    a prune measures channel importance on, the same ones again when a job resumes."""
    stream = encode_stream(texts, tokenizer)[: windows * block]
    return [stream[i:i + block][None] for i in range(0, max(1, len(stream) - block + 1), block)]


@torch.no_grad()
def mlp_importance(model: CharGPT, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per block, how much each MLP channel contributes: the mean |activation| after GELU over sample
    text, times the norm of the weights that carry it out (a channel that fires but writes nothing,
    or writes much but never fires, matters little)."""
    sums = [torch.zeros(block.mlp.c_fc.out_features) for block in model.h]
    hooks = []
    for i, block in enumerate(model.h):
        def record(_module, inputs, _output, i=i):
            sums[i] += inputs[0].abs().reshape(-1, inputs[0].shape[-1]).mean(0)
        hooks.append(block.mlp.c_proj.register_forward_hook(record))
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [s / max(1, len(batches)) * block.mlp.c_proj.weight.norm(dim=0) for s, block in zip(sums, model.h)]


@torch.no_grad()
def prune_mlp(model: CharGPT, keep: float, batches: list[torch.Tensor],
              scores: list[torch.Tensor] | None = None) -> CharGPT:
    """A new, smaller model: each block keeps the `keep` fraction of its MLP channels that matter most
    (the same count in every block, so the config stays one n_inner); everything else is copied.
    `scores` (one per block) replaces the importance measured on `batches`."""
    width = model.config.inner
    kept = max(1, round(width * keep))
    config = ChargptConfig(**{**model.config.__dict__, "n_inner": kept})
    pruned = CharGPT(config)
    state = model.state_dict()
    for i, score in enumerate(scores if scores is not None else mlp_importance(model, batches)):
        idx = torch.topk(score, kept).indices.sort().values
        p = f"h.{i}.mlp."
        state[p + "c_fc.weight"] = state[p + "c_fc.weight"][idx]
        state[p + "c_fc.bias"] = state[p + "c_fc.bias"][idx]
        state[p + "c_proj.weight"] = state[p + "c_proj.weight"][:, idx]
    pruned.load_state_dict(state, strict=True)
    return pruned
