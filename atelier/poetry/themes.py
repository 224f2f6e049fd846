"""Planning a poem as Jiuge does: the theme (keywords, or the title's words) expanded to one keyword per line.

Associates come from the Tang corpus: two characters are associated when they appear in the
same short poem (≤ 8 lines) at least MIN_POEMS times and far more often than chance (pointwise
mutual information above MIN_PMI). Only the 900 most common characters are proposed, so a plan
reads 雪 → 冰 梅 霜 寒 rather than 郢 剡. Shipped as data/themes.json (each of the 3,000 most
common characters with its associates, best first); rebuilt with
`python -m atelier.poetry.themes ../shared/data/poetry/tang.jsonl`.

    >>> expand("江雪", 2, random.Random(0))
    '冰潮'
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from atelier.poetry.prosody import PACKAGE_DATA, is_han

THEMES_FILE = PACKAGE_DATA / "themes.json"
MIN_POEMS, MIN_PMI = 30, 0.7
KNOWN, PROPOSED, KEPT = 3000, 900, 12  # characters with associates, characters proposed, associates kept


def derive(corpus: Path) -> dict[str, str]:
    from atelier.poetry.corpus import corpus_poems

    docs, pairs, n = Counter(), Counter(), 0
    for lines in corpus_poems(corpus):
        chars = sorted({c for line in lines for c in line if is_han(c)})
        if not lines or len(lines) > 8:
            continue
        n += 1
        docs.update(chars)
        for i, a in enumerate(chars):
            for b in chars[i + 1:]:
                pairs[a, b] += 1
    known = {c for c, _ in docs.most_common(KNOWN)}
    proposed = {c for c, _ in docs.most_common(PROPOSED)}
    found: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for (a, b), k in pairs.items():
        if k < MIN_POEMS or a not in known or b not in known:
            continue
        pmi = math.log(k * n / (docs[a] * docs[b]))
        if pmi > MIN_PMI:
            if b in proposed:
                found[a].append((pmi, b))
            if a in proposed:
                found[b].append((pmi, a))
    return {c: "".join(b for _, b in sorted(found[c], reverse=True)[:KEPT]) for c in sorted(found)}


@lru_cache(maxsize=1)
def associates() -> dict[str, str]:
    if not THEMES_FILE.exists():
        return {}
    return json.loads(THEMES_FILE.read_text(encoding="utf-8"))["associates"]


def expand(theme: str, count: int, rng: random.Random, exclude=frozenset()) -> str:
    """`count` characters associated with the theme's (several of its characters' associates first), drawn
    among the best few so that seeds vary; none of the theme's, none in `exclude`."""
    scores: Counter = Counter()
    for ch in theme:
        for rank, other in enumerate(associates().get(ch, "")):
            scores[other] += KEPT - rank
    pool = [c for c, _ in scores.most_common() if c not in theme and c not in exclude]
    out = []
    while pool and len(out) < count:
        pick = rng.choice(pool[:3])
        out.append(pick)
        pool.remove(pick)
    return "".join(out)


if __name__ == "__main__":
    from atelier.common.files import atomic_write_json

    found = derive(Path(sys.argv[1]))
    atomic_write_json(THEMES_FILE, {"source": sys.argv[1], "min_poems": MIN_POEMS, "min_pmi": MIN_PMI,
                                    "associates": found})
    print(f"{len(found)} characters with associates → {THEMES_FILE}")

__all__ = ["associates", "derive", "expand"]
