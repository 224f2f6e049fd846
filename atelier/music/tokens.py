"""The model's view of a tune: canonical ABC, cut into tokens as folk-rnn cuts it.

A tune becomes `M:6/8\nK:D\n` and one line of music in a canonical spelling: unit length
1/8 always (the request's `unit` only changes how the result is written), one token per
pitch (accidental, letter and octave together), per length, per bar line, per chord
symbol; triplets, ties, rolls and spaces (they group notes under one beam) are tokens too.
Broken rhythm is written out (`A>B` becomes `A3/2B/2`, as the Nottingham tunes write it). Grace notes, slurs, decorations other than the roll, annotations and part
labels are dropped. Written back (`write_abc`), the line breaks every four bars.

Transposing canonical text to another key is how the training set learns every key
(folk-rnn's augmentation): `transpose(text, semitones)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from atelier.music.abc import Token, Tune, parse, pitches_of
from atelier.music.theory import TheoryError, Transposition, note_parts, note_text, parse_key

UNIT = Fraction(1, 8)
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
CHORD_RE = re.compile(r"^[A-G][#b]?(?:m|min|maj|dim|aug|sus|add|[0-9]|\+|-)*(?:/[A-G][#b]?)?$")
BARS = ("|", "||", "|]", "|:", ":|")
PITCH = re.compile(r"[=^_]{0,2}[A-Ga-g][,']*")  # a pitch token: accidental, letter, octave marks
LENGTH = re.compile(r"\d+/\d+|/\d+|\d+")  # a length token, in eighths
TOKEN_RE = re.compile(rf'M:\S+|K:\S+|"[^"]*"|:\||\|:|\|\]|\|\||\||\[[12]|\(3|{PITCH.pattern}|z|{LENGTH.pattern}|>|<|-|~| |\n')


def is_pitch(token: str) -> bool:
    return PITCH.fullmatch(token) is not None


def length_of(token: str) -> Fraction | None:
    """A length token's value in eighths ('3/2', '/2', '4'); None for any other token."""
    if not LENGTH.fullmatch(token):
        return None
    return Fraction(1, int(token[1:])) if token.startswith("/") else Fraction(token)


class NotCanonical(ValueError):
    """A tune uses something the model's tokens cannot say (another tuplet, a key change …)."""


def length_text(length: Fraction) -> str:
    """A length in eighths → its canonical token ('' for one unit)."""
    if length == 1:
        return ""
    if length.denominator == 1:
        return str(length.numerator)
    if length.numerator == 1:
        return f"/{length.denominator}"
    return f"{length.numerator}/{length.denominator}"


def canonical(tune: Tune) -> str:
    """A parsed tune → canonical text (NotCanonical when it cannot be said in the model's tokens)."""
    scale = tune.unit / UNIT
    out: list[str] = []
    tuplet_notes = 0

    def emit(text: str) -> None:
        if text in ("|", "||") and not any(o == "z" or is_pitch(o) for o in out):
            return  # a bar line before any music closes nothing
        if text == "-" and out and out[-1] == " ":
            out.pop()
        if text.startswith('"') and out and out[-1].startswith('"'):
            out.pop()  # two chord symbols on one note: the later one sounds
        if text == " " and (not out or out[-1] in (" ",) or out[-1] in BARS or out[-1].startswith(('"', "[", "("))
                            or out[-1] in ("~", ">", "<")):
            return
        if text in BARS + ("[1", "[2") and out and out[-1] == " ":
            out.pop()
        if text in BARS and out and out[-1] in BARS and (out[-1], text) != (":|", "|:"):
            # Bar lines with no music between them say one thing: keep the one with a repeat.
            if ":" in out[-1] and ":" not in text:
                return
            out.pop()
        out.append(text)

    for t in tune.tokens:
        if t.kind == "field":
            name, value = t.text[0], t.text[2:].strip()
            same = {"K": lambda: parse_key(value) == tune.key, "M": lambda: value.replace(" ", "") == tune.meter_text,
                    "L": lambda: value.replace(" ", "") == tune.fields.get("L", "").replace(" ", "")}
            if name in same and not same[name]():
                raise NotCanonical(f"{t.text} changes the key, meter or unit inside the tune")
            continue
        if t.kind in ("note", "chord", "rest"):
            if t.kind == "rest" and t.length < 0:
                raise NotCanonical("Z (bars of rest)")
            # Broken rhythm is written out (A>B → A3/2B/2); a triplet's notes keep their written length.
            length = t.length * scale if tuplet_notes else t.duration / UNIT
            tuplet_notes = max(0, tuplet_notes - 1)
            if t.kind == "rest":
                emit("z")
            else:
                emit(note_text(*pitches_of(t)[0]))  # a chord [ceg] is said by its first note
            emit(length_text(length))
        elif t.kind == "bar":
            bars = {"::": [":|", "|:"], ":||:": [":|", "|:"], ":|:": [":|", "|:"], "[|": ["||"],
                    ":|]": [":|"], "::|": [":|"], "|::": ["|:"], ":||": [":|"], "||:": ["|:"]}.get(t.text, [t.text])
            for b in bars:
                if b not in BARS:
                    raise NotCanonical(f"bar line {t.text}")
                emit(b)
        elif t.kind == "ending":
            if t.text not in ("1", "2"):
                raise NotCanonical(f"ending {t.text}")
            emit(f"[{t.text}")
        elif t.kind == "chord_symbol":
            symbol = t.text.replace(" ", "")
            if CHORD_RE.match(symbol):
                emit(f'"{symbol}"')
        elif t.kind == "tuplet":
            if t.text != "(3":
                raise NotCanonical(f"tuplet {t.text}")
            emit("(3")
            tuplet_notes = 3
        elif t.kind == "tie":
            emit("-")
        elif t.kind == "deco" and t.text == "~":
            emit("~")
        elif t.kind == "space":
            emit(" ")
    while out and out[-1] == " ":
        out.pop()
    body = "".join(out)
    return f"M:{tune.meter_text.replace(' ', '')}\nK:{tune.key.abc()}\n{body}"


