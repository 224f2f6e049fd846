"""The bar-keeping mask: which tokens may come next so that a tune parses and every bar scans.

`Scanner` follows a tune token by token as a musician counts it: how much of the bar is
filled, whether a note still waits for its length, a broken rhythm or a triplet in flight,
the accidentals written in this bar, repeats and endings, how many bars are done. Before
each step, `allowed()` says which tokens keep the tune well formed; the decoder samples
only among those. So a note never overflows its bar, a bar line comes exactly when the bar
is full (or closes a section short by the pickup it opened with), `[2` follows the `:|` of
a first ending, a `-` ties to the same note, no accidental restates the key signature, and
the tune ends on a bar line after the bars asked for.

Lengths are counted in eighths (the canonical unit, atelier/music/tokens.py) as Fractions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from atelier.music.theory import ACCIDENTALS, NATURAL, Key, note_parts
from atelier.music.tokens import is_pitch, length_of

SECTION_ENDS = (":|", "||", "|]")
TRIPLET = Fraction(2, 3)


@dataclass(frozen=True)
class Vocabulary:
    """Each token id's part in a tune, read once from the tokenizer."""

    kinds: list[str]  # special meter key newline pitch rest length bar ending chord broken triplet tie roll space
    lengths: dict[int, Fraction]
    pitches: dict[int, tuple[str, str, int]]  # id → (accidental, letter, octave)
    eos_id: int
    second_ending: int | None  # the id of `[2`; without it no first ending may open

    @classmethod
    def of(cls, tokens: list[str], eos_id: int) -> "Vocabulary":
        kinds, lengths, pitches = [], {}, {}
        for i, t in enumerate(tokens):
            if t.startswith("<"):
                kind = "special"
            elif t.startswith("M:"):
                kind = "meter"
            elif t.startswith("K:"):
                kind = "key"
            elif t == "\n":
                kind = "newline"
            elif t == "z":
                kind = "rest"
            elif is_pitch(t):
                kind = "pitch"
                pitches[i] = note_parts(t)
            elif length_of(t) is not None:
                kind = "length"
                lengths[i] = length_of(t)
            elif t in ("|", "||", "|]", "|:", ":|"):
                kind = "bar"
            elif t in ("[1", "[2"):
                kind = "ending"
            elif t.startswith('"'):
                kind = "chord"
            else:
                kind = {">": "broken", "<": "broken", "(3": "triplet", "-": "tie", "~": "roll", " ": "space"}.get(t, "special")
            kinds.append(kind)
        return cls(kinds, lengths, pitches, eos_id, tokens.index("[2") if "[2" in tokens else None)


@dataclass
class Plan:
    """What the tune must come to: `bars` written bars (pickup aside), or the AABB form."""

    bars: int = 16
    form: str | None = "AABB"  # None: free structure, `bars` long
    part: int = 8  # bars per part in AABB
    chords: bool = True


class ScanError(ValueError):
    pass


