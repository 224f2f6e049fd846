"""ABC notation: read a tune, check that it parses and that its bars scan, report what it holds.

Our own reader, because three things need the same one: the checker (`/api/music/check`,
uploads), the model's tokens (atelier/music/tokens.py) and the renderer
(atelier/music/score.py). It reads the ABC 2.1 a folk musician writes — one voice, notes with
accidentals and octave marks, lengths, rests, bar lines and repeats with first and second
endings, chord symbols, broken rhythm, tuplets, ties, slurs, grace notes, decorations,
multi-note chords, inline fields — and says where it stops understanding (line and column,
1-based), which music21's reader does not.

Read top to bottom: errors and tokens → the header → the lexer → timing (`parse`) → bars.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

from atelier.music.theory import Key, TheoryError, note_parts, parse_key

MAX_TUNE_CHARS = 100_000


class AbcError(ValueError):
    """Where the tune stops making sense; `line` and `col` count from 1."""

    def __init__(self, message: str, line: int = 0, col: int = 0, tune: int | None = None):
        self.reason, self.line, self.col, self.tune = message, line, col, tune
        where = f"line {line}, column {col}: " if line else ""
        super().__init__(f"{'tune ' + str(tune) + ', ' if tune is not None else ''}{where}{message}")


@dataclass
class Token:
    kind: str  # note rest bar ending chord_symbol annotation broken tuplet tie slur deco grace chord field space
    text: str
    line: int
    col: int
    length: Fraction = Fraction(1)  # notes, rests, chords: the written length in units (L:)
    notes: list[str] = field(default_factory=list)  # chord: the notes' texts
    duration: Fraction = Fraction(0)  # set by parse: what it lasts, in whole notes (broken rhythm, tuplets)


# -- the header ---------------------------------------------------------------------------

def parse_meter(value: str) -> Fraction | None:
    """M: value → a bar's length in whole notes; None for free meter."""
    value = value.split("%")[0].strip()
    if value in ("", "none"):
        return None
    if value == "C":
        return Fraction(4, 4)
    if value == "C|":
        return Fraction(2, 2)
    m = re.fullmatch(r"\(?(\d+(?:\+\d+)*)\)?\s*/\s*(\d+)", value)
    if not m or int(m[2]) not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"M:{value} is not a meter (write e.g. 4/4, 6/8, 3/4, C)")
    top = sum(int(n) for n in m[1].split("+"))
    if not 0 < top <= 32:
        raise ValueError(f"M:{value}: a bar of {top} beats is out of range")
    return Fraction(top, int(m[2]))


def parse_unit(value: str) -> Fraction:
    m = re.fullmatch(r"\s*1\s*/\s*(\d+)\s*", value.split("%")[0])
    if not m or int(m[1]) not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError(f"L:{value.strip()} is not a unit length (write e.g. 1/8, 1/16, 1/4)")
    return Fraction(1, int(m[1]))


def default_unit(meter: Fraction | None) -> Fraction:
    """ABC's rule: 1/16 below 3/4, otherwise 1/8."""
    return Fraction(1, 16) if meter is not None and meter < Fraction(3, 4) else Fraction(1, 8)


def parse_tempo(value: str) -> int | None:
    """Q: value → quarter notes per minute (`Q:1/4=120`, `Q:120`, `Q:3/8=80`)."""
    m = re.search(r"(?:(\d+)/(\d+)\s*=\s*)?(\d+)\s*$", value.split("%")[0].replace('"', " ").strip())
    if not m:
        return None
    beat = Fraction(int(m[1]), int(m[2])) if m[1] else Fraction(1, 4)
    return max(1, round(int(m[3]) * beat / Fraction(1, 4)))


# -- the lexer ------------------------------------------------------------------------------

NOTE_RE = re.compile(r"(\^\^|\^|__|_|=)?([A-Ga-g])([,']*)")
LENGTH_RE = re.compile(r"(\d+)?(/+)?(\d+)?")
BAR_RE = re.compile(r":*\|\]|:*\|\|:*|:*\|:*|:+|\[\|")
ENDING_RE = re.compile(r"\[?(\d+(?:[,-]\d+)*)")
DECORATIONS = set(".~HLMOPSTuv")


