"""Train a tune model: ABC files → canonical tunes in every key → the chargpt Trainer.

The model is chargpt's decoder (atelier/models/chargpt.py) over ABC tokens
(atelier/music/tokens.py) instead of characters; the Trainer, its checkpoints and resume
are the same. Tunes are split into train and validation by a hash of the tune, so no tune
is half in each, and only the training tunes are transposed to the twelve keys
(folk-rnn's augmentation); validation keeps each tune in its own key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from atelier.common.files import atomic_write_json
from atelier.models.chargpt import CONFIG_FILE, CharGPT, ChargptConfig, from_pretrained
from atelier.music.theory import TheoryError
from atelier.music.tokens import AbcTokenizer, pitch_range, read_corpus, transpose
from atelier.training.corpus import Corpus
from atelier.training.trainer import TrainConfig, Trainer, environment

FAMILY = "abc-gpt"
TOKENIZER_FILE = "tokenizer.json"
SHIFTS = range(-5, 7)  # the twelve keys, moving each tune at most a fourth down or a fifth up
LOWEST, HIGHEST = -5, 16  # written range kept after transposing: G, … c'' in diatonic steps from C


def abc_files(data: str | Path) -> list[Path]:
    data = Path(data)
    files = sorted(data.glob("*.abc")) if data.is_dir() else [data]
    if not files:
        raise ValueError(f"{data}: no .abc files")
    return files


def held_out(text: str, fraction: float) -> bool:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64 < fraction


def in_every_key(texts: list[str]) -> list[str]:
    """Each tune in up to twelve keys; a transposition that leaves the written range is dropped."""
    out = []
    for text in texts:
        for shift in SHIFTS:
            try:
                moved = transpose(text, shift) if shift else text
            except (TheoryError, StopIteration):
                continue
            low, high = pitch_range(moved)
            if shift == 0 or (low >= LOWEST and high <= HIGHEST):
                out.append(moved)
    return out


def tune_corpus(data: str | Path, *, val_fraction: float = 0.05, val_data: str | Path | None = None,
                augment: bool = True) -> tuple[Corpus, dict]:
    """The training corpus (canonical tunes) and what was read and skipped."""
    files = abc_files(data)
    texts, skipped = read_corpus(files)
    if val_data is not None:
        train, val = texts, read_corpus(abc_files(val_data))[0]
    else:
        train = [t for t in texts if not held_out(t, val_fraction)]
        val = [t for t in texts if held_out(t, val_fraction)] or train[-1:]
    if not train:
        raise ValueError(f"{data}: no tune could be read (skipped: {skipped})")
    augmented = in_every_key(train) if augment else train
    sources = [{"file": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]
    facts = {"tunes": len(texts), "train_tunes": len(train), "val_tunes": len(val),
             "train_sequences": len(augmented), "skipped": skipped}
    return Corpus(train=augmented, val=val, sources=sources), facts


def load_tune_model(folder: Path) -> tuple[CharGPT, AbcTokenizer]:
    return from_pretrained(folder, tokenizer=AbcTokenizer)


def train_tunes(data: str | Path, workdir: str | Path, model_cfg: dict, train_cfg: TrainConfig, *,
                base: Path | None = None, val_data: str | Path | None = None, augment: bool = True,
                on_event: Callable[[dict], None] | None = None,
                should_stop: Callable[[], bool] | None = None, read: tuple[Corpus, dict] | None = None) -> Path:
    """Train (or resume in workdir) and return the folder of the best weights, ready to register.
    `read`: tune_corpus(data, …) already read by the caller (reading and transposing takes a while)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)
    corpus, facts = read or tune_corpus(data, val_data=val_data, augment=augment)
    if base is not None:
        model, tok = load_tune_model(base)
        model.train()
    else:
        tok_path = workdir / TOKENIZER_FILE
        tok = AbcTokenizer.load(tok_path) if tok_path.exists() else AbcTokenizer.train(corpus.train + corpus.val)
        tok.save(tok_path)
        model = CharGPT(ChargptConfig(vocab_size=len(tok), **model_cfg))
    trainer = Trainer(model, tok, corpus, train_cfg, workdir, on_event, should_stop)
    started = time.time()
    state = trainer.fit()
    best = trainer.best_dir
    config = json.loads((best / CONFIG_FILE).read_text())
    config["atelier_family"] = FAMILY
    atomic_write_json(best / CONFIG_FILE, config)
    atomic_write_json(best / "training.json", {
        "family": FAMILY,
        "model_config": asdict(model.config),
        "train_config": asdict(train_cfg),
        "base": str(base) if base is not None else None,
        "data": {"source": str(data), "files": corpus.sources, **facts, "vocab_size": len(tok),
                 "augmentation": "transposed to 12 keys" if augment else None},
        "metrics": {"val_loss": state.best_val_loss, "best_step": state.best_step, "steps": state.step,
                    "tokens_seen": state.tokens_seen, "stopped_early": state.stopped_early},
        "history": state.history,
        "environment": environment(started),
    })
    return best