def tokenize(text: str) -> list[str]:
    """Canonical text → tokens; ValueError at anything canonical text never holds."""
    tokens, i = [], 0
    for m in TOKEN_RE.finditer(text):
        if m.start() != i:
            raise ValueError(f"{text[i:m.start()]!r} at {i} is not a canonical token")
        tokens.append(m[0])
        i = m.end()
    if i != len(text):
        raise ValueError(f"{text[i:]!r} at {i} is not a canonical token")
    return tokens


def transpose(text: str, semitones: int) -> str:
    """Canonical text moved by `semitones` (TheoryError when a note cannot be spelt)."""
    tokens = tokenize(text)
    key = parse_key(next(t for t in tokens if t.startswith("K:"))[2:])
    move = Transposition.by(key, semitones)
    out = []
    for t in tokens:
        if t.startswith("K:"):
            out.append(f"K:{move.target.abc()}")
        elif t.startswith('"'):
            out.append(f'"{move.chord(t[1:-1])}"')
        elif is_pitch(t):
            out.append(note_text(*move.note(*note_parts(t))))
        else:
            out.append(t)
    return "".join(out)


def pitch_range(text: str) -> tuple[int, int]:
    """Lowest and highest written letter-octave (in diatonic steps from middle C)."""
    steps = [note_parts(t)[2] * 7 + "CDEFGAB".index(note_parts(t)[1]) for t in tokenize(text)
             if is_pitch(t)]
    return (min(steps), max(steps)) if steps else (0, 0)


def write_abc(text: str, *, title: str | None = None, number: int = 1, unit: Fraction = UNIT,
              tempo: int | None = None, chords: bool = True, bars_per_line: int = 4) -> str:
    """Canonical text → a full ABC tune: X:, T:, M:, L:, Q:, K: and the music, four bars a line."""
    tokens = tokenize(text)
    meter = next(t for t in tokens if t.startswith("M:"))
    key = next(t for t in tokens if t.startswith("K:"))
    scale = UNIT / unit
    lines, line, bars = [], [], 0
    music = [t for t in tokens if not t.startswith(("M:", "K:")) and t != "\n"]
    for i, t in enumerate(music):
        if t.startswith('"') and not chords:
            continue
        if length_of(t) is not None:
            continue  # written with its note below
        if t == "z" or is_pitch(t):
            length = length_of(music[i + 1]) if i + 1 < len(music) else None
            line.append(t + length_text((length or Fraction(1)) * scale))
            continue
        line.append(t)
        if t in BARS:
            bars += 1
            nxt = music[i + 1] if i + 1 < len(music) else ""
            if bars % bars_per_line == 0 and nxt not in ("[1", "[2", "|:") and i + 1 < len(music):
                lines.append("".join(line))
                line = []
    if line:
        lines.append("".join(line))
    header = [f"X:{number}", f"T:{title or 'Untitled'}", meter, f"L:1/{unit.denominator}"]
    if tempo:
        header.append(f"Q:1/4={tempo}")
    return "\n".join(header + [key] + lines) + "\n"


def read_corpus(paths: list[Path]) -> tuple[list[str], dict]:
    """ABC files → canonical texts of every tune that parses, scans and can be said in tokens."""
    from atelier.music.abc import AbcError, split_tunes

    texts, skipped = [], {"parse": 0, "bars": 0, "tokens": 0}
    for path in paths:
        for n, (line, chunk) in enumerate(split_tunes(Path(path).read_text(encoding="utf-8", errors="replace")), 1):
            try:
                tune = parse(chunk, tune_number=n, first_line=line)
            except AbcError:
                skipped["parse"] += 1
                continue
            if not tune.ok or tune.meter is None:
                skipped["bars"] += 1
                continue
            try:
                texts.append(canonical(tune))
            except (NotCanonical, TheoryError):
                skipped["tokens"] += 1
    return texts, skipped


@dataclass
class AbcTokenizer:
    """Canonical ABC tokens ↔ ids; the special tokens come first."""

    tokens: list[str]

    def __post_init__(self):
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (self.index[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def train(cls, texts: list[str], extra: list[str] = ()) -> "AbcTokenizer":
        seen = {t for text in texts for t in tokenize(text)} | set(extra)
        return cls(list(SPECIALS) + sorted(seen))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(t, self.unk_id) for t in tokenize(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i >= len(SPECIALS))

    def token_text(self, token: int) -> str:
        return self.tokens[token]

    def save(self, path: Path) -> None:
        from atelier.common.files import atomic_write_json

        atomic_write_json(Path(path), {"kind": "abc", "tokens": self.tokens})

    @classmethod
    def load(cls, path: Path) -> "AbcTokenizer":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("kind") != "abc" or not isinstance(data.get("tokens"), list):
            raise ValueError(f"{path} is not an ABC tokenizer")
        return cls([str(t) for t in data["tokens"]])


__all__ = ["AbcTokenizer", "NotCanonical", "Token", "canonical", "read_corpus", "tokenize", "transpose",
           "write_abc"]
