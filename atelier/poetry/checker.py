"""Check a poem against its form: tone per character, rhyme per rhyming line, repeats.

`analyse` checks lines already cut to a pattern and is what `compose` runs on every poem
it returns, so the report a user sees is computed the same way for generated and for
hand-written poems. `check` is the entry point for a poem a person wrote: it parses the
text, detects the form when none is given, tries every pattern of the form, reports the
best-fitting one and, given a model, suggests replacement characters where the poem breaks
the form.

Report shape (positions are 0-based; messages count from 1 for people):
    {"form", "pattern", "rhyme_scheme", "rhyme_group", "rhyme_groups": {key: group},
     "lines": [{"text", "chars": [{"char", "required", "tones", "ok"}],
                "rhyme": {"key", "tone", "group", "char_groups", "ok"} | None}],
     "violations": [{"line", "position", "char", "kind", "message"[, "suggestions"]}],
     "compliant": bool}
Violation kinds: length, tone, unknown (a character the table lacks, where a tone is
required), rhyme, repeated_rhyme, repeat (a 叠 that does not repeat).
"""

from __future__ import annotations

import re
from functools import lru_cache

from atelier.poetry import parallel, readings
from atelier.poetry.errors import PoemError
from atelier.poetry.forms import FORMS, Form, Pattern, get_form
from atelier.poetry.prosody import PING, SCHEMES, ZE, is_han, tables, tone_fits

MAX_TEXT_CHARS = 2000
PUNCT = "，。？！；：、,.?!;:·・"
_QUOTES = "「」『』“”‘’《》\"'"
_CLAUSE = re.compile(f"[{PUNCT}\\s]+")


@lru_cache(maxsize=2)
def opencc_converter(config: str):
    import opencc

    return opencc.OpenCC(config)


def convert(text: str, config: str) -> str:
    """OpenCC conversion that keeps one character for one ('t2s', 's2t')."""
    out = opencc_converter(config).convert(text)
    if len(out) != len(text):  # a phrase rule changed the length: convert character by character
        out = "".join(opencc_converter(config).convert(c) or c for c in text)
    return out


# -- analysis of lines already cut to a pattern ------------------------------------------


def _v(line: int | None, pos: int | None, char: str | None, kind: str, message: str) -> dict:
    return {"line": line, "position": pos, "char": char, "kind": kind, "message": message}


def _where(i: int, p: int) -> str:
    return f"line {i + 1}, character {p + 1}"


def resolve_rhymes(lines: list[str], pattern: Pattern, rhyme_scheme: str,
                   fixed: dict[str, int] | None = None) -> dict[str, int]:
    """The group (index) of each rhyme key that the most of its rhyming characters are in.

    `fixed` pins keys to groups (compose knows which group it wrote in). A 叶 line counts
    for group g when its character is in a group of g's part with the other tone.
    """
    _, rhymes = tables(rhyme_scheme, pattern.kind)
    out = {}
    for key, tone in pattern.keys.items():
        members = [(lines[i][-1], l.ye) for i, l in enumerate(pattern.lines) if l.rhyme == key]
        if fixed and key in fixed:
            out[key] = fixed[key]
            continue
        best, best_hits = None, (-1, False)
        for g in rhymes.groups:
            if g.tone != tone:
                continue
            # Most rhymes in the group; on a tie, the group the first rhyme sets.
            hits = (sum(_in_group(ch, g.index, ye, rhymes) for ch, ye in members),
                    bool(members) and _in_group(members[0][0], g.index, members[0][1], rhymes))
            if hits > best_hits:
                best, best_hits = g.index, hits
        out[key] = best
    return out


def _in_group(ch: str, g: int, ye: bool, rhymes) -> bool:
    if not ye:
        # in 近体 (pingshui), a character in several groups rhymes in those Tang poets rhymed it in
        usage = readings.rhyme_groups(ch) if rhymes.scheme == "pingshui" else None
        return g in rhymes.groups_of(ch) and (usage is None or g in usage)
    group = rhymes.groups[g]
    return any(rhymes.groups[h].part == group.part and rhymes.groups[h].tone != group.tone
               for h in rhymes.groups_of(ch))


