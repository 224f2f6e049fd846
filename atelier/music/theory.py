"""Keys, modes, pitches and transposition: the little music theory ABC needs.

A key is a tonic and a mode; what it does to notes is its signature, the alteration
(−1 flat, 0, +1 sharp) each letter takes unless a note says otherwise. A note's pitch is a
MIDI number: `C` is middle C (60), `c` the octave above, `,` and `'` move an octave.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTERS = "CDEFGAB"
NATURAL = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
SHARP_ORDER = "FCGDAEB"  # the order sharps enter a signature; flats enter in reverse
# Sharps in the major key on each tonic (flats negative).
MAJOR_SHARPS = {"C": 0, "G": 1, "D": 2, "A": 3, "E": 4, "B": 5, "F#": 6, "C#": 7,
                "F": -1, "Bb": -2, "Eb": -3, "Ab": -4, "Db": -5, "Gb": -6, "Cb": -7}
# Each mode's signature relative to the major key on the same tonic (Dorian on D = C major: −2).
MODES = {"maj": 0, "ion": 0, "min": -3, "aeo": -3, "mix": -1, "dor": -2, "phr": -4, "lyd": 1, "loc": -5}
MODE_SPELLING = {"maj": "", "min": "m", "mix": "mix", "dor": "dor", "phr": "phr", "lyd": "lyd", "loc": "loc"}
ACCIDENTALS = {"^^": 2, "^": 1, "=": 0, "_": -1, "__": -2}
ACCIDENTAL_TEXT = {v: k for k, v in ACCIDENTALS.items() if k != "="}
KEY_RE = re.compile(r"^\s*(?P<tonic>[A-Ga-g][#b]?)\s*(?P<mode>[A-Za-z]*)\s*$")


class TheoryError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    tonic: str  # "D", "F#", "Bb"
    mode: str  # "maj", "min", "dor", "mix", "phr", "lyd", "loc"

    @property
    def sharps(self) -> int:
        return MAJOR_SHARPS[self.tonic] + MODES[self.mode]

    @property
    def signature(self) -> dict[str, int]:
        """letter → alteration the key gives it."""
        n = self.sharps
        sig = dict.fromkeys(LETTERS, 0)
        for letter in SHARP_ORDER[:n] if n > 0 else SHARP_ORDER[::-1][: -n]:
            sig[letter] = 1 if n > 0 else -1
        return sig

    @property
    def tonic_pitch_class(self) -> int:
        return (NATURAL[self.tonic[0]] + {"#": 1, "b": -1}.get(self.tonic[1:], 0)) % 12

    def abc(self) -> str:
        """The K: value, spelt the common way: D, Em, Ador, Dmix."""
        return self.tonic + MODE_SPELLING[self.mode]


def parse_key(text: str) -> Key:
    """A K: value → Key. Accepts D, Dmaj, Em, Emin, Ador, A Dorian, F#m, Bb, HP (Highland pipes)."""
    value = text.split("%")[0].strip()
    if value in ("", "none"):
        return Key("C", "maj")
    if value in ("HP", "Hp"):  # bagpipe music: written with no signature (HP) or two sharps (Hp)
        return Key("C", "maj") if value == "HP" else Key("D", "maj")
    first = value.split()[0] if " " in value and value.split()[1][:3].lower() not in MODES else value
    m = KEY_RE.match(first)
    if not m:
        raise TheoryError(f"K:{value} is not a key (write e.g. D, Em, Ador, Dmix, Bb)")
    tonic = m["tonic"][0].upper() + m["tonic"][1:]
    word = m["mode"].lower()
    mode = "min" if word == "m" else ("maj" if word == "" else word[:3])
    if mode not in MODES:
        raise TheoryError(f"K:{value}: unknown mode {m['mode']!r} (modes: maj, m/min, dor, mix, phr, lyd, loc)")
    if tonic not in MAJOR_SHARPS or abs(MAJOR_SHARPS[tonic] + MODES[mode]) > 7:
        raise TheoryError(f"K:{value} has more than 7 sharps or flats")
    return Key(tonic, "min" if mode == "aeo" else "maj" if mode == "ion" else mode)


