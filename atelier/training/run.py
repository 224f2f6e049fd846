"""Train a chargpt model end to end: corpus → tokenizer → model → Trainer → a version folder.

The CLI (`atelier train`) and the job runner both call `train_chargpt`; registering the
result as a model version is the caller's business (see `atelier.storage.registry`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from atelier.models.chargpt import CharGPT, ChargptConfig, from_pretrained
from atelier.models.tokenizer import CharTokenizer
from atelier.common.files import atomic_write_json
from atelier.training.corpus import Corpus, load_corpus
from atelier.training.trainer import Trainer, TrainConfig, environment


def train_chargpt(data: str | Path, workdir: str | Path, model_cfg: dict, train_cfg: TrainConfig,
                  min_count: int = 1, threads: int | None = None,
                  on_event: Callable[[dict], None] | None = None, *, base: Path | None = None,
                  val_data: str | Path | None = None, should_stop: Callable[[], bool] | None = None,
                  start: tuple[CharGPT, CharTokenizer] | None = None, teacher: CharGPT | None = None,
                  method: str = "supervised") -> Path:
    """Train (or resume in workdir) and return the folder of the best weights.

    From scratch, the tokenizer is built from the corpus and the model from model_cfg;
    with `base` (a version folder), both come from the base model (fine-tuning); `start` hands
    over a model and tokenizer built by the caller (a distilled student, a pruned model), and
    `teacher` makes the loss distil from that model's outputs (atelier/training/compress.py).
    The folder holds config.json, model.safetensors, tokenizer.json and training.json
    (config, data provenance, metrics), ready for `storage.registry.register_trained`.
    """
    if threads:
        torch.set_num_threads(threads)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)
    corpus = load_corpus(data)
    if val_data is not None:
        held_out = load_corpus(val_data, val_fraction=0.0)
        corpus = Corpus(train=corpus.train + corpus.val, val=held_out.train + held_out.val,
                        sources=corpus.sources + held_out.sources)
    if start is not None:
        model, tok = start
        model.train()
        config = model.config
    elif base is not None:
        model, tok = from_pretrained(base)
        model.train()
        config = model.config
    else:
        tok_path = workdir / "tokenizer.json"
        if tok_path.exists():  # resuming: the vocabulary must not change
            tok = CharTokenizer.load(tok_path)
        else:
            tok = CharTokenizer.train(corpus.train, min_count=min_count)
            tok.save(tok_path)
        config = ChargptConfig(vocab_size=len(tok), **model_cfg)
        model = CharGPT(config)
    trainer = Trainer(model, tok, corpus, train_cfg, workdir, on_event, should_stop, teacher=teacher)
    started = time.time()
    state = trainer.fit()
    best = trainer.best_dir
    record = {
        "family": "chargpt",
        "model_config": asdict(config),
        "train_config": asdict(train_cfg),
        "base": str(base) if base is not None else None,
        "method": method,
        "data": {"source": str(data), "files": corpus.sources, "train_docs": len(corpus.train),
                 "val_docs": len(corpus.val), "chars": corpus.n_chars, "vocab_size": len(tok)},
        "metrics": {"val_loss": state.best_val_loss, "val_ppl": float(torch.tensor(state.best_val_loss).exp()),
                    "best_step": state.best_step, "steps": state.step, "tokens_seen": state.tokens_seen,
                    "stopped_early": state.stopped_early},
        "history": state.history,
        "environment": environment(started),
    }
    atomic_write_json(best / "training.json", record)
    return best