def read_length(text: str, i: int, line: int, col: int) -> tuple[Fraction, int]:
    """The length after a note or rest at text[i:]: '', '2', '/2', '/', '//', '3/2', '3/' → units."""
    m = LENGTH_RE.match(text, i)
    num, slashes, den = m[1], m[2], m[3]
    if not (num or slashes):
        return Fraction(1), i
    n = int(num) if num else 1
    if not slashes:
        d = 1
    elif den:
        if len(slashes) > 1:
            raise AbcError(f"{text[i:m.end()]!r} is not a note length", line, i + 1)
        d = int(den)
    else:
        d = 2 ** len(slashes)
    if n == 0 or d == 0 or n > 64 or d > 64 or d & (d - 1):
        raise AbcError(f"{text[i:m.end()]!r} is not a note length", line, i + 1)
    return Fraction(n, d), m.end()


def lex_body_line(text: str, line: int) -> list[Token]:
    """One line of music → tokens (field lines and comments are handled by the caller)."""
    out: list[Token] = []
    i = 0
    while i < len(text):
        c, col = text[i], i + 1
        if c == "%":
            break
        if c == "\\" and not text[i + 1:].strip():  # line continuation
            break
        if c in " \t`":
            j = i
            while j < len(text) and text[j] in " \t`":
                j += 1
            out.append(Token("space", " ", line, col))
            i = j
            continue
        m = NOTE_RE.match(text, i)
        if m:
            length, j = read_length(text, m.end(), line, col)
            out.append(Token("note", text[i:j], line, col, length))
            i = j
            continue
        if c in "zxZX":
            length, j = read_length(text, i + 1, line, col)
            out.append(Token("rest", text[i:j], line, col, length if c in "zx" else -length))
            i = j
            continue
        if c == '"':
            j = text.find('"', i + 1)
            if j < 0:
                raise AbcError('a chord symbol is not closed (missing ")', line, col)
            inner = text[i + 1:j]
            kind = "annotation" if inner[:1] in "^_<>@" else "chord_symbol"
            out.append(Token(kind, inner, line, col))
            i = j + 1
            continue
        if c in "|:" or text.startswith("[|", i):
            m = BAR_RE.match(text, i)
            if not m:
                raise AbcError(f"{c!r} is not a bar line", line, col)
            bar = m[0]
            j = m.end()
            e = re.match(r"\d+(?:[,-]\d+)*", text[j:]) if not bar.endswith(":") else None
            out.append(Token("bar", bar, line, col))
            if e:  # |1 or :|2: an ending number written against the bar line
                out.append(Token("ending", e[0], line, j + 1))
                j += e.end()
            i = j
            continue
        if c == "[":
            if re.match(r"\[\d", text[i:]):
                m = ENDING_RE.match(text, i)
                out.append(Token("ending", m[1], line, col))
                i = m.end()
                continue
            if re.match(r"\[[A-Za-z]:", text[i:]):  # inline field [K:G]
                j = text.find("]", i)
                if j < 0:
                    raise AbcError("an inline field is not closed (missing ])", line, col)
                out.append(Token("field", text[i + 1:j], line, col))
                i = j + 1
                continue
            j = text.find("]", i)
            if j < 0:
                raise AbcError("a chord is not closed (missing ])", line, col)
            inner, notes = text[i + 1:j], []
            k = 0
            while k < len(inner):
                m = NOTE_RE.match(inner, k)
                if not m:
                    if inner[k] in "-.~ ":
                        k += 1
                        continue
                    raise AbcError(f"{inner[k]!r} cannot stand in a chord", line, col + 1 + k)
                length, k = read_length(inner, m.end(), line, col + 1)
                notes.append((m[0], length))
            if not notes:
                raise AbcError("an empty chord []", line, col)
            outer, j2 = read_length(text, j + 1, line, col)
            out.append(Token("chord", text[i:j2], line, col, notes[0][1] * outer, [n for n, _ in notes]))
            i = j2
            continue
        if c == "(":
            m = re.match(r"\((\d)(?::(\d)?)?(?::(\d)?)?", text[i:])
            if m:
                out.append(Token("tuplet", m[0], line, col))
                i += m.end()
            else:
                out.append(Token("slur", "(", line, col))
                i += 1
            continue
        if c == ")":
            out.append(Token("slur", ")", line, col))
            i += 1
            continue
        if c in "<>":
            j = i
            while j < len(text) and text[j] == c:
                j += 1
            if j - i > 3:
                raise AbcError(f"{text[i:j]!r} is not a broken rhythm", line, col)
            out.append(Token("broken", text[i:j], line, col))
            i = j
            continue
        if c == "-":
            out.append(Token("tie", "-", line, col))
            i += 1
            continue
        if c == "{":
            j = text.find("}", i)
            if j < 0:
                raise AbcError("grace notes are not closed (missing })", line, col)
            out.append(Token("grace", text[i:j + 1], line, col))
            i = j + 1
            continue
        if c in "!+":
            j = text.find(c, i + 1)
            if j < 0:
                raise AbcError(f"a decoration is not closed (missing {c})", line, col)
            out.append(Token("deco", text[i:j + 1], line, col))
            i = j + 1
            continue
        if c in DECORATIONS:
            out.append(Token("deco", c, line, col))
            i += 1
            continue
        if c in "y;":
            i += 1
            continue
        raise AbcError(f"{c!r} is not ABC music", line, col)
    return out


