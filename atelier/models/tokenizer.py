"""Character tokenizer: one token per character, plus four special tokens.

Unknown characters map to `<unk>` (never an error); `decode` drops special tokens.
Saved as JSON: {"type": "char", "special": [...], "chars": "..."}.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


class CharTokenizer:
    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be unique")
        self.chars = chars
        self.itos = SPECIAL + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)

    @classmethod
    def train(cls, texts, min_count: int = 1) -> "CharTokenizer":
        """Build the vocabulary from texts, most frequent first, keeping characters seen min_count times."""
        counts = Counter()
        for t in texts:
            counts.update(t)
        chars = [c for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
        return cls("".join(chars))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        return [self.stoi.get(c, unk) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIAL) and i < len(self.itos))

    def token_text(self, i: int) -> str:
        """The text of one token, special tokens by name (for logprobs)."""
        return self.itos[i] if 0 <= i < len(self.itos) else "<unk>"

    def save(self, path: str | Path) -> None:
        from atelier.common.files import atomic_write_json

        atomic_write_json(Path(path), {"type": "char", "special": SPECIAL, "chars": self.chars})

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if d.get("type") != "char" or d.get("special") != SPECIAL:
            raise ValueError(f"{path}: not an Atelier character tokenizer")
        return cls(d["chars"])
