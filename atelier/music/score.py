"""A parsed tune → a performance: which pitches sound, when, and for how long.

What the renderer (atelier/music/render.py) plays and what a MIDI file holds. Times are in
quarter notes from the start, MIDI's beats; `Performance.seconds` converts them at the tempo.
Everything is computed with Fractions and handed out as floats.

1. Playback order (`playback_order`): repeats taken (`|:` … `:|`, `::`), first and second
   endings chosen, as a folk player reads them.
2. The walk over that order: time advances by each note's duration (abc.parse already applied
   broken rhythm and tuplets); pitches follow the key signature, then accidentals written
   earlier in the bar for the same letter and octave (ABC 2.1 §4.6); ties merge notes.
3. The beat grid: bar lines in playback order, each bar cut into the beats of its meter
   (dotted quarters in 6/8, 9/8, 12/8; quarters otherwise).
4. Chord symbols → the harmony (`Chord`, one per symbol, lasting until the next) and the
   accompaniment a folk pianist plays over it: bass on the first beat of the chord and on the
   bar's strong beats, the chord on the others ("boom-chick").

One tempo per performance: the header's Q:, or the meter's default (`DEFAULT_QPM`); a Q: in
the body is not followed. Nor is a part order (P:AAB in the header): the Nottingham files
write it to describe what their repeat signs already say, so the tune plays as written.
Grace notes, decorations and slurs do not change what sounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise

from atelier.music.abc import Token, Tune, pitches_of
from atelier.music.theory import ACCIDENTALS, NATURAL, parse_key, pitch

Time = Fraction  # quarter notes from the start, while the performance is built

# Quarter notes per minute when the tune has no Q:, by meter: what a session plays, a little
# on the steady side so a learner can follow.
DEFAULT_QPM = {
    (2, 2): 200,  # reels written in cut time: half note = 100
    (4, 4): 140,  # reels, hornpipes, marches
    (2, 4): 140,  # polkas, marches
    (3, 4): 150,  # waltzes, mazurkas: dotted half = 50
    (3, 2): 160,  # triple-time hornpipes: half note = 80
    (6, 4): 180,  # dotted half = 60
}
COMPOUND_QPM = 165  # jigs, slip jigs, slides (6/8, 9/8, 12/8): dotted quarter = 110
FREE_QPM = 120
MAX_TRANSPOSE = 24

# Velocities: an accent on the bar's strong beats gives a tune its lilt.
STRONG_VELOCITY, BEAT_VELOCITY, OFFBEAT_VELOCITY = 96, 86, 76
BASS_VELOCITY, CHORD_VELOCITY = 84, 66
CHORD_LOW, BASS_LOW = 55, 40  # chords voiced within G3–F#4, bass notes within E2–D#3


@dataclass
class Note:
    start: float  # quarter notes from the start
    duration: float  # quarter notes
    pitch: int  # MIDI
    velocity: int  # 1–127


@dataclass
class Chord:
    """One chord symbol's span: the chord as voiced, its bass note and the symbol as written."""

    start: float  # quarter notes
    duration: float  # quarter notes
    pitches: list[int]  # close position within CHORD_LOW … CHORD_LOW + 11
    bass: int
    symbol: str


@dataclass
class Performance:
    notes: list[Note]  # the melody, ties merged, in order of start
    chords: list[Chord]  # the harmony, one per chord symbol
    accompaniment: list[Note]  # what the accompanist plays over it: bass notes and chords
    tempo_qpm: float
    meter: tuple[int, int] | None  # the opening meter, (6, 8); None in free meter
    length: float  # quarter notes, rests included
    title: str = ""
    meters: list[tuple[float, tuple[int, int] | None]] = field(default_factory=list)  # (start, meter) per change

    @property
    def seconds(self) -> float:
        return self.length * 60 / self.tempo_qpm

    def seconds_at(self, quarters: float) -> float:
        return quarters * 60 / self.tempo_qpm


# -- meters and tempo ---------------------------------------------------------------------

def meter_signature(text: str) -> tuple[int, int] | None:
    """An M: value → (numerator, denominator), which Tune.meter (a Fraction) cannot tell apart:
    6/8 and 3/4 are both 3/4 of a whole note. "C" → (4, 4), "C|" → (2, 2), "(2+3)/8" → (5, 8)."""
    value = text.split("%")[0].strip()
    if value == "C":
        return 4, 4
    if value == "C|":
        return 2, 2
    m = re.fullmatch(r"\(?(\d+(?:\+\d+)*)\)?\s*/\s*(\d+)", value)
    if not m:
        return None
    return sum(int(n) for n in m[1].split("+")), int(m[2])