# -- the tune -------------------------------------------------------------------------------

@dataclass
class Bar:
    number: int  # counting from 1; a pickup is 0
    line: int
    col: int
    length: Fraction  # in units (L:)
    expected: Fraction | None  # in units; None in free meter
    status: str = "ok"  # ok, pickup, closing, short, long
    ok: bool = True

    def public(self) -> dict:
        return {"number": self.number, "line": self.line, "col": self.col, "length": str(self.length),
                "expected": None if self.expected is None else str(self.expected), "status": self.status,
                "ok": self.ok}


@dataclass
class Tune:
    fields: dict[str, str]  # the header's fields, first value of each (T: may repeat: titles)
    titles: list[str]
    meter: Fraction | None
    unit: Fraction
    key: Key
    tempo: int | None
    tokens: list[Token]
    bars: list[Bar]
    body_line: int  # the line the music starts on

    @property
    def meter_text(self) -> str:
        return self.fields.get("M", "none")

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.bars)

    def report(self) -> dict:
        """What the API returns about a tune: its header facts and every bar."""
        repeats = [t.text for t in self.tokens if t.kind == "bar" and ":" in t.text]
        endings = [t.text for t in self.tokens if t.kind == "ending"]
        full = [b for b in self.bars if b.status in ("ok", "closing")]
        from atelier.music.score import default_tempo, meter_signature  # score reads tunes: imported here

        tempo = self.tempo or default_tempo(meter_signature(self.meter_text))  # what a rendering plays
        return {"title": self.titles[0] if self.titles else None, "meter": self.meter_text,
                "unit": f"1/{self.unit.denominator}", "key": self.key.abc(), "tempo": tempo,
                "bars": len(full), "pickup": str(self.bars[0].length) if self.bars and self.bars[0].number == 0
                else None, "repeats": len(repeats), "endings": endings,
                "valid": self.ok, "wrong_bars": [b.number for b in self.bars if not b.ok],
                "bar_lengths": [b.public() for b in self.bars]}


HEADER_RE = re.compile(r"^([A-Za-z]):(.*)$")
SECTION_ENDS = ("||", "|]", ":|", "::", "|:", "[|")


def split_tunes(text: str) -> list[tuple[int, str]]:
    """A file of tunes → (first line number, text) per tune, split on X: lines."""
    tunes, start, lines = [], None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("X:"):
            if start is not None:
                tunes.append((start + 1, "\n".join(lines[start:i])))
            start = i
    if start is not None:
        tunes.append((start + 1, "\n".join(lines[start:])))
    elif text.strip():
        tunes.append((1, text))
    return tunes


