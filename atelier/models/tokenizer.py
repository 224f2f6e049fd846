"""Character tokenizer: one token per character, plus four special tokens.

Unknown characters map to `<unk>` (never an error); `decode` drops special tokens.
Saved in the Hugging Face `tokenizers` format (a WordLevel vocabulary over single
characters), so `AutoTokenizer.from_pretrained` reads a chargpt folder as it is; the
older Atelier format, {"type": "char", "special": [...], "chars": "..."}, still loads.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
HF_CONFIG_FILE = "tokenizer_config.json"


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
        """tokenizer.json in the `tokenizers` format, and tokenizer_config.json beside it (which
        AutoTokenizer reads for the special tokens and the class to build)."""
        from atelier.common.files import atomic_write_json

        path = Path(path)
        atomic_write_json(path, self.to_hf())
        atomic_write_json(path.with_name(HF_CONFIG_FILE), {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000,
            "pad_token": SPECIAL[0], "unk_token": SPECIAL[1], "bos_token": SPECIAL[2], "eos_token": SPECIAL[3],
            "clean_up_tokenization_spaces": False})

    def to_hf(self) -> dict:
        """The `tokenizers` JSON: every character its own word (split on each character), joined back
        without spaces (the Fuse decoder)."""
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for i, t in enumerate(SPECIAL)]
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                                  "invert": False},
                # <bos> before every text, as chargpt was trained and as its engine encodes prompts
                "post_processor": {"type": "TemplateProcessing",
                                   "single": [{"SpecialToken": {"id": SPECIAL[2], "type_id": 0}},
                                              {"Sequence": {"id": "A", "type_id": 0}}],
                                   "pair": [{"SpecialToken": {"id": SPECIAL[2], "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}},
                                            {"Sequence": {"id": "B", "type_id": 1}}],
                                   "special_tokens": {SPECIAL[2]: {"id": SPECIAL[2], "ids": [2],
                                                                   "tokens": [SPECIAL[2]]}}},
                "decoder": {"type": "Fuse"},
                "model": {"type": "WordLevel", "vocab": self.stoi, "unk_token": SPECIAL[1]}}

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if d.get("type") == "char" and d.get("special") == SPECIAL:  # the older Atelier format
            return cls(d["chars"])
        vocab = (d.get("model") or {}).get("vocab")
        if (d.get("model") or {}).get("type") != "WordLevel" or not isinstance(vocab, dict):
            raise ValueError(f"{path}: not an Atelier character tokenizer")
        itos = sorted(vocab, key=vocab.get)
        if itos[:len(SPECIAL)] != SPECIAL or [vocab[t] for t in itos] != list(range(len(itos))):
            raise ValueError(f"{path}: its vocabulary does not start with {SPECIAL} or has gaps")
        return cls("".join(itos[len(SPECIAL):]))
