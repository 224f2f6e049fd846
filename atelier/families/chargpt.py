"""chargpt: a GPT-2-style decoder over characters (atelier/models/chargpt.py) — text and poems.

Served by the text engine (continuous batching); trained from text uploads, from scratch
or fine-tuning a version; `tang-poet` ships with the package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atelier.common.native import kernels
from atelier.families.base import Family, TrainJob, decoder_context
from atelier.models import chargpt
from atelier.training import hyperparameters
from atelier.training.hyperparameters import TrainError

SCRATCH_DEFAULTS = dict(n_embd=64, n_layer=2, n_head=4, context=64, min_count=1)
# A chat turn that already ends like a line of verse is continued; anything else is a title.
LINE_END = "，。！？；、,.!?;"


class CharLM:
    """A chargpt version as the text engine drives it (families/base.py: TextServable).

    One token is one character: the poetry engine decodes with `model` and `tokenizer`
    directly (constrained search over characters).
    """

    def __init__(self, model: chargpt.CharGPT, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.context = model.config.n_positions
        self.bos_id, self.eos_ids = tokenizer.bos_id, [tokenizer.eos_id]
        self.banned_ids = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id]
        # One character per token, whatever its neighbours: the text engine takes a token's text from this
        # table instead of decoding a window of ids twice per token (a twelfth of a 32-row step).
        self.token_pieces = [tokenizer.decode([i]) for i in range(max(model.config.vocab_size, len(tokenizer)))]

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return [self.bos_id] + self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict]) -> str:
        """A poet, not a chat model: the last user turn is a title, or opening lines to continue."""
        text = [m["content"] for m in messages if m["role"] == "user"][-1].strip()
        return text if text and text[-1] in LINE_END else text + "\n"

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def poet(self):
        """(model, tokenizer) for the poetry engine."""
        return self.model, self.tokenizer

    @property
    def decoding(self) -> str:
        """How a decoding step runs (GET /api/ps): "native" (atelier/common/native/), "native-int8" (a quantized
        version: its int8 matrices for a few rows at a time), or "python"."""
        if kernels() is None:
            return "python"
        return "native-int8" if self.model.decoder().native_int8_args is not None else "native"

    def new_cache(self, rows: int, dtype: torch.dtype | None = None) -> chargpt.KVCache:
        return chargpt.KVCache(self.model.config, rows, dtype or torch.float32)

    def forward(self, ids: torch.Tensor, cache, rows: torch.Tensor, pos: torch.Tensor,
                last: torch.Tensor | None = None) -> torch.Tensor:
        logits, _ = self.model(ids, cache=cache, rows=rows, pos=pos, last=last)
        return logits

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token)


class Chargpt(Family):
    name = "chargpt"
    task = "text-generation"
    engine = "text"
    train_formats = ("jsonl-text", "jsonl-prompt", "jsonl-chat", "text")
    fine_tunable = True
    quantizable = True
    shipped = ("tang-poet",)

    def describe(self, config: dict, files: dict) -> dict:
        return {"context_length": config.get("n_positions")}

    def load(self, folder: Path) -> CharLM:
        return CharLM(*chargpt.from_pretrained(folder))

    def check_hyperparameters(self, hyper: dict) -> dict:
        checked = hyperparameters.check(hyper, hyperparameters.WITH_COMPRESSION, family=self.name)
        method = checked.get("method", "supervised")
        only = {"keep": ("prune",), "temperature": ("distill", "prune"), "alpha": ("distill", "prune")}
        for name, methods in only.items():
            if name in checked and method not in methods:
                raise TrainError(f"hyperparameters.{name} applies to method {' or '.join(methods)}, not {method}",
                                 param=f"hyperparameters.{name}")
        return checked

    def train(self, job: TrainJob) -> Path | None:
        from atelier.training.corpus import load_corpus
        from atelier.training.run import train_chargpt

        # 3. build the model
        hyper = dict(job.hyperparameters)
        method = hyper.get("method", "supervised")
        block = decoder_context(job, SCRATCH_DEFAULTS["context"], "chargpt")
        corpus = load_corpus(job.train_path)
        tokens = sum(len(d) + 2 for d in corpus.train)
        teacher = start = None
        defaults = SCRATCH_DEFAULTS
        if method != "supervised":  # distil or prune the base version: it is the teacher
            teacher, tok = chargpt.from_pretrained(job.base)
            t = teacher.config
            defaults = {"n_embd": t.n_embd // 2, "n_layer": max(1, t.n_layer // 2), "n_head": max(1, t.n_head // 2)}
        model_cfg, cfg = hyperparameters.decoder_plan(hyper, block=block, fine_tune=method != "distill" and
                                                      job.base is not None, train_tokens=tokens, seed=job.seed,
                                                      max_steps_limit=job.max_steps, defaults=defaults, stage=job.stage)
        if method != "supervised":
            cfg.distill_temperature = float(hyper.get("temperature", 2.0))
            cfg.distill_alpha = float(hyper.get("alpha", 0.5))
            start = (self._pruned(teacher, tok, model_cfg, corpus, float(hyper.get("keep", 0.5)))
                     if method == "prune" else
                     (chargpt.CharGPT(chargpt.ChargptConfig(vocab_size=len(tok), **model_cfg)), tok))
            job.stage(f"building the model: {method} {job.base_ref} ({teacher.config.n_params:,} parameters) "
                      f"into {start[0].config.n_params:,} parameters")
        # 4. train
        folder = train_chargpt(job.train_path, job.workdir / "train", model_cfg, cfg,
                               min_count=int(hyper.get("min_count", 1)), on_event=job.on_event,
                               base=job.base if method == "supervised" else None, val_data=job.val_path,
                               should_stop=job.should_stop, start=start, teacher=teacher, method=method)
        if job.should_stop():
            return None
        job.trained_tokens = cfg.max_steps * cfg.batch_size * block
        return folder

    @staticmethod
    def _pruned(teacher, tok, model_cfg: dict, corpus, keep: float):
        """The pruned model a prune job fine-tunes: channel importance measured on the job's first
        training windows (the same ones on a resume, so the same channels are kept)."""
        from atelier.training.compress import prune_mlp, sample_windows

        return prune_mlp(teacher, keep, sample_windows(corpus.train, tok, model_cfg["n_positions"])), tok


family = Chargpt()