def parse(text: str, *, tune_number: int | None = None, first_line: int = 1) -> Tune:
    """One tune's ABC text → Tune (tokens, timing, a report per bar); AbcError where it fails."""
    if len(text) > MAX_TUNE_CHARS:
        raise AbcError(f"a tune is limited to {MAX_TUNE_CHARS:,} characters", tune=tune_number)
    fields: dict[str, str] = {}
    titles: list[str] = []
    lines = text.splitlines()
    body_start = None
    for i, raw in enumerate(lines):
        line = raw.rstrip()
        number = first_line + i
        if not line.strip() or line.lstrip().startswith("%"):
            continue
        m = HEADER_RE.match(line)
        if not m:
            raise AbcError("the header must end with a K: line before the music starts", number, 1, tune_number)
        name, value = m[1], m[2].strip()
        if name == "T":
            titles.append(value)
        fields.setdefault(name, value)
        if name in "MLK":
            fields[name] = value  # a later M: in the header wins
        if name == "K":
            body_start = i + 1
            break
    if body_start is None:
        raise AbcError("no K: line: a tune's header ends with its key (K:D, K:Ador …)", tune=tune_number)
    try:
        meter = parse_meter(fields.get("M", "none"))
        unit = parse_unit(fields["L"]) if "L" in fields else default_unit(meter)
        key = parse_key(fields["K"])
    except (ValueError, TheoryError) as e:
        raise AbcError(str(e), tune=tune_number) from None
    tokens: list[Token] = []
    for i in range(body_start, len(lines)):
        line, number = lines[i], first_line + i
        if not line.strip():
            if any(lines[j].strip() for j in range(i + 1, len(lines))):
                raise AbcError("a blank line ends a tune; music follows it", number, 1, tune_number)
            break
        if line.lstrip().startswith("%"):
            continue
        m = HEADER_RE.match(line)
        if m:
            if m[1] in "wWNRSTPKMLQ":  # body fields: lyrics, notes, parts, changes of key/meter/unit
                tokens.append(Token("field", f"{m[1]}:{m[2].strip()}", number, 1))
                continue
            if m[1] == "X":
                raise AbcError("X: starts another tune; send one tune at a time", number, 1, tune_number)
        try:
            tokens.extend(lex_body_line(line, number))
        except AbcError as e:
            e.tune = tune_number
            raise AbcError(e.reason, e.line, e.col, tune_number) from None
    # Fields between K: and the first note still describe the whole tune (Nottingham writes
    # M:4/4, K:G, then M:6/8): they update the header rather than change anything mid-tune.
    while tokens and tokens[0].kind == "field" and tokens[0].text[0] in "MLKQ":
        name, value = tokens[0].text[0], tokens[0].text[2:].strip()
        try:
            if name == "M":
                meter = parse_meter(value)
                unit = parse_unit(fields["L"]) if "L" in fields else default_unit(meter)
            elif name == "L":
                unit = parse_unit(value)
            elif name == "K":
                key = parse_key(value)
        except (ValueError, TheoryError) as e:
            raise AbcError(str(e), tokens[0].line, 1, tune_number) from None
        fields[name] = value
        tokens.pop(0)
    tune = Tune(fields, titles, meter, unit, key, parse_tempo(fields["Q"]) if "Q" in fields else None,
                tokens, [], first_line + body_start)
    tune.bars = time_bars(tune, tune_number)
    return tune