def analyse(lines: list[str], pattern: Pattern, rhyme_scheme: str = "pingshui",
            fixed_rhymes: dict[str, int] | None = None, display: list[str] | None = None) -> dict:
    """Report on `lines` (simplified, one string per pattern line, no punctuation).

    `display` holds the same lines as the user wrote them (e.g. traditional) for the report.
    """
    display = display or lines
    if [len(l) for l in lines] != list(pattern.lengths):
        raise ValueError(f"lines of lengths {[len(l) for l in lines]} do not fit {pattern.name} {pattern.lengths}")
    tones_t, rhymes_t = tables(rhyme_scheme, pattern.kind)
    groups = resolve_rhymes(lines, pattern, rhyme_scheme, fixed_rhymes)
    violations, out_lines, seen_rhymes = [], [], {}
    for i, (line, spec) in enumerate(zip(lines, pattern.lines)):
        repeats = dict(spec.repeat)
        chars = []
        for p, ch in enumerate(line):
            shown = display[i][p]
            required = spec.tones[p]
            rhyming = spec.rhyme is not None and p == len(line) - 1
            if rhyming:
                required = pattern.rhyme_tone(i) or required
            tones = tones_t.tones(ch)
            reading = None
            if tones_t.scheme == "pingshui" and len(tones) == 2 and (read := readings.reading(line, p)):
                # a polyphone counts under the reading its context gives it (相思 平, 秋思 仄)
                tones, reading = frozenset({read[0]}), {"tone": read[0], "by": read[1]}
            ok = tone_fits(required, tones)
            if p in repeats:
                si, sp = repeats[p]
                if ch != lines[si][sp]:
                    ok = False
                    violations.append(_v(i, p, shown, "repeat", f"{_where(i, p)}: this 叠 must repeat "
                                                               f"{display[si][sp]} (line {si + 1}), not {shown}"))
            elif not rhyming and not ok:
                kind = "unknown" if not tones else "tone"
                msg = (f"{_where(i, p)}: {shown} is not in the {tones_t.scheme} table, so its tone is unknown; "
                       f"{required} is required" if not tones else
                       f"{_where(i, p)}: {shown} reads {reading['tone']} in {reading['by']} (as Tang poets read it), "
                       f"{required} is required" if reading else
                       f"{_where(i, p)}: {shown} is {'/'.join(sorted(tones))}, {required} is required")
                violations.append(_v(i, p, shown, kind, msg))
            chars.append({"char": shown, "required": required, "tones": sorted(tones), "ok": ok}
                         | ({"reading": reading} if reading else {}))
        rhyme = None
        if spec.rhyme is not None:
            p, ch = len(line) - 1, line[-1]
            g = rhymes_t.groups[groups[spec.rhyme]]
            in_group = _in_group(ch, g.index, spec.ye, rhymes_t)
            char_groups = [rhymes_t.groups[h].name for h in rhymes_t.groups_of(ch)]
            want = f"{g.part} ({pattern.rhyme_tone(i)}, 叶)" if spec.ye else f"{g.name} ({g.tone})"
            if not in_group:
                found = "、".join(char_groups) if char_groups else f"not in the {rhymes_t.scheme} table"
                violations.append(_v(i, p, display[i][p], "rhyme",
                                     f"{_where(i, p)}: {display[i][p]} must rhyme in {want}; it is in {found}"))
            elif ch in seen_rhymes and p not in repeats:
                violations.append(_v(i, p, display[i][p], "repeated_rhyme",
                                     f"{_where(i, p)}: rhyme character {display[i][p]} is already used on line "
                                     f"{seen_rhymes[ch] + 1}"))
            seen_rhymes.setdefault(ch, i)
            chars[p]["ok"] = chars[p]["ok"] and in_group
            rhyme = {"key": spec.rhyme, "tone": pattern.rhyme_tone(i), "group": g.part if spec.ye else g.name,
                     "ye": spec.ye, "char_groups": char_groups, "ok": in_group}
        out_lines.append({"text": display[i], "chars": chars, "rhyme": rhyme})
    notes = forgive_aojiu(lines, pattern, tones_t, violations, out_lines) if pattern.kind == "shi" else []
    names = {k: rhymes_t.groups[g].name for k, g in groups.items()}
    # 对仗 of a 律诗's 颔联 and 颈联 (reported beside the form, not counted against it)
    couplets = [{"name": name, "lines": [a, a + 1]} | parallel.couplet(lines[a], lines[a + 1])
                for name, a in (("颔联", 2), ("颈联", 4))] if pattern.kind == "shi" and len(lines) == 8 else []
    return {"form": pattern.form, "pattern": pattern.name, "rhyme_scheme": rhyme_scheme,
            "rhyme_group": names.get("A"), "rhyme_groups": names, "lines": out_lines,
            "violations": violations, "compliant": not violations, "notes": notes, "couplets": couplets}


