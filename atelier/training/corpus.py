"""Training texts: the shipped poetry corpus and a user's own text or JSONL files.

A *document* is one poem (or one record of a user's file). Documents are split into
train and validation by a hash of their text, so the split is stable across runs and a
poem is never half in each. Poems are rendered as `title\\nbody`; a share of them without
the title, so that a prompt can be either a title or the opening of a poem.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

# Editorial notes inside poems: （一作…）, [缺], 〔…〕 and similar.
_NOTE = re.compile(r"[（(〔\[【{][^）)〕\]】}]*[）)〕\]】}]")
_MISSING = "□■○●�"


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    sources: list[dict]  # provenance: file, sha256, records used

    @property
    def n_chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.val))


def _stable_fraction(text: str) -> float:
    h = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_line(line: str) -> str:
    return _NOTE.sub("", line).strip()


def render_poem(title: str, lines: list[str], with_title: bool = True) -> str:
    body = "".join(lines)
    return f"{title}\n{body}" if with_title and title else body


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    train, val = [], []
    for d in docs:
        (val if _stable_fraction("split:" + d) < val_fraction else train).append(d)
    return train, val


def poetry_documents(data_dir: str | Path, untitled_share: float = 0.25) -> tuple[list[str], list[dict]]:
    """Tang shi (converted to simplified with OpenCC) and Song ci, one document per poem."""
    import opencc

    t2s = opencc.OpenCC("t2s")
    data_dir = Path(data_dir)
    docs, sources = [], []
    for name, title_key, convert in (("tang.jsonl", "title", True), ("songci.jsonl", "rhythmic", False)):
        path = data_dir / name
        used = 0
        with open(path, encoding="utf-8") as f:
            for raw in f:
                rec = json.loads(raw)
                lines = [clean_line(p) for p in rec.get("paragraphs", [])]
                lines = [l for l in lines if l]
                title = clean_line(rec.get(title_key, "")).replace("\n", " ")
                if not lines:
                    continue
                text = "\n".join([title] + lines)
                if convert:
                    text = t2s.convert(text)
                if any(c in text for c in _MISSING):
                    continue
                title, *lines = text.split("\n")
                with_title = _stable_fraction("title:" + text) >= untitled_share
                docs.append(render_poem(title, lines, with_title))
                used += 1
        sources.append({"file": f"poetry/{name}", "sha256": _sha256_file(path), "records": used,
                        "converted": "opencc t2s" if convert else None})
    return docs, sources


def text_documents(path: str | Path) -> list[str]:
    """Documents from a user's file: JSONL ({"text"} | {"prompt","completion"} | {"messages"}) or plain text.

    Plain text is split into documents at blank lines.
    """
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "text" in rec:
                docs.append(str(rec["text"]))
            elif "prompt" in rec and "completion" in rec:
                docs.append(f"{rec['prompt']}{rec['completion']}")
            elif "messages" in rec:
                docs.append("\n".join(str(m.get("content", "")) for m in rec["messages"]))
            else:
                raise ValueError(f"{path}:{n}: a record needs 'text', 'prompt'+'completion' or 'messages'")
        return docs
    return [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]


def load_corpus(source: str | Path, val_fraction: float = 0.02) -> Corpus:
    """`source` is the shared poetry folder (tang.jsonl + songci.jsonl) or a user's file."""
    source = Path(source)
    if source.is_dir():
        docs, sources = poetry_documents(source)
    else:
        docs = text_documents(source)
        sources = [{"file": source.name, "sha256": _sha256_file(source), "records": len(docs)}]
    if not docs:
        raise ValueError(f"{source}: no documents to train on")
    train, val = split_documents(docs, val_fraction)
    if not val and val_fraction > 0:  # tiny corpora: hold out at least one document
        train, val = docs[:-1] or docs, docs[-1:]
    return Corpus(train=train, val=val, sources=sources)