def is_compound(meter: tuple[int, int] | None) -> bool:
    return meter is not None and meter[1] >= 8 and meter[0] % 3 == 0 and meter[0] > 3


def beats_of(meter: tuple[int, int] | None) -> tuple[Fraction, int]:
    """A meter → (beat length in quarter notes, beats per bar), the beats an accompanist plays:
    dotted quarters in compound time; quarters in 2/2 and 3/2 (a reel's piano vamp)."""
    if meter is None:
        return Fraction(1), 4
    num, den = meter
    if is_compound(meter):
        return Fraction(12, den), num // 3
    unit = Fraction(4, den)
    if unit > 1:
        return Fraction(1), int(num * unit)
    return unit, num


def strong_beats(beats: int) -> set[int]:
    """The beats of a bar that carry the bass: the first, and the middle one of an even bar."""
    return {0, beats // 2} if beats % 2 == 0 and beats >= 4 else {0}


def default_tempo(meter: tuple[int, int] | None) -> int:
    if meter is None:
        return FREE_QPM
    if is_compound(meter):
        return COMPOUND_QPM
    return DEFAULT_QPM.get(meter, FREE_QPM)


# -- chord symbols ------------------------------------------------------------------------

# Intervals above the root for each quality as folk books write it ("d" is the Nottingham
# Music Database's diminished).
QUALITIES = {
    "": (0, 4, 7), "maj": (0, 4, 7), "M": (0, 4, 7),
    "m": (0, 3, 7), "min": (0, 3, 7), "-": (0, 3, 7),
    "7": (0, 4, 7, 10), "m7": (0, 3, 7, 10), "min7": (0, 3, 7, 10), "-7": (0, 3, 7, 10),
    "maj7": (0, 4, 7, 11), "M7": (0, 4, 7, 11), "6": (0, 4, 7, 9), "m6": (0, 3, 7, 9),
    "9": (0, 4, 7, 10, 14), "m9": (0, 3, 7, 10, 14), "add9": (0, 4, 7, 14), "7b9": (0, 4, 7, 10, 13),
    "dim": (0, 3, 6), "d": (0, 3, 6), "o": (0, 3, 6), "dim7": (0, 3, 6, 9), "o7": (0, 3, 6, 9),
    "m7b5": (0, 3, 6, 10), "m7-5": (0, 3, 6, 10), "ø": (0, 3, 6, 10),
    "aug": (0, 4, 8), "+": (0, 4, 8), "5": (0, 7),
    "sus": (0, 5, 7), "sus4": (0, 5, 7), "sus2": (0, 2, 7), "7sus": (0, 5, 7, 10), "7sus4": (0, 5, 7, 10),
}
NO_CHORD = ("N.C.", "NC", "N.C")
# Root, quality, optional bass; a bass may be written lower case with + for sharp and - for flat
# ("D/f+", "Gm/bb"), as in the Nottingham files; optional chords come in parentheses: "(E7)".
CHORD_SYMBOL_RE = re.compile(r"^\(?([A-G])([#b]?)([^/()]*?)(?:/([A-Ga-g])([#b+-]?))?\)?$")


def chord_tones(symbol: str) -> tuple[int, list[int], int] | None:
    """A chord symbol → (root pitch class, pitch classes, bass pitch class); None if unknown.

    >>> chord_tones("G/B")
    (7, [7, 11, 2], 11)
    """
    m = CHORD_SYMBOL_RE.match(symbol.strip())
    if not m or m[3] not in QUALITIES:
        return None
    root = (NATURAL[m[1]] + {"#": 1, "b": -1}.get(m[2], 0)) % 12
    classes = [(root + i) % 12 for i in QUALITIES[m[3]]]
    bass = root if not m[4] else (NATURAL[m[4].upper()] + {"#": 1, "+": 1, "b": -1, "-": -1}.get(m[5], 0)) % 12
    return root, classes, bass


def voice(classes: list[int], low: int) -> list[int]:
    """Pitch classes → one pitch each within low … low + 11: a close voicing that stays in one
    register, so chords move smoothly into one another."""
    return sorted(low + (c - low) % 12 for c in dict.fromkeys(classes))


# -- 1. playback order --------------------------------------------------------------------

SECTION_BARS = ("||", "|]", "[|")


def ending_numbers(text: str) -> set[int]:
    """An ending's label → the times through it is played: "1" → {1}, "1,3" → {1, 3}, "1-3" → {1, 2, 3}."""
    numbers: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def playback_order(tokens: list[Token]) -> list[int]:
    """Token indices in the order a player plays them.

    1. A repeat goes back to the last `|:` (or `::`); with none since the last repeat, to the
       last section end (`||`, `|]`) or the start of the tune.
    2. A bar line starting with `:` (`:|`, `::`, `:||:`) sends the player back, once.
    3. On the n-th time through, an ending labelled n is played; the others are skipped up to
       the next ending label, repeat sign or section end.
    4. The repeat is over at that same `:|` on the last time through, or at the first bar line
       after an ending played on a later time through; the next `:|` repeats from there.
    """
    order: list[int] = []
    start, explicit_start = 0, False  # where a repeat goes back to; was it written `|:`?
    time_through = 1
    sent_back: set[int] = set()  # the `:|` bars that already sent the player back
    skipping = False  # inside an ending not played this time through
    in_late_ending = False  # inside an ending played on the second (or later) time through
    i, steps = 0, 0

    def next_is_ending(j: int) -> bool:
        for u in tokens[j + 1:]:
            if u.kind != "space":
                return u.kind == "ending"
        return False

    def finish_repeat(j: int, opens: bool) -> None:
        nonlocal start, explicit_start, time_through, in_late_ending
        sent_back.clear()
        start, explicit_start, time_through, in_late_ending = j + 1, opens, 1, False

    while i < len(tokens):
        steps += 1
        if steps > 10 * len(tokens) + 100:  # a malformed tune can never loop for ever
            break
        t = tokens[i]
        if t.kind == "ending":
            skipping = time_through not in ending_numbers(t.text)
            in_late_ending = not skipping and time_through > 1
            i += 1
            continue
        if t.kind == "bar":
            closes, opens = t.text.startswith(":"), t.text.endswith(":")
            if skipping:
                # An ending label after this bar decides; a plain bar line is still inside the
                # skipped ending; a repeat or section end closes it, and the repeat with it.
                if next_is_ending(i) or not (closes or opens or t.text in SECTION_BARS):
                    i += 1
                    continue
                skipping = False
                finish_repeat(i, opens)
            elif closes and i not in sent_back:
                sent_back.add(i)
                time_through += 1
                i = start
                continue
            elif closes or in_late_ending:
                finish_repeat(i, opens)
            elif opens:
                start, explicit_start = i + 1, True
            elif t.text in SECTION_BARS and not explicit_start and time_through == 1:
                start = i + 1
            order.append(i)
            i += 1
            continue
        if not skipping:
            order.append(i)
        i += 1
    return order


# -- 2.–4. the performance ----------------------------------------------------------------

def performance(tune: Tune, tempo: float | None = None, transpose: int = 0) -> Performance:
    """A parsed tune → what sounds when. `tempo` (quarter notes per minute) overrides the tune's
    Q: and the meter's default; `transpose` moves every pitch by semitones.

    >>> from atelier.music.abc import parse
    >>> perf = performance(parse("X:1\\nM:6/8\\nK:D\\n|:\\"D\\"FAd fed:|"))
    >>> [n.pitch for n in perf.notes][:3], len(perf.notes), perf.tempo_qpm, round(perf.seconds, 2)
    ([66, 69, 74], 12, 165, 2.18)
    """
    if tempo is not None and not 20 <= tempo <= 500:
        raise ValueError(f"tempo {tempo} is out of range: 20 to 500 quarter notes per minute")
    if not -MAX_TRANSPOSE <= transpose <= MAX_TRANSPOSE:
        raise ValueError(f"transpose {transpose} is out of range: {-MAX_TRANSPOSE} to {MAX_TRANSPOSE} semitones")
    tokens = tune.tokens

    # The key and meter at each written position: a repeat replays what is written, in the key
    # written there.
    signature = tune.key.signature
    meter = meter_signature(tune.meter_text)
    key_at, meter_at = [], []
    for t in tokens:
        if t.kind == "field" and t.text[:2] == "K:":
            signature = parse_key(t.text[2:]).signature
        elif t.kind == "field" and t.text[:2] == "M:":
            meter = meter_signature(t.text[2:])
        key_at.append(signature)
        meter_at.append(meter)

    # 2. The walk. Melody notes are [start, duration, pitch] while ties may still lengthen them.
    now = Time(0)
    notes: list[list] = []
    bar_accidentals: dict[tuple[str, int], int] = {}  # (letter, octave) → alteration, until the bar line
    last_sounded: dict[tuple[str, int], list] = {}  # the previous note or chord's notes, by letter and octave
    tied: dict[tuple[str, int], list] = {}  # those a tie (-) carries into the next note
    bar_lines: list[tuple[Time, tuple[int, int] | None]] = []
    symbols: list[tuple[Time, str]] = []
    meters: list[tuple[Time, tuple[int, int] | None]] = []
    for i in playback_order(tokens):
        t = tokens[i]
        if t.kind in ("note", "rest", "chord") and (not meters or meters[-1][1] != meter_at[i]):
            meters.append((now, meter_at[i]))
        if t.kind == "bar":
            bar_accidentals.clear()
            bar_lines.append((now, meter_at[i]))
        elif t.kind == "chord_symbol":
            symbols.append((now, t.text))
        elif t.kind == "tie":
            tied = last_sounded
        elif t.kind == "rest":
            now += t.duration * 4
            last_sounded, tied = {}, {}
        elif t.kind in ("note", "chord"):
            sounded = {}
            for acc, letter, octave in pitches_of(t):
                where = (letter, octave)
                if acc:
                    bar_accidentals[where] = ACCIDENTALS[acc]
                alteration = bar_accidentals.get(where, key_at[i][letter])
                if where in tied and not acc:  # a tied note keeps its pitch across the bar line
                    alteration = tied[where][2] - pitch(letter, octave, 0)
                p = pitch(letter, octave, alteration)
                if where in tied and tied[where][2] == p:
                    tied[where][1] += t.duration * 4
                    sounded[where] = tied[where]
                    continue
                note = [now, t.duration * 4, p]
                notes.append(note)
                sounded[where] = note
            last_sounded, tied = sounded, {}
            now += t.duration * 4
    length = now
    first_meter = meters[0][1] if meters else meter_signature(tune.meter_text)

    # 3. The beat grid: every beat from bar line to bar line, with whether it is strong. A bar
    # shorter than its meter that opens the tune, or follows another short one (a closing bar
    # and the next part's pickup), is a pickup: its beats count back from the bar line after it.
    grid: dict[Time, bool] = {}
    marks = [(Time(0), first_meter)] + bar_lines + [(length, None)]
    previous_short = True
    for (a, m), (b, _) in pairwise(marks):
        if b <= a:
            continue
        beat, per_bar = beats_of(m)
        strong = strong_beats(per_bar)
        short = m is not None and b - a < beat * per_bar
        if short and previous_short and b != length:
            k = 1
            while b - k * beat >= a:
                grid[b - k * beat] = (per_bar - k) % per_bar in strong
                k += 1
        else:
            k = 0
            while a + k * beat < b:
                grid[a + k * beat] = k % per_bar in strong
                k += 1
        previous_short = short

    melody = []
    for start, duration, p in notes:
        velocity = OFFBEAT_VELOCITY if start not in grid else STRONG_VELOCITY if grid[start] else BEAT_VELOCITY
        melody.append(Note(float(start), float(duration), p + transpose, velocity))

    # 4. Harmony and accompaniment. Unknown symbols are passed over: the chord before goes on.
    chords, accompaniment = [], []
    known = [(at, s, chord_tones(s)) for at, s in symbols if s.strip() in NO_CHORD or chord_tones(s)]
    beats = sorted(grid)
    for (at, symbol, tones), until in zip(known, [k[0] for k in known[1:]] + [length]):
        if tones is None or until <= at:  # "N.C." (no chord), or two symbols at one moment
            continue
        root, classes, bass_class = tones
        pitches = [p + transpose for p in voice(classes, CHORD_LOW)]
        bass = BASS_LOW + (bass_class - BASS_LOW) % 12 + transpose
        fifth = BASS_LOW + (root + 7 - BASS_LOW) % 12 + transpose
        chords.append(Chord(float(at), float(until - at), pitches, bass, symbol))
        hits = [at] + [b for b in beats if at < b < until]
        basses = 0  # bass notes played in this chord so far: they alternate root (or slash bass) and fifth
        for n, (hit, end) in enumerate(zip(hits, hits[1:] + [until])):
            gap = float(end - hit)
            if n == 0 or grid[hit]:
                accompaniment.append(Note(float(hit), gap, fifth if basses % 2 else bass, BASS_VELOCITY))
                basses += 1
                if len(hits) == 1:  # a chord one beat long: bass and chord together
                    accompaniment += [Note(float(hit), gap, p, CHORD_VELOCITY) for p in pitches]
            else:  # the "chick": detached, so the vamp has a pulse
                accompaniment += [Note(float(hit), gap * 0.8, p, CHORD_VELOCITY) for p in pitches]
    accompaniment.sort(key=lambda n: (n.start, n.pitch))

    out_of_range = [n.pitch for n in melody + accompaniment if not 0 <= n.pitch <= 127]
    if out_of_range:
        raise ValueError(f"pitch {out_of_range[0]} is outside MIDI's 0–127 (transpose {transpose})")
    qpm = tempo if tempo is not None else tune.tempo or default_tempo(first_meter)
    return Performance(melody, chords, accompaniment, qpm, first_meter, float(length),
                       tune.titles[0] if tune.titles else "",
                       [(float(at), m) for at, m in meters])