def time_bars(tune: Tune, tune_number: int | None = None) -> list[Bar]:
    """Every bar's length, following broken rhythm, tuplets, chords and changes of meter or unit;
    each bar judged: full, a pickup opening a section, a short bar closing one, or wrong."""
    bars: list[Bar] = []
    meter, unit = tune.meter, tune.unit
    elapsed = Fraction(0)  # in whole notes
    start: Token | None = None
    next_factor = Fraction(1)  # broken rhythm: what the next note is multiplied by
    tuplet_left, tuplet_factor = 0, Fraction(1)
    last_length: Fraction | None = None  # the previous note's length in whole notes (for > and <)
    last_timed: Token | None = None
    section_start = True  # the next bar opens the tune or a section: it may be a pickup
    number = 0
    multi_rest = 0

    def close(token: Token | None, closes_section: bool) -> None:
        nonlocal elapsed, number, section_start, multi_rest
        if start is None and elapsed == 0:
            section_start = section_start or closes_section
            return
        expected = None if meter is None else meter * (multi_rest or 1)
        line, col = (start.line, start.col) if start else (token.line, token.col)
        bar = Bar(0, line, col, elapsed / unit, None if expected is None else expected / unit)
        if expected is None or elapsed == expected:
            bar.status = "ok"
        elif elapsed < expected and section_start:
            bar.status = "pickup"
        elif elapsed < expected and closes_section:
            bar.status = "closing"
        else:
            bar.status, bar.ok = ("short" if elapsed < expected else "long"), False
        if bar.status in ("ok", "short", "long"):
            number += multi_rest or 1
        bar.number = number if bar.status != "pickup" else 0
        bars.append(bar)
        elapsed, multi_rest = Fraction(0), 0
        section_start = closes_section

    def error(message: str, token: Token) -> AbcError:
        return AbcError(message, token.line, token.col, tune_number)

    for idx, t in enumerate(tune.tokens):
        if t.kind == "field":
            name, value = t.text[0], t.text[2:].strip()
            try:
                if name == "M":
                    close(t, True)
                    meter = parse_meter(value)
                    if "L" not in tune.fields:
                        unit = default_unit(meter)
                elif name == "L":
                    unit = parse_unit(value)
                elif name == "K":
                    parse_key(value)  # a key change mid-bar changes spelling, not time
                elif name == "P" and elapsed == 0:
                    section_start = True
            except (ValueError, TheoryError) as e:
                raise error(str(e), t) from None
            continue
        if t.kind in ("note", "rest", "chord"):
            if t.kind == "rest" and t.length < 0:  # Z: whole bars of rest
                if meter is None:
                    raise error("Z (bars of rest) needs a meter", t)
                multi_rest = int(-t.length)
                elapsed += meter * multi_rest
                t.duration = meter * multi_rest
                start = start or t
                continue
            length = t.length * unit * next_factor
            next_factor = Fraction(1)
            if tuplet_left:
                length *= tuplet_factor
                tuplet_left -= 1
            elapsed += length
            last_length, last_timed = length, t
            t.duration = length
            start = start or t
            continue
        if t.kind == "broken":
            before = next((u for u in reversed(tune.tokens[:idx]) if u.kind != "slur"), None)
            if last_length is None or before is None or before.kind not in ("note", "rest", "chord"):
                raise error(f"{t.text} must stand between two notes", t)
            dots = len(t.text)
            longer = Fraction(2 ** (dots + 1) - 1, 2 ** dots)  # > 3/2, >> 7/4, >>> 15/8
            shorter = 2 - longer
            if t.text[0] == ">":
                elapsed += last_length * (longer - 1)
                last_timed.duration = last_length * longer
                next_factor = shorter
            else:
                elapsed -= last_length * (1 - shorter)
                last_timed.duration = last_length * shorter
                next_factor = longer
            nxt = next((u for u in tune.tokens[idx + 1:] if u.kind not in ("deco", "slur", "grace",
                                                                          "chord_symbol", "annotation")), None)
            if nxt is None or nxt.kind not in ("note", "rest", "chord"):
                raise error(f"{t.text} must stand between two notes", t)
            continue
        if t.kind == "tuplet":
            parts = t.text[1:].split(":")
            p = int(parts[0])
            q = int(parts[1]) if len(parts) > 1 and parts[1] else None
            r = int(parts[2]) if len(parts) > 2 and parts[2] else p
            if p < 2:
                raise error(f"{t.text} is not a tuplet", t)
            if q is None:
                compound = meter is not None and meter.numerator % 3 == 0 and meter.numerator > 3
                q = {2: 3, 3: 2, 4: 3, 6: 2, 8: 3}.get(p, 3 if compound else 2)
            tuplet_left, tuplet_factor = r, Fraction(q, p)
            continue
        if t.kind == "bar":
            if next_factor != 1:
                raise error("a broken rhythm (> or <) runs into a bar line", t)
            if tuplet_left:
                raise error(f"a tuplet is missing {tuplet_left} note(s) before this bar line", t)
            close(t, t.text in SECTION_ENDS or ":" in t.text or t.text.endswith("]"))
            start = None
            continue
    if tuplet_left:
        raise AbcError(f"the tune ends inside a tuplet ({tuplet_left} note(s) missing)", tune=tune_number)
    if next_factor != 1:
        raise AbcError("the tune ends on a broken rhythm (> or <)", tune=tune_number)
    if elapsed:
        close(tune.tokens[-1], True)
    # A short bar before a pickup (or the tune's end) closes a section too; it is right only by
    # complementing a pickup somewhere in the tune (the one that opened it, or the next section's).
    for b, after in zip(bars, bars[1:] + [None]):
        if b.status == "short" and (after is None or after.status == "pickup"):
            b.status, b.ok = "closing", True
    pickups = {b.length for b in bars if b.status == "pickup"}
    for b in bars:
        if b.status == "closing" and not any(b.length + p == b.expected for p in pickups):
            b.status, b.ok = "short", False
    return bars


def parse_many(text: str) -> list[Tune]:
    """A file of tunes (an upload) → every tune, or the first AbcError naming the tune and line."""
    tunes = []
    for n, (line, chunk) in enumerate(split_tunes(text), 1):
        tunes.append(parse(chunk, tune_number=n, first_line=line))
    if not tunes:
        raise AbcError("no tunes: an ABC file holds tunes, each starting X:, T:, M:, L:, K:")
    return tunes


def pitches_of(token: Token) -> list[tuple[str, str, int]]:
    """A note or chord token's notes as (accidental, letter, octave)."""
    if token.kind == "note":
        return [note_parts(NOTE_RE.match(token.text)[0])]
    if token.kind == "chord":
        return [note_parts(n) for n in token.notes]
    return []
