"""The no-copy rule: every line of the training corpus, kept as a sorted array of hashes.

A *line* here is a clause between punctuation marks, of at least `MIN_LEN` characters,
in simplified characters: the Tang corpus converted with OpenCC t2s (as the model saw it)
plus the Song ci. Shorter clauses are exempt: almost every two- to four-character clause
of a ci (如梦, 秦楼月) occurs somewhere in 21,000 ci, so a rule on them would forbid the
tune itself.

The set is stored as 32-bit BLAKE2b hashes (about 4 bytes a line, ~3 MB for ~0.8 M lines),
shipped as `data/corpus_lines.npy`, so the server needs no corpus at run time. A false
positive (a new line whose hash collides with a corpus line) has a chance of about
n_lines / 2^32 ≈ 2e-4 and only makes the engine reject a line it could have kept.

Rebuild after the corpus changes:
    .venv/bin/python -m atelier.poetry.corpus [--data ../shared/data/poetry]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from atelier.poetry.prosody import PACKAGE_DATA

MIN_LEN = 5
INDEX_FILE = PACKAGE_DATA / "corpus_lines.npy"
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "poetry"
_CLAUSE_SPLIT = re.compile(r"[，。？！；：、,.?!;:\s]+")
_MISSING = "□■○●�"  # lost characters in the source; such lines were not trained on


def corpus_dir() -> Path:
    """The shared poetry data (tang.jsonl, songci.jsonl, tang300.jsonl): $ATELIER_POETRY_DATA or ../shared."""
    return Path(os.environ.get("ATELIER_POETRY_DATA", SHARED_DATA))


def line_hash(line: str) -> int:
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=4).digest(), "little")


def clauses(text: str) -> list[str]:
    """Split a line or a whole poem at punctuation: '春眠不觉晓，处处闻啼鸟。' → ['春眠不觉晓', '处处闻啼鸟']."""
    return [c for c in _CLAUSE_SPLIT.split(text) if c]


def corpus_poems(path: Path):
    """Each poem of a chinese-poetry JSONL file as its clauses, in simplified script (the tables' script):
    what the tables derived from the corpus (readings, parallels, themes) read."""
    from atelier.poetry.checker import convert  # the checker imports this module's neighbours

    with open(path, encoding="utf-8") as f:
        for raw in f:
            yield clauses(convert("".join(json.loads(raw).get("paragraphs", [])), "t2s"))


def corpus_lines(data_dir: Path) -> set[str]:
    """Every clause of at least MIN_LEN characters in tang.jsonl (to simplified) and songci.jsonl."""
    import opencc

    from atelier.training.corpus import clean_line  # the same cleaning the model's training used

    t2s = opencc.OpenCC("t2s")
    out: set[str] = set()
    for name, convert in (("tang.jsonl", True), ("songci.jsonl", False)):
        with open(Path(data_dir) / name, encoding="utf-8") as f:
            for raw in f:
                text = "\n".join(clean_line(p) for p in json.loads(raw).get("paragraphs", []))
                if convert:
                    text = t2s.convert(text)  # per poem, as training converted it
                out.update(c for c in clauses(text) if len(c) >= MIN_LEN and not any(m in c for m in _MISSING))
    return out


def build_index(data_dir: Path, out: Path = INDEX_FILE) -> np.ndarray:
    hashes = np.unique(np.fromiter((line_hash(c) for c in corpus_lines(data_dir)), dtype=np.uint32))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, hashes)
    return hashes


class CorpusIndex:
    """`line in index` is True when the line (or a clause of it) is in the corpus."""

    def __init__(self, hashes: np.ndarray):
        self.hashes = np.asarray(hashes, dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, line: str) -> bool:
        return any(self._has(c) for c in clauses(line) if len(c) >= MIN_LEN)

    def _has(self, clause: str) -> bool:
        h = line_hash(clause)
        i = int(np.searchsorted(self.hashes, h))
        return i < len(self.hashes) and int(self.hashes[i]) == h


@lru_cache(maxsize=1)
def default_index() -> CorpusIndex:
    """The shipped index; built from the shared corpus on first use if it is missing."""
    if not INDEX_FILE.exists():
        if not (corpus_dir() / "tang.jsonl").exists():
            raise RuntimeError(f"{INDEX_FILE} is missing and no corpus at {corpus_dir()} to build it from; "
                               "set ATELIER_POETRY_DATA to the folder holding tang.jsonl and songci.jsonl")
        build_index(corpus_dir())
    return CorpusIndex(np.load(INDEX_FILE, allow_pickle=False))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Build atelier/poetry/data/corpus_lines.npy from the poetry corpus.")
    ap.add_argument("--data", type=Path, default=corpus_dir(), help="folder with tang.jsonl and songci.jsonl")
    args = ap.parse_args()
    h = build_index(args.data)
    print(f"wrote {INDEX_FILE} ({len(h)} line hashes, {INDEX_FILE.stat().st_size / 1e6:.1f} MB)")