# -- 拗救: the licensed departures of 近体 -------------------------------------------------
# Rules in the coordinates of a line's last five characters (a 七言 line adds two in front;
# `o` is that offset). Each names a required pattern, the positions it lets break, and the
# condition that makes the break a licensed one rather than a fault (多音字 count as either):
#   平平平仄平  平平仄仄平 with its 3rd 平: 一三五不论 (no 孤平, no 三平尾 can follow)
#   孤平自救    平平仄仄平 written 仄平平仄平: the 1st may be 仄 when the 3rd turns 平
#   特拗       中平平仄仄 written 中平仄平仄: the 3rd and 4th trade tones together
#   对句救      中仄平平仄 with its 3rd/4th 仄 (拗), rescued by the next line, 平平仄仄平,
#              reading 平 in its 3rd (…平平仄平)


def forgive_aojiu(lines: list[str], pattern: Pattern, tones_t, violations: list[dict],
                  out_lines: list[dict]) -> list[dict]:
    """Drop the tone violations that a recognised 拗救 licenses; return notes naming each."""
    def breaks(i: int) -> set[int]:
        return {v["position"] for v in violations if v["kind"] == "tone" and v["line"] == i}

    def tail(i: int) -> str:
        return pattern.lines[i].tones[-5:]

    def has(i: int, pos: int, tone: str) -> bool:
        return tone in tones_t.tones(lines[i][pos])

    forgiven: dict[int, set[int]] = {}
    notes = []

    def forgive(i: int, positions: set[int], kind: str, message: str) -> None:
        forgiven.setdefault(i, set()).update(positions)
        notes.append({"line": i, "kind": kind, "message": message})

    for i, line in enumerate(lines):
        if len(line) not in (5, 7):
            continue
        o, b = len(line) - 5, breaks(i)
        if tail(i) == "平平仄仄平" and o + 2 in b and has(i, o + 2, PING):
            if o in b:
                forgive(i, {o, o + 2}, "孤平自救", f"line {i + 1}: 孤平 avoided — character {o + 1} is 仄 and "
                        f"character {o + 3} turns 平")
            else:
                forgive(i, {o + 2}, "平平平仄平", f"line {i + 1}: character {o + 3} may be 平 (一三五不论)")
        if (tail(i) in ("中平平仄仄", "平平平仄仄") and b & {o + 2, o + 3} and b <= {o, o + 2, o + 3}
                and has(i, o + 2, ZE) and has(i, o + 3, PING)):
            forgive(i, b & {o + 2, o + 3}, "特拗", f"line {i + 1}: 特拗 (…平仄平仄), a licensed form")
        if (i % 2 == 0 and i + 1 < len(lines) and len(lines[i + 1]) == len(line) and tail(i) == "中仄平平仄"
                and tail(i + 1) == "平平仄仄平"):
            ao = {p for p in b & {o + 2, o + 3} if has(i, p, ZE)}
            if ao and has(i + 1, o + 2, PING):
                forgive(i, ao, "对句救", f"lines {i + 1}–{i + 2}: the 拗 of line {i + 1} is rescued (救) by "
                        f"line {i + 2} reading 平 at character {o + 3}")
    if forgiven:
        violations[:] = [v for v in violations
                         if not (v["kind"] == "tone" and v["position"] in forgiven.get(v["line"], ()))]
        for i, ps in forgiven.items():
            for p in ps:
                out_lines[i]["chars"][p]["ok"] = True
                out_lines[i]["chars"][p]["licensed"] = True
    return notes


