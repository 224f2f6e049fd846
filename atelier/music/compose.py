"""Write a tune: the model proposes, the bar-keeping mask (constraints.py) disposes.

`compose` starts the model on `<bos> M:6/8 \\n K:D \\n` (and the opening bars a musician
gave, checked bar by bar), then samples one token at a time among those the Scanner
allows, with a KV cache, until the tune ends on its last bar line. The result is checked by
the ABC reader once more: a tune that fails the check is never returned as valid.

Same model, request and seed ⇒ the same tune, byte for byte: each tune samples alone from
its own generator (a batch would change the float sums, and so the draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

from atelier.music.abc import AbcError, parse, parse_meter
from atelier.music.constraints import Plan, ScanError, Vocabulary, scanner_for
from atelier.music.theory import parse_key
from atelier.music.tokens import NotCanonical, canonical, tokenize, write_abc

WRAP_UP_MARGIN = 48  # positions left when the tune must head for its last bar line


@dataclass
class TuneRequest:
    meter: str = "6/8"
    key: str = "D"
    unit: Fraction = Fraction(1, 8)
    bars: int = 16
    form: str | None = "AABB"
    prime: str | None = None
    chords: bool = True
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    title: str | None = None


@dataclass
class Composed:
    abc: str
    canonical: str
    report: dict
    seed: int
    tokens: int


class MusicRequestError(ValueError):
    """A request the model cannot honour; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def header_tokens(tokenizer, meter: str, key: str) -> tuple[list[int], str]:
    """`M:… \\n K:… \\n` as ids, and the K: token the model is given. A mode the model never saw
    (Ador, Dmix …) is written under a key it knows with the same signature (G for Ador, G for
    Dmix): the notes are spelt the same, and the tune is labelled with the mode asked for.
    MusicRequestError when the model knows neither the meter nor any key with that signature."""
    try:
        parse_meter(meter)
    except ValueError as e:
        raise MusicRequestError(str(e), "meter") from None
    try:
        key_text = parse_key(key).abc()
    except ValueError as e:
        raise MusicRequestError(str(e), "key") from None
    known = tokenizer.tokens
    m, k = f"M:{meter.replace(' ', '')}", f"K:{key_text}"
    if m not in tokenizer.index:
        meters = sorted(t[2:] for t in known if t.startswith("M:"))
        raise MusicRequestError(f"this model writes in {', '.join(meters)}, not {meter}", "meter")
    if k not in tokenizer.index:
        sharps = parse_key(key).sharps
        same = [t for t in known if t.startswith("K:") and parse_key(t[2:]).sharps == sharps]
        if not same:
            keys = sorted(t[2:] for t in known if t.startswith("K:"))
            raise MusicRequestError(f"this model writes in the keys {', '.join(keys)} (and their modes), not {key}",
                                    "key")
        k = min(same, key=lambda t: (parse_key(t[2:]).mode != "maj", t))
    nl = tokenizer.index["\n"]
    return [tokenizer.index[m], nl, tokenizer.index[k], nl], k


def prime_tokens(tokenizer, request: TuneRequest) -> list[str]:
    """The musician's opening bars in canonical tokens (AbcError with the column where they fail)."""
    text = f"X:1\nM:{request.meter}\nL:1/{request.unit.denominator}\nK:{request.key}\n{request.prime.strip()}\n"
    try:
        tune = parse(text)
        body = canonical(tune).split("\n", 2)[2]
    except AbcError as e:
        raise MusicRequestError(f"prime: column {e.col}: {e.reason}" if e.col else f"prime: {e.reason}",
                                "prime") from None
    except NotCanonical as e:
        raise MusicRequestError(f"prime: {e}", "prime") from None
    tokens = tokenize(body)
    unknown = sorted({t for t in tokens if t not in tokenizer.index})
    if unknown:
        raise MusicRequestError(f"prime: this model has no token for {', '.join(unknown)}", "prime")
    return tokens


def sample(logits: torch.Tensor, allowed: list[bool], temperature: float, top_p: float,
           generator: torch.Generator) -> int:
    """One token among the allowed ones: temperature, then nucleus (top-p), then a draw."""
    mask = torch.tensor(allowed)
    if not bool(mask.any()):
        raise ScanError("no token can continue the tune")  # the Scanner never lets this happen
    logits = logits.float().masked_fill(~mask, float("-inf"))
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def compose(model, tokenizer, vocab: Vocabulary, request: TuneRequest,
            on_bar: Callable[[str], None] | None = None, *, constrained: bool = True) -> Composed:
    """One tune for `request`; `on_bar(canonical text so far)` after every bar line (streaming).

    `constrained=False` samples without the mask (only the special tokens barred) and returns
    whatever comes out, checked or not: the baseline benchmarks/music_eval.py measures against."""
    prefix, given_key = header_tokens(tokenizer, request.meter, request.key)
    plan = Plan(bars=request.bars, form=request.form, chords=request.chords)
    scanner = scanner_for(vocab, tokenizer.tokens, parse_meter(request.meter), parse_key(request.key), plan)
    ids = [tokenizer.bos_id] + prefix
    if request.prime:
        for t in prime_tokens(tokenizer, request):
            i = tokenizer.index[t]
            if not scanner.allowed()[i]:
                raise MusicRequestError(f"prime: {t!r} does not fit there (after {tokenizer.decode(ids[5:])!r}): "
                                        "each bar must be full and the tune must stay in the form asked for", "prime")
            scanner.feed(i)
            ids.append(i)
    context = model.config.n_positions
    margin = min(WRAP_UP_MARGIN, context // 4)
    if len(ids) >= context - margin:
        raise MusicRequestError(f"prime: too long for the model's context of {context} tokens", "prime")
    generator = torch.Generator().manual_seed(request.seed)
    unmasked = [kind != "special" or i == tokenizer.eos_id for i, kind in enumerate(vocab.kinds)]
    cache = model.new_cache(1)
    rows = torch.zeros(1, dtype=torch.long)
    logits, _ = model(torch.tensor([ids]), cache=cache, rows=rows, pos=torch.arange(len(ids))[None])
    while True:
        if len(ids) >= context - margin:
            scanner.wrap_up = True
        allowed = scanner.allowed() if constrained else unmasked
        token = sample(logits[0, -1], allowed, request.temperature, request.top_p, generator)
        if token == tokenizer.eos_id or not constrained and len(ids) + 1 >= context:
            break
        if constrained:
            scanner.feed(token)
        ids.append(token)
        if on_bar is not None and vocab.kinds[token] == "bar":
            on_bar(tokenizer.decode(ids[1:]))
        if len(ids) >= context:
            raise ScanError("the tune ran past the model's context")  # wrap_up makes this unreachable
        logits, _ = model(torch.tensor([[token]]), cache=cache, rows=rows, pos=torch.tensor([[len(ids) - 1]]))
    text = tokenizer.decode(ids[1:]).replace(given_key, f"K:{parse_key(request.key).abc()}", 1)
    if not constrained:  # as sampled: stray headers and all
        abc = f"X:1\nT:{request.title or 'Untitled'}\nL:1/8\n{text}\n"
        return Composed(abc=abc, canonical=text, report={}, seed=request.seed, tokens=len(ids) - 1)
    abc = write_abc(text, title=request.title, unit=request.unit, chords=request.chords)
    tune = parse(abc)
    report = tune.report()
    if not report["valid"]:
        raise ScanError(f"the composed tune fails its check (bars {report['wrong_bars']})")
    return Composed(abc=abc, canonical=text, report=report, seed=request.seed, tokens=len(ids) - 1)
