"""Evaluate a tune model: does what it writes parse, scan, sound like the corpus, and is it new?

    .venv/bin/python benchmarks/music_eval.py [--model atelier/assets/models/folk-tunes] [--n 200] \\
        [--data ../shared/data/music] [--server-tunes 10] [--threads 1]

Three columns, measured in the same run:
  held-out   the Nottingham tunes the model never trained on (the validation split)
  masked     n tunes written as POST /api/music writes them (the bar-keeping mask, AABB form,
             temperature 1, top-p 0.95), meters and keys drawn like the corpus's
  unmasked   the same requests and seeds, sampled without the mask (the baseline)
Rows: parse rate; share of bars of the right length (a pickup and the last bar aside); tunes
ending on the tonic; distance (total variation, 0–1) of the pitch-class histogram relative to
the tonic, and of the interval histogram, from the held-out tunes'; AABB tunes whose repeats
close correctly; chord symbols per bar; tunes sharing a 4-bar sequence with a training tune (in any key); tokens/s.
Then the speed through the real server: tunes/s and time to the first bar (streaming).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from atelier.families.abc_gpt import family  # noqa: E402
from atelier.music.abc import AbcError, parse  # noqa: E402
from atelier.music.compose import TuneRequest, compose  # noqa: E402
from atelier.music.score import performance  # noqa: E402
from atelier.music.tokens import BARS, read_corpus, tokenize, write_abc  # noqa: E402
from atelier.training.music import abc_files, held_out, in_every_key  # noqa: E402


# -- what a tune is made of -------------------------------------------------------------------

def melody(tune) -> list[int]:
    return [n.pitch for n in performance(tune).notes]


def tonic(tune) -> int:
    return tune.key.tonic_pitch_class


def histogram(values, lo: int, hi: int) -> list[float]:
    counts = Counter(min(max(v, lo), hi) for v in values)
    total = sum(counts.values()) or 1
    return [counts[v] / total for v in range(lo, hi + 1)]


def distance(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def bars_of(canonical: str) -> list[str]:
    """The music of each bar, chord symbols and spaces left out (what novelty compares)."""
    body = [t for t in tokenize(canonical.split("\n", 2)[2]) if not t.startswith('"') and t != " "]
    bars, current = [], []
    for t in body:
        if t in BARS or t in ("[1", "[2"):
            if current:
                bars.append("".join(current))
            current = []
        else:
            current.append(t)
    return bars + (["".join(current)] if current else [])


def windows(canonical: str, size: int = 4) -> set[tuple[str, ...]]:
    bars = bars_of(canonical)
    return {tuple(bars[i:i + size]) for i in range(len(bars) - size + 1)}


def repeats_close(tune) -> bool:
    """Every |: is closed by a :| before the next opens, and a [2 follows the :| of its [1."""
    open_, in_first, last = False, False, None
    for t in tune.tokens:
        if t.kind == "bar":
            if t.text == "|:":
                if open_:
                    return False
                open_ = True
            elif t.text in (":|", ":|]"):
                open_ = False
            elif ":" in t.text:  # :: closes and opens
                open_ = True
        elif t.kind == "ending":
            if t.text == "1":
                in_first = True
            elif t.text == "2":
                if not in_first or last is None or ":" not in last:
                    return False
                in_first = False
        if t.kind == "bar":
            last = t.text
    return not open_ and not in_first


# -- measuring a set of tunes ---------------------------------------------------------------------

def measure(abcs: list[str], canonicals: list[str], reference: dict | None, training: set) -> dict:
    parsed, bars_ok, bars_all, tonic_end, pcs, intervals, closes, copied = 0, 0, 0, 0, [], [], 0, 0
    chords, bars_written = 0, 0
    for abc, canon in zip(abcs, canonicals):
        try:
            tune = parse(abc)
            notes = melody(tune)
        except (AbcError, ValueError):
            continue
        parsed += 1
        inner = tune.bars[1:-1] if tune.bars and tune.bars[0].number == 0 else tune.bars[:-1]
        bars_all += len(inner)
        bars_ok += sum(b.ok for b in inner)  # full, or a short bar closing a section by a pickup
        if notes and notes[-1] % 12 == tonic(tune):
            tonic_end += 1
        pcs += [(p - tonic(tune)) % 12 for p in notes]
        intervals += [b - a for a, b in zip(notes, notes[1:])]
        closes += repeats_close(tune)
        chords += sum(t.kind == "chord_symbol" for t in tune.tokens)
        bars_written += len(tune.bars)
        if training and windows(canon) & training:
            copied += 1
    n = len(abcs)
    out = {"tunes": n, "parse rate": parsed / n, "bars of the right length": bars_ok / max(bars_all, 1),
           "end on the tonic": tonic_end / max(parsed, 1), "repeats close correctly": closes / max(parsed, 1),
           "chord symbols per bar": chords / max(bars_written, 1),
           "pitch classes": histogram(pcs, 0, 11), "intervals": histogram(intervals, -12, 12)}
    if training:
        out["share a 4-bar sequence with training"] = copied / n
    if reference is not None:
        out["pitch-class distance"] = distance(out["pitch classes"], reference["pitch classes"])
        out["interval distance"] = distance(out["intervals"], reference["intervals"])
    return out


def generate(model, requests: list[TuneRequest], constrained: bool) -> tuple[list[str], list[str], float]:
    abcs, canonicals, tokens = [], [], 0
    started = time.perf_counter()
    for r in requests:
        c = compose(model.model, model.tokenizer, model.vocab, r, constrained=constrained)
        abcs.append(c.abc)
        canonicals.append(c.canonical)
        tokens += c.tokens
    return abcs, canonicals, tokens / (time.perf_counter() - started)


def through_server(model_dir: Path, count: int) -> dict:
    """Tunes/s (one client, one at a time) and time to the first bar of a streamed tune."""
    import tempfile

    from conftest import LiveServer, admin_http, make_settings

    with tempfile.TemporaryDirectory() as home, LiveServer(make_settings(Path(home))) as live, admin_http(live) as http:
        http.timeout = 120
        http.post("/api/music", json={"bars": 4, "seed": 0})  # load the model
        started = time.perf_counter()
        for seed in range(count):
            assert http.post("/api/music", json={"seed": seed}).status_code == 200
        per_s = count / (time.perf_counter() - started)
        firsts = []
        for seed in range(count):
            t0 = time.perf_counter()
            first = None
            with http.stream("POST", "/api/music", json={"seed": seed, "stream": True}) as r:
                for line in r.iter_lines():  # read to the end: a client that leaves lets its tune finish first
                    if first is None and line.startswith("event: bar"):
                        first = time.perf_counter() - t0
            firsts.append(first)
        firsts.sort()
    return {"tunes/s": per_s, "first bar p50 (s)": firsts[len(firsts) // 2], "first bar max (s)": firsts[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "atelier" / "assets" / "models" / "folk-tunes"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "music"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--server-tunes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts, _ = read_corpus(abc_files(args.data))
    train = [t for t in texts if not held_out(t, 0.05)]
    val = [t for t in texts if held_out(t, 0.05)]
    training = set().union(*(windows(t) for t in in_every_key(train)))
    model = family.load(Path(args.model))
    rng = random.Random(0)
    heads = [(t.split("\n")[0][2:], t.split("\n")[1][2:]) for t in train]
    requests = []
    for seed in range(args.n):
        meter, key = rng.choice(heads)
        requests.append(TuneRequest(meter=meter, key=key, seed=seed, temperature=1.0, top_p=0.95))
    reference = measure([write_abc(t) for t in val], val, None, set())
    masked = measure(*generate(model, requests, True)[:2], reference, training)
    masked_speed = generate(model, requests[:5], True)[2]
    unmasked_abcs, unmasked_canon, unmasked_speed = generate(model, requests, False)
    unmasked = measure(unmasked_abcs, unmasked_canon, reference, training)
    reference |= {"pitch-class distance": 0.0, "interval distance": 0.0}
    rows = ["tunes", "parse rate", "bars of the right length", "end on the tonic", "repeats close correctly",
            "chord symbols per bar",
            "pitch-class distance", "interval distance", "share a 4-bar sequence with training"]
    print(f"\n{'':40} {'held-out':>10} {'masked':>10} {'unmasked':>10}")
    for row in rows:
        cells = [col.get(row) for col in (reference, masked, unmasked)]
        print(f"{row:40} " + " ".join(f"{c:>10.3f}" if isinstance(c, float) else f"{str(c if c is not None else '—'):>10}"
                                      for c in cells))
    server = through_server(Path(args.model), args.server_tunes)
    print(f"\nthrough the server (one client, {args.server_tunes} AABB tunes): {server['tunes/s']:.2f} tunes/s, "
          f"first bar p50 {server['first bar p50 (s)'] * 1000:.0f} ms, max {server['first bar max (s)'] * 1000:.0f} ms")
    print(f"in process: {masked_speed:.0f} tokens/s masked (one tune), {unmasked_speed:.0f} tokens/s unmasked")
    if args.json:
        drop = ("pitch classes", "intervals")
        Path(args.json).write_text(json.dumps({"held_out": {k: v for k, v in reference.items() if k not in drop},
                                               "masked": {k: v for k, v in masked.items() if k not in drop},
                                               "unmasked": {k: v for k, v in unmasked.items() if k not in drop},
                                               "server": server}, indent=1))


if __name__ == "__main__":
    main()