# -- a poem a person wrote ---------------------------------------------------------------


def parse_poem(text_or_lines) -> tuple[str | None, list[str]]:
    """(title, clauses) from a poem as text or as a list of lines.

    Clauses are split at punctuation and line breaks. A first line without punctuation
    followed by punctuated lines is taken as the title (春晓\\n春眠不觉晓，…).
    """
    if isinstance(text_or_lines, str):
        raw_lines = [l.strip() for l in text_or_lines.splitlines() if l.strip()]
    elif isinstance(text_or_lines, (list, tuple)) and all(isinstance(l, str) for l in text_or_lines):
        raw_lines = [l.strip() for l in text_or_lines if l.strip()]
    else:
        raise PoemError(f"the poem must be a string or a list of strings, got {type(text_or_lines).__name__}",
                        param="text")
    n_chars = sum(map(len, raw_lines))
    if n_chars == 0:
        raise PoemError("the poem is empty", param="text")
    if n_chars > MAX_TEXT_CHARS:
        raise PoemError(f"the poem has {n_chars} characters; at most {MAX_TEXT_CHARS} are checked", param="text")
    title = None
    has_punct = [any(c in PUNCT for c in l) for l in raw_lines]
    if isinstance(text_or_lines, str) and len(raw_lines) > 1 and not has_punct[0] and any(has_punct[1:]):
        title, raw_lines = raw_lines[0], raw_lines[1:]
    text = "\n".join(raw_lines).translate({ord(q): None for q in _QUOTES})
    bad = sorted({c for c in text if not is_han(c) and c not in PUNCT and not c.isspace()})
    if bad:
        raise PoemError(f"the poem must be Chinese characters and punctuation; found {''.join(bad)[:20]!r}",
                        param="text")
    return title, [c for c in _CLAUSE.split(text) if c]


def fit_lines(clauses: list[str], pattern: Pattern) -> list[str] | None:
    """The clauses as the pattern's lines: as written when the lengths agree, else re-cut by the
    pattern when the character count agrees (people punctuate ci differently), else None."""
    if [len(c) for c in clauses] == list(pattern.lengths):
        return list(clauses)
    text = "".join(clauses)
    if len(text) != pattern.n_chars:
        return None
    out, start = [], 0
    for n in pattern.lengths:
        out.append(text[start:start + n])
        start += n
    return out


def detect_forms(clauses: list[str]) -> list[Form]:
    """Forms whose shape fits: 近体 by line count and length, ci by character count."""
    lengths = [len(c) for c in clauses]
    if len(lengths) in (4, 8) and len(set(lengths)) == 1 and lengths[0] in (5, 7):
        key = {(4, 5): "wujue", (4, 7): "qijue", (8, 5): "wulv", (8, 7): "qilv"}[(len(lengths), lengths[0])]
        return [FORMS[key]]
    ci = [f for f in FORMS.values() if f.kind == "ci" and f.patterns[0].n_chars == sum(lengths)]
    exact = [f for f in ci if list(f.patterns[0].lengths) == lengths]
    return exact or ci