@dataclass
class Scanner:
    vocab: Vocabulary
    tokens: list[str]
    bar: Fraction  # a full bar, in eighths
    key: Key
    plan: Plan
    quantum: Fraction = Fraction(1, 4)  # the finest grid a bar is filled on
    elapsed: Fraction = Fraction(0)  # committed notes in this bar
    pending: Fraction | None = None  # a note or rest waiting for its length: its multiplier
    pending_pitch: tuple[str, int] | None = None
    last_length: Fraction | None = None  # the last committed note's length (for > and <)
    last_pitch: tuple[str, int] | None = None
    last_kind: str = "start"
    broken_next: Fraction = Fraction(1)  # what > or < does to the next note
    triplet_left: int = 0  # notes of a triplet not yet committed
    triplet_unit: Fraction | None = None  # every note of a triplet has the first one's length
    bars_done: int = 0  # full or closing bars
    pickups: set = field(default_factory=set)  # lengths of the short bars that opened sections
    owed: Fraction | None = None  # a short closing bar: the next bar must be a pickup this long
    content: bool = False  # the current bar has music
    after_section_end: bool = True  # the current bar opens the tune or a section
    repeat_open: bool = False
    ending: int = 0  # 1 inside a first ending, 2 inside a second
    ending_bars: int = 0
    tied: tuple[str, int] | None = None  # a tie waits for this letter and octave
    accidentals: dict = field(default_factory=dict)  # (letter, octave) → alteration written in this bar
    courtesy: set = field(default_factory=set)  # letters with an accidental in this bar or the last
    finished: bool = False
    wrap_up: bool = False  # running out of context: finish at the next bar line
    pending_pc: int | None = None  # the waiting note's pitch class (None: a rest)
    last_pc: int | None = None  # the last committed note's

    # -- lengths -------------------------------------------------------------------------------
    @property
    def remaining(self) -> Fraction:
        """What is left of this bar: a full bar, or the pickup a short closing bar owes."""
        return (self.owed if self.owed is not None else self.bar) - self.elapsed

    def _on_grid(self, rest: Fraction) -> bool:
        return rest >= 0 and (rest / self.quantum).denominator == 1

    def _lengths(self) -> set[Fraction]:
        return set(self.vocab.lengths.values()) | {Fraction(1)}

    def _commit_ok(self, length: Fraction) -> bool:
        """Whether the waiting note may last `length` eighths (multipliers applied)."""
        if self.triplet_left:
            if self.triplet_unit is not None:
                return length == self.triplet_unit
            total = length * self.triplet_left  # the first note fixes the triplet's length
            return self._on_grid(self.remaining - total)
        if not self._on_grid(self.remaining - length):
            return False
        return self.pending_pc == self.key.tonic_pitch_class or not (self._final() and self._closable(self.elapsed + length))

    def _final(self) -> bool:
        """This bar is the tune's last: its last note must be the tonic."""
        if self.owed is not None:
            return False
        number = self.bars_done + 1
        return number == self._target() if self.plan.form == "AABB" else number >= self._target()

    def _closable(self, elapsed: Fraction) -> bool:
        return elapsed == self.bar or any(elapsed + p == self.bar for p in self.pickups)

    def _pitch_class(self, i: int) -> int:
        acc, letter, octave = self.vocab.pitches[i]
        alteration = ACCIDENTALS[acc] if acc else self.accidentals.get((letter, octave), self.key.signature[letter])
        return (NATURAL[letter] + alteration) % 12

    def _multiplier(self) -> Fraction:
        return self.broken_next * (TRIPLET if self.triplet_left else 1)

    def _note_fits(self) -> bool:
        """Whether a new note (with or without a length token) can start now — some note: the tonic
        may always end the tune; which others may, `_leaves_room` says."""
        mult = self._multiplier()
        saved, self.pending_pc = self.pending_pc, self.key.tonic_pitch_class
        try:
            return any(self._commit_ok(d * mult) for d in self._lengths())
        finally:
            self.pending_pc = saved

    def _settled(self, check) -> bool:
        """`check()` as if the waiting note took its default length (False if it cannot)."""
        if self.pending is None:
            return check()
        if not self._commit_ok(self.pending):
            return False
        saved = (self.elapsed, self.pending, self.triplet_left, self.triplet_unit, self.last_length, self.last_pc,
                 self.last_pitch)
        self._commit(self.pending)
        try:
            return check()
        finally:
            (self.elapsed, self.pending, self.triplet_left, self.triplet_unit, self.last_length, self.last_pc,
             self.last_pitch) = saved

    def _free(self) -> bool:
        """No broken rhythm or triplet is in flight."""
        return self.broken_next == 1 and self.triplet_left == 0

    # -- the plan ------------------------------------------------------------------------------
    def _target(self) -> int:
        return 2 * self.plan.part if self.plan.form == "AABB" else self.plan.bars

    def _bar_kinds(self) -> set[str]:
        """Bar lines that may close the current bar now (after the waiting note settles)."""
        if not self.content or not self._free() or self.last_kind in ("broken", "triplet", "chord", "roll"):
            return set()
        elapsed = self.elapsed
        full, short = elapsed == self.bar, 0 < elapsed < self.bar
        opening = {"|"} | ({"|:"} if not self.repeat_open else set())
        if self.owed is not None:
            return opening if elapsed == self.owed else set()
        if short and self.after_section_end:
            return opening  # a pickup
        if not (full or short):
            return set()
        number = self.bars_done + 1
        target = self._target()
        if self.plan.form == "AABB":
            kinds = {":|"} if number % self.plan.part == 0 else {"|"}
            final = number == target
        else:
            final = number >= target or self.wrap_up
            kinds = {"|]", ":|", "||"} if final else {"|", "||", ":|"} | ({"|:"} if not self.repeat_open else set())
        if self.ending == 1:
            # a first ending closes after two bars at most, and leaves a bar for the second
            kinds &= {":|"} if self.ending_bars >= 1 or number + 1 >= target else {"|", ":|"}
        elif self.ending == 2:
            kinds -= {":|"}
        if short:  # closing a section: it complements a pickup, or the next bar must
            complements = any(elapsed + p == self.bar for p in self.pickups)
            kinds &= {":|", "||", "|]", "|:"}
            if final and not complements:
                return set()
        if self._final() and self.last_pc != self.key.tonic_pitch_class:
            return set()  # a tune ends on its tonic
        return kinds

    def _may_end(self) -> bool:
        if self.ending == 1 or self.owed is not None or self.bars_done == 0:
            return False
        return self.wrap_up or (self.bars_done >= self._target() and self.last_kind in ("bar:|", "bar|]", "bar||"))

    # -- the mask ------------------------------------------------------------------------------
    def allowed(self) -> list[bool]:
        v, kinds, last = self.vocab, self.vocab.kinds, self.last_kind
        if self.finished or last == "bar|]":
            return [i == v.eos_id for i in range(len(kinds))]
        just_closed = last.startswith("bar")
        if just_closed and self.ending == 1 and last == "bar:|" and v.second_ending is not None:
            return [i == v.second_ending for i in range(len(kinds))]  # a first ending is followed by the second
        if just_closed and self._may_end() and (self.wrap_up or self.bars_done >= self._target()):
            return [i == v.eos_id for i in range(len(kinds))]  # the bars asked for are done
        pending = self.pending is not None
        boundary = self._settled(lambda: True)
        note_ok = self._settled(self._note_fits) if boundary else False
        bar_kinds = self._settled(self._bar_kinds) if boundary else set()
        after_note = pending or last == "length"
        mask = [False] * len(kinds)
        for i, kind in enumerate(kinds):
            if kind == "length":
                ok = pending and self._commit_ok(self.pending * v.lengths[i])
            elif kind == "pitch":
                ok = note_ok and self._pitch_ok(i)
            elif kind == "rest":
                ok = note_ok and self.tied is None and last != "roll" and self._rest_ok()
            elif kind == "bar":
                t = self.tokens[i]
                if just_closed:
                    ok = (t == "|:" and last == "bar:|" and not self.repeat_open and self.ending != 1
                          and self.bars_done < self._target())
                elif last == "start":
                    ok = t == "|:"
                else:
                    ok = t in bar_kinds
            elif kind == "ending":
                t = self.tokens[i]
                ok = just_closed and self.plan.form != "AABB" and self.owed is None and (
                    t == "[1" and v.second_ending is not None and self.ending == 0 and last in ("bar|", "bar||", "bar|:")
                    and self.bars_done < self._target() - 1)
            elif kind == "chord":
                ok = (self.plan.chords and note_ok and self.broken_next == 1 and not self._in_triplet()
                      and last not in ("chord", "roll", "triplet", "broken"))
            elif kind == "broken":
                ok = after_note and boundary and self._broken_ok(self.tokens[i])
            elif kind == "triplet":
                ok = (boundary and self.tied is None and self.broken_next == 1 and not self._in_triplet()
                      and last not in ("roll", "triplet") and self._settled(lambda: self._triplet_fits()
                                                                            and not self._final()))
            elif kind == "tie":
                ok = (after_note and boundary and self._tie_pitch() is not None and self.broken_next == 1
                      and not self._settled(self._final))  # the last bar ends on a note of its own
            elif kind == "roll":
                ok = note_ok and self.tied is None and last not in ("roll", "broken")
            elif kind == "space":
                ok = (last in ("pitch", "rest", "length") and boundary and self.broken_next == 1
                      and self.tied is None and not self._in_triplet())
            else:
                ok = False
            mask[i] = ok
        mask[v.eos_id] = just_closed and self._may_end()
        return mask

    def _leaves_room(self, pc: int | None) -> bool:
        """In the last bar, a note that is not the tonic (or a rest) must not be the one that fills it."""
        if pc == self.key.tonic_pitch_class or not self._final():
            return True
        saved, self.pending_pc = self.pending_pc, pc  # as if it were the waiting note
        try:
            return any(self._commit_ok(d * self._multiplier()) for d in self._lengths())
        finally:
            self.pending_pc = saved

    def _rest_ok(self) -> bool:
        return self._settled(lambda: self._leaves_room(None))

    def _in_triplet(self) -> bool:
        """A triplet still has notes to come once the waiting note settles."""
        return self.triplet_left - (1 if self.pending is not None and self.triplet_left else 0) > 0

    def _tie_pitch(self):
        return self.pending_pitch if self.pending is not None else (self.last_pitch if self.last_kind == "length" else None)

    def _triplet_fits(self) -> bool:
        return any(self._on_grid(self.remaining - 2 * d) for d in self._lengths())

    def _pitch_ok(self, i: int) -> bool:
        acc, letter, octave = self.vocab.pitches[i]
        if self.tied is not None and (letter, octave) != self.tied:
            return False  # a tie joins two notes of the same pitch
        if acc and letter not in self.courtesy:
            current = self.accidentals.get((letter, octave), self.key.signature[letter])
            if ACCIDENTALS[acc] == current:
                return False  # it restates the key signature, and no accidental nearby calls for courtesy
        pc = self._pitch_class(i)
        return self._settled(lambda: self._leaves_room(pc))

    def _broken_ok(self, token: str) -> bool:
        if self.triplet_left or self.broken_next != 1 or self.tied is not None:
            return False
        length = self.pending if self.pending is not None else self.last_length
        if length is None:
            return False
        rest = self.remaining - (self.pending if self.pending is not None else 0)
        grow, factor = (length / 2, Fraction(1, 2)) if token == ">" else (-length / 2, Fraction(3, 2))
        return any(self._on_grid(rest - grow - d * factor) for d in self._lengths())

    # -- moving on -----------------------------------------------------------------------------
    def feed(self, i: int) -> None:
        """Take token i (which `allowed()` permitted) and move the count on."""
        kind, text = self.vocab.kinds[i], self.tokens[i]
        if i == self.vocab.eos_id:
            self.finished = True
            return
        if kind == "length":
            self._commit(self.pending * self.vocab.lengths[i])
            self.last_kind = "length"
            return
        if self.pending is not None:  # any other token gives the waiting note its default length
            self._commit(self.pending)
        if kind in ("pitch", "rest"):
            self.pending_pc = self._pitch_class(i) if kind == "pitch" else None
            self.pending = self._multiplier()
            self.broken_next = Fraction(1)
            self.content = True
            self.pending_pitch = None
            if kind == "pitch":
                acc, letter, octave = self.vocab.pitches[i]
                if acc:
                    self.accidentals[(letter, octave)] = ACCIDENTALS[acc]
                    self.courtesy.add(letter)
                self.pending_pitch = (letter, octave)
                self.tied = None
        elif kind == "bar":
            self._close_bar(text)
            return
        elif kind == "ending":
            self.ending, self.ending_bars = int(text[1]), 0
        elif kind == "broken":
            if text == ">":
                self.elapsed += self.last_length / 2
                self.broken_next = Fraction(1, 2)
            else:
                self.elapsed -= self.last_length / 2
                self.broken_next = Fraction(3, 2)
        elif kind == "triplet":
            self.triplet_left, self.triplet_unit = 3, None
        elif kind == "tie":
            self.tied = self.last_pitch
        self.last_kind = kind

    def _commit(self, length: Fraction) -> None:
        self.last_pc = self.pending_pc
        self.elapsed += length
        self.last_length = length
        self.last_pitch = self.pending_pitch
        self.pending = None
        if self.triplet_left:
            if self.triplet_unit is None:
                self.triplet_unit = length
            self.triplet_left -= 1

    def _close_bar(self, text: str) -> None:
        if self.last_kind.startswith("bar") or self.last_kind == "start":  # |: right after :|, or first
            self.repeat_open = True
            self.after_section_end = True
            self.last_kind = "bar|:"
            return
        full = self.elapsed == self.bar
        if not full and self.after_section_end:  # a pickup
            self.pickups.add(self.elapsed)
            self.owed = None
        else:
            self.bars_done += 1
            if self.ending:
                self.ending_bars += 1
            if not full and not any(self.elapsed + p == self.bar for p in self.pickups):
                self.owed = self.bar - self.elapsed
        if text == "|:":
            self.repeat_open = True
        elif text == ":|":
            self.repeat_open = False
        if self.ending == 2 and text in SECTION_ENDS + ("|:",):
            self.ending = 0
        self.after_section_end = text in SECTION_ENDS + ("|:",)
        self.courtesy = {letter for letter, _ in self.accidentals}
        self.elapsed, self.content, self.accidentals = Fraction(0), False, {}
        self.last_kind = f"bar{text}"


def scanner_for(vocab: Vocabulary, tokens: list[str], meter: Fraction, key: Key, plan: Plan) -> Scanner:
    """A Scanner for a tune in `meter` (whole notes per bar) and `key`."""
    quantum = min([Fraction(1)] + [d for d in vocab.lengths.values() if d.numerator == 1])
    return Scanner(vocab, tokens, meter * 8, key, plan, quantum=max(quantum, Fraction(1, 4)))
