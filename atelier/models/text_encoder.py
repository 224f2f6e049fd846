"""A small text encoder for image prompts: words → one conditioning vector.

The image models are trained on emoji whose only text is their Unicode name ("GRINNING
CAT FACE WITH SMILING EYES"), so the encoder is a bag of words trained jointly with the
image model: lower-cased words → embeddings → masked mean → MLP → (B, dim). A prompt with
no known word maps to a learned *null* vector, which is also what classifier-free guidance
uses as "no prompt".

    >>> vocab = WordVocab.build(["GRINNING CAT FACE", "RED APPLE"])
    >>> enc = TextEncoder(TextEncoderConfig(vocab_size=len(vocab)))
    >>> enc(vocab.batch(["smiling cat face", ""])).shape
    torch.Size([2, 128])

Saved as `vocab.json` ({"type": "words", "words": [...]}) next to the model's weights.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

VOCAB_FILE = "vocab.json"
PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+")
# Words that carry no picture: dropped from prompts and names alike.
STOPWORDS = frozenset("a an the of with and in on for to at by".split())


def words(text: str) -> list[str]:
    """'Smiling cat-face, please!' → ['smiling', 'cat', 'face', 'please']."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


class WordVocab:
    def __init__(self, vocab: list[str]):
        if vocab[:2] != [PAD, UNK] or len(set(vocab)) != len(vocab):
            raise ValueError("a word vocabulary starts with <pad>, <unk> and has no duplicates")
        self.itos = list(vocab)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts, min_count: int = 1) -> "WordVocab":
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def lookup(self, word: str) -> int:
        # A light plural/verb-form fallback: "cats" → "cat", "smiles" → "smile".
        for w in (word, word.removesuffix("s"), word.removesuffix("es")):
            if w in self.stoi:
                return self.stoi[w]
        return self.stoi[UNK]

    def encode(self, text: str, max_words: int = 16) -> list[int]:
        """Known words only (unknown ones carry nothing a bag of words can use)."""
        ids = [self.lookup(w) for w in words(text)]
        return [i for i in ids if i != self.stoi[UNK]][:max_words]

    def known(self, text: str) -> list[str]:
        return [w for w in words(text) if self.lookup(w) != self.stoi[UNK]]

    def explain(self, text: str, alternatives: int = 3) -> list[dict]:
        """Each word of a prompt: whether the model knows it, and for one it ignores the known words
        spelt most like it (difflib's ratio ≥ 0.6), e.g. "kitten" → ["kite", "mitten"]…"""
        import difflib

        out = []
        for w in words(text):
            known = self.lookup(w) != self.stoi[UNK]
            out.append({"word": w, "known": known, "instead": [] if known else
                        difflib.get_close_matches(w, self.itos[2:], n=alternatives, cutoff=0.6)})
        return out

    def batch(self, texts: list[str], max_words: int = 16) -> torch.Tensor:
        """(B, L) int64 ids padded with 0; L is at least 1."""
        rows = [self.encode(t, max_words) for t in texts]
        width = max([1] + [len(r) for r in rows])
        out = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def save(self, path: str | Path) -> None:
        from atelier.common.files import atomic_write_json

        atomic_write_json(path, {"type": "words", "words": self.itos})

    @classmethod
    def load(cls, path: str | Path) -> "WordVocab":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if d.get("type") != "words":
            raise ValueError(f"{path} is not a word vocabulary")
        return cls(d["words"])


@dataclass
class TextEncoderConfig:
    vocab_size: int = 1000
    dim: int = 128
    max_words: int = 16


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim, padding_idx=0)
        self.null = nn.Parameter(torch.zeros(config.dim))  # "no prompt" (classifier-free guidance)
        self.mlp = nn.Sequential(nn.Linear(config.dim, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim))
        nn.init.normal_(self.embed.weight, std=0.3)

    def forward(self, ids: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) padded with 0 → (B, dim). Rows with no word, or with drop[i], get the null vector."""
        mask = (ids != 0).float().unsqueeze(-1)  # (B, L, 1)
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, dim)
        empty = mask.sum((1, 2)) == 0
        if drop is not None:
            empty = empty | drop
        h = torch.where(empty.unsqueeze(-1), self.null.expand_as(pooled), pooled)
        return self.mlp(h)


__all__ = ["WordVocab", "TextEncoder", "TextEncoderConfig", "words", "VOCAB_FILE"]