def check(text_or_lines, form: str | None = None, rhyme_scheme: str = "pingshui", *, pattern: str | None = None,
          model=None, tokenizer=None, top_k: int = 5, partial: bool = False) -> dict:
    """Check a poem against its form and say where it breaks it.

    >>> check("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")["compliant"]
    True
    With `model` and `tokenizer`, each violation gets `suggestions`: the characters the model
    finds most likely there (given the text before it) that would satisfy the position.
    `partial` checks a poem still being written (lines given so far, the last one unfinished;
    `form` required): every position of the form is in the report, those not yet written marked
    `pending` with the tone they will require, and only what is written can break the form.
    """
    if rhyme_scheme not in SCHEMES:
        raise PoemError(f"unknown rhyme_scheme {rhyme_scheme!r}; valid: {', '.join(SCHEMES)}", param="rhyme_scheme")
    if partial:
        return check_partial(text_or_lines, form, rhyme_scheme, pattern=pattern)
    if not isinstance(top_k, int) or not 1 <= top_k <= 20:
        raise PoemError(f"top_k must be an integer from 1 to 20, got {top_k!r}", param="top_k")
    title, clauses = parse_poem(text_or_lines)
    simple = [convert(c, "t2s") for c in clauses]
    traditional = simple != clauses
    if form is None and pattern is not None:  # a pattern names its form
        form = next((f.key for f in FORMS.values() for p in f.patterns if p.name == pattern), None)
        if form is None:
            valid = ", ".join(p.name for f in FORMS.values() for p in f.patterns if f.kind == "shi")
            raise PoemError(f"unknown pattern {pattern!r}; valid: {valid} (or a ci form's)", param="pattern")
    if form is not None:
        f = get_form(form)
        candidates = [f.pattern(pattern)] if pattern else list(f.patterns)
    else:
        forms = detect_forms(simple)
        if not forms:
            raise PoemError(f"cannot tell the form of a poem of {len(clauses)} lines of lengths "
                            f"{[len(c) for c in clauses]} ({sum(map(len, clauses))} characters); pass form=, one of "
                            f"{', '.join(FORMS)}", param="form")
        candidates = [p for f in forms for p in f.patterns]

    best = None
    for p in candidates:
        lines = fit_lines(simple, p)
        if lines is None:
            continue
        display = fit_lines(clauses, p)
        report = analyse(lines, p, rhyme_scheme, display=display)
        if best is None or len(report["violations"]) < len(best[0]["violations"]):
            best = (report, p, lines)
    if best is None:
        p = candidates[0]
        msg = (f"{FORMS[p.form].title} needs {len(p.lengths)} lines of lengths {list(p.lengths)} "
               f"({p.n_chars} characters); the poem has {len(clauses)} lines of lengths {[len(c) for c in clauses]}")
        return {"form": p.form, "pattern": None, "rhyme_scheme": rhyme_scheme, "rhyme_group": None,
                "rhyme_groups": {}, "lines": [], "violations": [_v(None, None, None, "length", msg)],
                "compliant": False, "title": title}
    report, p, lines = best
    report["title"] = title
    if model is not None and tokenizer is not None and report["violations"]:
        add_suggestions(report, lines, p, rhyme_scheme, model, tokenizer, title=title, top_k=top_k,
                        traditional=traditional)
    return report


PENDING = "字"  # stands in for a character not yet written; its tone and rhyme are never judged


