"""How Tang poets read a 多音字 (polyphone): its tone in context, and the rhyme groups they rhymed it in.

The rhyme tables list every reading a character has: 思 is 平 (to think) and 仄 (a thought),
逢 is in 二冬 and in 三江. A composer that takes whichever reading fits writes lines a poet
rejects (相思 used as 仄), and a checker that accepts any reading passes them. This module
learns from the 近体 poems of the Tang corpus which reading each polyphone takes:

1. Each poem shaped like a 绝句 or 律诗 is matched to its form's patterns on its *monophonic*
   characters; a poem that fits a pattern with at most one break is taken as regulated.
2. Every polyphone at a position whose tone the pattern fixes (平 or 仄, not 中) is one vote
   for that reading — for the character alone, for it after the character before it (相思),
   and for it before the character after it (思归).
3. A reading decides when its votes are many and one-sided (MIN_VOTES, MIN_SHARE); a
   character used both ways with one meaning (看 过 听 望 忘 醒) stays free.
4. Rhymes: each regulated poem's rhyme group is the one most of its rhyme characters share;
   a rhyme character in several groups counts for the poem's group. A character rhymes only
   in the groups the corpus shows it rhymed in (逢 in 二冬, 居 in 六鱼), when it was rhymed at
   all; a rare reading counts where poets used it.

The derived table ships as data/readings.json (the server runs without the corpus); rebuild
it with `python -m atelier.poetry.readings ../shared/data/poetry/tang.jsonl ../shared/data/poetry/songci.jsonl`
(the ci corpus adds the tune names a line must not open with: 渔家, 水调 …).

    >>> reading("相思", 1), reading("秋思", 1)
    (('平', '相思'), ('仄', '秋思'))
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from atelier.poetry.prosody import EITHER, PACKAGE_DATA, is_han, pingshui, tone_fits

READINGS_FILE = PACKAGE_DATA / "readings.json"
MIN_VOTES = 4  # votes a reading needs to decide (alone or in a context)
MIN_SHARE = 0.85  # …and the share of the character's votes it must hold
MIN_RHYMES = 2  # times a character must be rhymed in a group for that group to count…
MIN_RHYME_SHARE = 0.1  # …and the share of its rhymes that group must hold


# -- deriving the table from the corpus -------------------------------------------------------


def _regulated(lines: list[str], tones_t) -> tuple[object, list[str]] | None:
    """(pattern, required tone per position, rhyme tone applied) of the best-fitting 近体 pattern, if the poem
    breaks it at most once on its monophonic characters."""
    from atelier.poetry.forms import FORMS

    n, width = len(lines), len(lines[0])
    key = {(4, 5): "wujue", (4, 7): "qijue", (8, 5): "wulv", (8, 7): "qilv"}.get((n, width))
    if key is None or any(len(l) != width for l in lines):
        return None
    best = None
    for pattern in FORMS[key].patterns:
        required = []
        for i, spec in enumerate(pattern.lines):
            row = list(spec.tones)
            if spec.rhyme is not None:
                row[-1] = pattern.rhyme_tone(i) or row[-1]
            required.append(row)
        breaks = 0
        for line, row in zip(lines, required):
            for ch, req in zip(line, row):
                tones = tones_t.tones(ch)
                if len(tones) == 1 and not tone_fits(req, tones):
                    breaks += 1
        if best is None or breaks < best[0]:
            best = (breaks, pattern, required)
    return (best[1], best[2]) if best and best[0] <= 1 else None


def title_debris(corpus: Path, songci: Path, min_tune_poems: int = 5) -> list[str]:
    """Line openings that are a ci tune's name rather than verse (渔家 of 渔家傲, 水调 of 水调歌头): the first
    two characters of every tune with `min_tune_poems` ci, unless Tang poets often open a line with them."""
    from atelier.poetry.corpus import corpus_poems

    tunes = Counter(json.loads(raw).get("rhythmic", "") for raw in songci.read_text(encoding="utf-8").splitlines())
    prefixes = {name[:2] for name, k in tunes.items() if k >= min_tune_poems and len(name) >= 3}
    openings = Counter(line[:2] for lines in corpus_poems(corpus) for line in lines)
    return sorted(p for p in prefixes if openings[p] < 20)


def derive(corpus: Path, songci: Path | None = None) -> dict:
    """The readings table from a chinese-poetry JSONL file (traditional script is converted); with the
    ci corpus, also the tune-name openings the composer must not start a line with."""
    from atelier.poetry.corpus import corpus_poems

    tones_t = pingshui()
    alone: dict[str, Counter] = defaultdict(Counter)
    left: dict[str, Counter] = defaultdict(Counter)  # "相思" → votes for 思
    right: dict[str, Counter] = defaultdict(Counter)  # "思归" → votes for 思
    rhymed: dict[str, Counter] = defaultdict(Counter)
    poems = regulated = 0
    for lines in corpus_poems(corpus):
        if not lines or not all(all(is_han(c) for c in l) for l in lines):
            continue
        poems += 1
        fit = _regulated(lines, tones_t)
        if fit is None:
            continue
        regulated += 1
        pattern, required = fit
        for line, row in zip(lines, required):
            for p, (ch, req) in enumerate(zip(line, row)):
                if req == EITHER or len(tones_t.tones(ch)) != 2:
                    continue
                alone[ch][req] += 1
                if p > 0:
                    left[line[p - 1] + ch][req] += 1
                if p + 1 < len(line):
                    right[ch + line[p + 1]][req] += 1
        # the first line may borrow a neighbouring group (首句借韵): only the other rhymes vote
        ends = [line[-1] for i, (line, spec) in enumerate(zip(lines, pattern.lines)) if spec.rhyme is not None and i]
        votes = Counter(g for ch in ends for g in tones_t.groups_of(ch))
        if votes:
            group = max(sorted(votes), key=lambda g: votes[g])
            for ch in ends:
                if group in tones_t.groups_of(ch):
                    rhymed[ch][tones_t.groups[group].name] += 1

    def decided(counts: Counter) -> str | None:
        total = sum(counts.values())
        tone, votes = max(counts.items(), key=lambda kv: kv[1]) if counts else (None, 0)
        return tone if votes >= MIN_VOTES and votes >= MIN_SHARE * total else None

    tones = {ch: t for ch, c in sorted(alone.items()) if (t := decided(c))}
    contexts = {}
    for table in (left, right):
        for pair, c in sorted(table.items()):
            t = decided(c)
            ch = pair[1] if table is left else pair[0]
            if t and t != tones.get(ch):  # only contexts that say more than the character alone
                contexts[pair] = t
    rhymes = {}
    for ch, c in sorted(rhymed.items()):
        if len(tones_t.groups_of(ch)) > 1:
            total = sum(c.values())
            rhymes[ch] = sorted(g for g, k in c.items() if k >= MIN_RHYMES and k >= MIN_RHYME_SHARE * total) \
                or [c.most_common(1)[0][0]]
    debris = title_debris(corpus, songci) if songci else []
    return {"source": str(corpus), "poems": poems, "regulated": regulated, "min_votes": MIN_VOTES, "debris": debris,
            "min_share": MIN_SHARE, "tones": tones, "left": {k: v for k, v in contexts.items() if k in left},
            "right": {k: v for k, v in contexts.items() if k in right and k not in left}, "rhymes": rhymes,
            "free": sorted(ch for ch, c in alone.items() if ch not in tones and sum(c.values()) >= MIN_VOTES)}


# -- reading a character in its line ----------------------------------------------------------


@lru_cache(maxsize=1)
def table() -> dict:
    if not READINGS_FILE.exists():
        return {"tones": {}, "left": {}, "right": {}, "rhymes": {}, "debris": []}
    return json.loads(READINGS_FILE.read_text(encoding="utf-8"))


def reading(line: str, p: int) -> tuple[str, str] | None:
    """(tone, what decided it) for the polyphone at line[p], or None when it is free (or not a polyphone
    the corpus decided): the pair with the character before it (相思), then after it (思归), then the
    character alone."""
    t, ch = table(), line[p]
    if p > 0 and (r := t["left"].get(line[p - 1] + ch)):
        return r, line[p - 1] + ch
    if p + 1 < len(line) and (r := t["right"].get(ch + line[p + 1])):
        return r, ch + line[p + 1]
    return (t["tones"][ch], ch) if ch in t["tones"] else None


def rhyme_groups(ch: str) -> set[int] | None:
    """The pingshui groups (indices) `ch` may rhyme in when it is in several: those the corpus shows it
    rhymed in; never rhymed there, those of its usual tone (梦 rhymes as 仄); None: no restriction."""
    tones_t = pingshui()
    groups = tones_t.groups_of(ch)
    if len(groups) < 2:
        return None
    t = table()
    if ch in t["rhymes"]:
        return {g for g in groups if tones_t.groups[g].name in t["rhymes"][ch]}
    if ch in t["tones"]:
        return {g for g in groups if tones_t.groups[g].tone == t["tones"][ch]}
    return None


if __name__ == "__main__":
    from atelier.common.files import atomic_write_json

    out = derive(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    atomic_write_json(READINGS_FILE, out)
    print(f"{out['regulated']} of {out['poems']} poems regulated; {len(out['tones'])} polyphones decided alone, "
          f"{len(out['free'])} free, {len(out['left']) + len(out['right'])} contexts, "
          f"{len(out['rhymes'])} rhyme characters restricted, {len(out['debris'])} tune-name openings → {READINGS_FILE}")

__all__ = ["derive", "reading", "rhyme_groups", "table"]