def key_with_sharps(sharps: int, mode: str) -> Key:
    """The key of `mode` whose signature has `sharps` sharps (negative: flats)."""
    major = sharps - MODES[mode]
    for tonic, n in MAJOR_SHARPS.items():
        if n == major:
            return Key(tonic, mode)
    raise TheoryError(f"no {mode} key with {sharps} sharps")


def pitch(letter: str, octave: int, alteration: int) -> int:
    """MIDI pitch of letter (C–B), octave (0 = the one starting at middle C) and alteration."""
    return 60 + 12 * octave + NATURAL[letter] + alteration


def note_parts(text: str) -> tuple[str, str, int]:
    """'^f,' → ('^', 'F', 0): accidental, letter, octave (C = 0, c = 1, C, = −1, c' = 2)."""
    i = 0
    while i < len(text) and text[i] in "^=_":
        i += 1
    acc, letter, marks = text[:i], text[i], text[i + 1:]
    octave = (1 if letter.islower() else 0) + marks.count("'") - marks.count(",")
    return acc, letter.upper(), octave


def note_text(acc: str, letter: str, octave: int) -> str:
    """Inverse of note_parts, in the shortest spelling: (…, 'F', 1) → 'f', (…, 'C', −1) → 'C,'."""
    if octave >= 1:
        return acc + letter.lower() + "'" * (octave - 1)
    return acc + letter + "," * (-octave)


# -- transposition ----------------------------------------------------------------------

@dataclass(frozen=True)
class Transposition:
    """Moving a tune by `semitones`, from key `source` to `target` (spelt with the fewest accidentals)."""

    semitones: int
    source: Key
    target: Key
    steps: int  # how many letters each note moves (negative: down)

    @classmethod
    def by(cls, source: Key, semitones: int) -> "Transposition":
        sharps = (source.sharps + 7 * semitones) % 12
        if sharps > 6:
            sharps -= 12
        target = key_with_sharps(sharps, source.mode)
        k = (LETTERS.index(target.tonic[0]) - LETTERS.index(source.tonic[0])) % 7
        # Of the two ways round, the one whose letter distance matches the semitones.
        steps = min((k, k - 7), key=lambda s: abs(_natural_span(source.tonic[0], s) - semitones))
        return cls(semitones, source, target, steps)

    def note(self, acc: str, letter: str, octave: int) -> tuple[str, str, int]:
        """One written note moved. Notes with no accidental stay without one (the target's
        signature gives them the right pitch); written accidentals are re-spelt absolutely."""
        index = LETTERS.index(letter) + self.steps
        new_letter, new_octave = LETTERS[index % 7], octave + index // 7
        if not acc:
            return "", new_letter, new_octave
        old = pitch(letter, octave, ACCIDENTALS[acc]) + self.semitones
        alteration = old - pitch(new_letter, new_octave, 0)
        if alteration not in ACCIDENTALS.values():
            raise TheoryError(f"cannot spell {acc}{letter} moved by {self.semitones} semitones")
        return ("=" if alteration == 0 else ACCIDENTAL_TEXT[alteration]), new_letter, new_octave

    def chord(self, symbol: str) -> str:
        """A chord symbol's root (and bass) moved: "D7" → "E7", "G/B" → "A/C#"."""
        def move(root: str) -> str:
            letter, alt = root[0], {"#": 1, "b": -1}.get(root[1:], 0)
            index = LETTERS.index(letter) + self.steps
            new_letter = LETTERS[index % 7]
            alteration = (NATURAL[letter] + alt + self.semitones - NATURAL[new_letter] + 6) % 12 - 6
            if abs(alteration) > 1:
                return root  # a double accidental: leave the symbol as it was
            return new_letter + {1: "#", -1: "b", 0: ""}[alteration]

        m = re.match(r"^([A-G][#b]?)(.*?)(?:/([A-G][#b]?))?$", symbol)
        if not m:
            return symbol
        return move(m[1]) + m[2] + (f"/{move(m[3])}" if m[3] else "")


def _natural_span(tonic_letter: str, steps: int) -> int:
    """Semitones between a letter and the letter `steps` away (naturals, octave-aware)."""
    i = LETTERS.index(tonic_letter)
    j = i + steps
    return NATURAL[LETTERS[j % 7]] + 12 * (j // 7) - NATURAL[LETTERS[i]]