def check_partial(lines, form: str | None, rhyme_scheme: str = "pingshui", *, pattern: str | None = None) -> dict:
    """check(…, partial=True): the best pattern for what is written so far, judged on that alone."""
    if form is None:
        raise PoemError("checking a poem as it is written needs its form", param="form")
    f = get_form(form)
    title, written = parse_poem(lines) if lines else (None, [])
    written = [convert(c, "t2s") for c in written]
    shape = list(f.patterns[0].lengths)
    if len(written) > len(shape) or any(len(w) > k for w, k in zip(written, shape)):
        raise PoemError(f"{f.title} has {len(shape)} lines of lengths {shape}; the poem so far has lines of lengths "
                        f"{[len(w) for w in written]}", param="lines")
    typed = [len(w) for w in written] + [0] * (len(shape) - len(written))
    padded = [(w + PENDING * k)[:k] for w, k in zip(written + [""] * len(shape), shape)]

    def judged(v: dict) -> bool:
        return v["line"] is not None and v["position"] is not None and v["position"] < typed[v["line"]]

    best = None
    for p in ([f.pattern(pattern)] if pattern else list(f.patterns)):
        report = analyse(padded, p, rhyme_scheme)
        report["violations"] = [v for v in report["violations"] if judged(v)]
        if best is None or len(report["violations"]) < len(best["violations"]):
            best = report
    for i, line in enumerate(best["lines"]):
        line["text"] = padded[i][:typed[i]]
        for pos, c in enumerate(line["chars"]):
            if pos >= typed[i]:
                c.update(char="", tones=[], ok=True, pending=True)
        if line.get("rhyme") and typed[i] < len(line["chars"]):
            line["rhyme"]["ok"] = True
            line["rhyme"]["pending"] = True
    best.update(title=title, partial=True, compliant=not best["violations"],
                complete=typed == shape)
    return best


def add_suggestions(report: dict, lines: list[str], pattern: Pattern, rhyme_scheme: str, model, tokenizer,
                    title: str | None = None, top_k: int = 5, traditional: bool = False) -> None:
    """Give each violation the top_k characters the model prefers there that fit the position.

    One forward pass over the whole poem: the logits at token t-1 score the character at t
    given everything before it.
    """
    import torch

    from atelier.poetry.masks import vocab_masks

    masks = vocab_masks(tokenizer, rhyme_scheme, pattern.kind)
    prefix = [tokenizer.bos_id] + (tokenizer.encode(convert(title, "t2s") + "\n") if title else [])
    ids, where = list(prefix), {}
    for i, (line, spec) in enumerate(zip(lines, pattern.lines)):
        for p, ch in enumerate(line):
            where[(i, p)] = len(ids)
            ids.append(tokenizer.stoi.get(ch, tokenizer.unk_id))
        ids.append(tokenizer.stoi.get(spec.end, tokenizer.unk_id))
    ids = ids[: model.config.n_positions]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    used_rhymes = {l[-1] for l, s in zip(lines, pattern.lines) if s.rhyme}
    groups = {k: i for k, i in zip(report["rhyme_groups"], _group_ids(report, rhyme_scheme, pattern.kind))}
    for v in report["violations"]:
        i, p = v["line"], v["position"]
        if i is None or (i, p) not in where or where[(i, p)] >= len(ids):
            continue
        spec = pattern.lines[i]
        if v["kind"] == "repeat":
            si, sp = dict(spec.repeat)[p]
            v["suggestions"] = [lines[si][sp]]
            continue
        if v["kind"] in ("rhyme", "repeated_rhyme"):
            g = groups[spec.rhyme]
            allowed = (masks.ye_member[g] if spec.ye else masks.member[g]).clone()
            for ch in used_rhymes:
                if ch in tokenizer.stoi:
                    allowed[tokenizer.stoi[ch]] = False
        else:
            allowed = masks.tone(spec.tones[p]).clone()
        if lines[i][p] in tokenizer.stoi:
            allowed[tokenizer.stoi[lines[i][p]]] = False
        scores = logits[0, where[(i, p)] - 1].masked_fill(~allowed, float("-inf"))
        top = torch.topk(scores, min(top_k, int(allowed.sum()))).indices.tolist() if allowed.any() else []
        chars = [tokenizer.itos[t] for t in top]
        v["suggestions"] = [convert(c, "s2t") for c in chars] if traditional else chars


def _group_ids(report: dict, rhyme_scheme: str, kind: str) -> list[int]:
    _, rhymes = tables(rhyme_scheme, kind)
    by_name = {g.name: g.index for g in rhymes.groups}
    return [by_name[n] for n in report["rhyme_groups"].values()]
