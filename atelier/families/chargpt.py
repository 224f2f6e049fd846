"""chargpt: a GPT-2-style decoder over characters (atelier/models/chargpt.py) — text and poems.

Served by the text engine (continuous batching); trained from text uploads, from scratch
or fine-tuning a version; `tang-poet` ships with the package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atelier.families.base import Family, TrainJob, decoder_context
from atelier.models import chargpt
from atelier.training import hyperparameters

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

    def new_cache(self, rows: int) -> chargpt.KVCache:
        return chargpt.KVCache(self.model.config, rows)

    def forward(self, ids: torch.Tensor, cache, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(ids, cache=cache, rows=rows, pos=pos)
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
        return hyperparameters.check(hyper)

    def train(self, job: TrainJob) -> Path | None:
        from atelier.training.corpus import load_corpus
        from atelier.training.run import train_chargpt

        # 3. build the model
        hyper = dict(job.hyperparameters)
        block = decoder_context(job, SCRATCH_DEFAULTS["context"], "chargpt")
        corpus = load_corpus(job.train_path)
        tokens = sum(len(d) + 2 for d in corpus.train)
        model_cfg, cfg = hyperparameters.decoder_plan(hyper, block=block, fine_tune=job.base is not None,
                                                      train_tokens=tokens, seed=job.seed, max_steps_limit=job.max_steps,
                                                      defaults=SCRATCH_DEFAULTS, stage=job.stage)
        # 4. train
        folder = train_chargpt(job.train_path, job.workdir / "train", model_cfg, cfg,
                               min_count=int(hyper.get("min_count", 1)), on_event=job.on_event, base=job.base,
                               val_data=job.val_path, should_stop=job.should_stop)
        if job.should_stop():
            return None
        job.trained_tokens = cfg.max_steps * cfg.batch_size * block
        return folder


family = Chargpt()
