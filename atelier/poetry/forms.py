"""Poem forms: how many lines, how long, which tone at each character, which ones rhyme.

A *form* is what a request names (`wujue`, `qilv`, `ci:浣溪沙`); a *pattern* is one concrete
layout of it. A 近体 form has four patterns (平起/仄起 × 首句入韵 or not, from
`jinti_patterns.json`, in their loose version where the normally free syllables are 中);
a ci form has one (the first 龙榆生《唐宋词格律》 format of the tune, else the first
钦定词谱 format, from the extract of `cipai.json` in `data/`).

Rhymes are described by *keys*: every rhyming line names a key, lines with the same key
rhyme together, and a key has a tone (平 or 仄). A 近体 poem has one key. Ci that change
rhyme (菩萨蛮: 仄, 平, 换仄, 换平) have several. A line marked `ye` (叶韵, 西江月) rhymes
with its key's part but in the other tone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from atelier.poetry.errors import PoemError
from atelier.poetry.prosody import EITHER, PACKAGE_DATA, PING, ZE

SHI_FORMS = {"wujue": "五绝", "qijue": "七绝", "wulv": "五律", "qilv": "七律"}

# Ci tunes offered: the 15 most requested plus other common short tunes whose 词谱 data is
# clean (lines aligned with the example, rhyme positions agreeing with the line marks).
CI_TUNES = (
    "浣溪沙", "菩萨蛮", "如梦令", "清平乐", "卜算子", "蝶恋花", "西江月", "鹧鸪天", "临江仙", "虞美人",
    "江城子", "忆江南", "长相思", "点绛唇", "生查子", "渔家傲", "采桑子", "踏莎行", "忆秦娥", "好事近",
    "减字木兰花", "一剪梅", "醉花阴", "相见欢", "定风波", "水调歌头", "念奴娇", "满江红", "沁园春",
)


@dataclass(frozen=True)
class Line:
    tones: str  # required tone per character: 平 / 仄 / 中
    end: str  # punctuation after the line: ， 。 or 、
    rhyme: str | None = None  # rhyme key of the last character, None when it does not rhyme
    ye: bool = False  # 叶韵: rhymes with its key's part in the other tone
    # 叠 (repeats): character positions copied from earlier in the poem, ((pos, (line, pos)), …).
    repeat: tuple[tuple[int, tuple[int, int]], ...] = ()

    def __len__(self) -> int:
        return len(self.tones)


@dataclass(frozen=True)
class Pattern:
    form: str  # wujue … qilv, or ci:<tune>
    name: str  # 七绝仄起首句入韵, or 浣溪沙·龙榆生格一
    kind: str  # shi | ci
    lines: tuple[Line, ...]
    keys: dict[str, str] = field(hash=False)  # rhyme key → tone of its (non-叶) rhymes
    stanza_starts: tuple[int, ...] | None = None

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(l) for l in self.lines)

    @property
    def n_chars(self) -> int:
        return sum(self.lengths)

    def rhyme_tone(self, line: int) -> str | None:
        """The tone the last character of `line` must rhyme in (叶 flips its key's tone)."""
        l = self.lines[line]
        if l.rhyme is None:
            return None
        tone = self.keys[l.rhyme]
        return (ZE if tone == PING else PING) if l.ye else tone


@dataclass(frozen=True)
class Form:
    key: str  # what a request names: wujue, ci:浣溪沙
    title: str  # 五绝, 浣溪沙
    kind: str  # shi | ci
    patterns: tuple[Pattern, ...]
    aliases: tuple[str, ...] = ()

    def pattern(self, name: str | None) -> Pattern | None:
        if name is None:
            return None
        for p in self.patterns:
            if p.name == name:
                return p
        valid = ", ".join(p.name for p in self.patterns)
        raise PoemError(f"pattern {name!r} is not a pattern of {self.key}; valid: {valid}", param="pattern")


# -- 近体诗 --------------------------------------------------------------------------------


def _shi_patterns(data_dir: Path) -> dict[str, list[Pattern]]:
    raw = json.loads((data_dir / "jinti_patterns.json").read_text(encoding="utf-8"))
    by_title = {v: k for k, v in SHI_FORMS.items()}
    out: dict[str, list[Pattern]] = {k: [] for k in SHI_FORMS}
    for p in raw["patterns"]:
        rhyming = set(p["rhyme_lines"])  # 1-based
        lines = tuple(Line(tones=t, end="，" if i % 2 == 0 else "。", rhyme="A" if i + 1 in rhyming else None)
                      for i, t in enumerate(p["loose"]))
        out[by_title[p["form"]]].append(Pattern(form=by_title[p["form"]], name=p["name"], kind="shi",
                                                lines=lines, keys={"A": PING}))
    return out


# -- 词 ------------------------------------------------------------------------------------


def _ci_pattern(tune: dict) -> Pattern:
    """One Pattern from a tune record of cipai.json (first 龙榆生 format, else first 钦定)."""
    fmt = (tune["longyusheng"] or tune["qinding"])[0]
    source = "龙榆生" if tune["longyusheng"] else "钦定词谱"
    # rhyme_groups: upstream key → positions; a negative position -p is a 叶 at syllable p.
    # Rename keys A, B, … in order of first appearance.
    at: dict[int, tuple[str, bool]] = {}
    order = sorted(fmt["rhyme_groups"].items(), key=lambda kv: min(abs(p) for p in kv[1]))
    for n, (_, positions) in enumerate(order):
        for p in positions:
            at[abs(p)] = (chr(ord("A") + n), p < 0)
    tones = fmt["tones"]
    keys: dict[str, str] = {}
    for pos, (key, ye) in at.items():
        t = tones[pos]
        if not ye and t != EITHER:
            if keys.setdefault(key, t) != t:
                raise ValueError(f"{tune['name']}: rhyme key {key} mixes tones")
    for key, _ in at.values():
        keys.setdefault(key, PING)  # a key whose rhymes are all 中 rhymes in 平

    lines, start, texts = [], 0, []
    for i, l in enumerate(fmt["lines"]):
        end_pos = start + l["len"] - 1
        rhyme, ye = at.get(end_pos, (None, False))
        repeat: tuple = ()
        if l["mark"] == "叠":
            prev, prev_len = texts[-1], len(fmt["lines"][i - 1]["tones"])
            if l["text"] == prev[-l["len"]:]:
                # 如梦令 如梦。如梦。, 忆秦娥 秦楼月: the whole clause repeats the previous one's end.
                repeat = tuple((k, (i - 1, prev_len - l["len"] + k)) for k in range(l["len"]))
            else:
                # 长相思 汴水流，泗水流: only the rhyme character repeats.
                repeat = ((l["len"] - 1, (i - 1, prev_len - 1)),)
        end = "。" if rhyme else ("、" if l["mark"] == "读" else "，")
        lines.append(Line(tones=l["tones"], end=end, rhyme=rhyme, ye=ye, repeat=repeat))
        texts.append(l["text"])
        start += l["len"]
    if "".join(l.tones for l in lines) != tones:
        raise ValueError(f"{tune['name']}: lines do not join back to the tone string")
    label = fmt["label"].split()[-1]  # "格二 定格（加衬字）": couyun's number, then 龙榆生's name
    return Pattern(form="ci:" + tune["name"], name=f"{tune['name']}·{source}{label}", kind="ci",
                   lines=tuple(lines), keys=keys,
                   stanza_starts=tuple(fmt["stanza_starts"]) if fmt.get("stanza_starts") else None)


@lru_cache(maxsize=2)
def load_forms(data_dir: Path = PACKAGE_DATA) -> dict[str, Form]:
    """Every form the engine knows, keyed by request name."""
    data_dir = Path(data_dir)
    forms = {k: Form(key=k, title=SHI_FORMS[k], kind="shi", patterns=tuple(ps), aliases=(SHI_FORMS[k],))
             for k, ps in _shi_patterns(data_dir).items()}
    raw = json.loads((data_dir / "cipai.json").read_text(encoding="utf-8"))
    tunes = {t["name"]: t for t in raw["tunes"]}
    for name in CI_TUNES:
        t = tunes[name]
        forms["ci:" + name] = Form(key="ci:" + name, title=name, kind="ci", patterns=(_ci_pattern(t),),
                                   aliases=tuple(t.get("aliases", ())))
    return forms


FORMS = load_forms()


def get_form(name: str) -> Form:
    """The form a request names: wujue | qijue | wulv | qilv | ci:<tune> (or 五绝 …, ci:<alias>)."""
    if not isinstance(name, str) or not name.strip():
        raise PoemError(f"form must be a non-empty string, got {name!r}; valid: {', '.join(FORMS)}", param="form")
    name = name.strip()
    if name in FORMS:
        return FORMS[name]
    for f in FORMS.values():
        if name in f.aliases or (f.kind == "ci" and name.startswith("ci:") and name[3:] in f.aliases):
            return f
    hint = f" (ci tunes are named ci:<tune>, e.g. ci:{name})" if "ci:" + name in FORMS else ""
    raise PoemError(f"unknown form {name!r}{hint}; valid: {', '.join(FORMS)}", param="form")


def form_catalog() -> list[dict]:
    """The forms as plain data, e.g. for an API listing: key, title, kind, lines, patterns."""
    return [{"form": f.key, "title": f.title, "kind": f.kind, "aliases": list(f.aliases),
             "lines": list(f.patterns[0].lengths), "patterns": [p.name for p in f.patterns],
             "rhyme_keys": dict(f.patterns[0].keys)} for f in FORMS.values()]


def extract_cipai(src: Path, dst: Path = PACKAGE_DATA / "cipai.json") -> None:
    """Write the tunes of CI_TUNES from the full cipai.json (4.5 MB) into a small extract.

    Keeps each tune's first 龙榆生 and first 钦定 format, the ones `_ci_pattern` reads.
        .venv/bin/python -m atelier.poetry.forms ../shared/data/poetry/cipai.json
    """
    raw = json.loads(Path(src).read_text(encoding="utf-8"))
    tunes = [dict(t, qinding=t["qinding"][:1], longyusheng=t["longyusheng"][:1])
             for t in raw["tunes"] if t["name"] in CI_TUNES]
    meta = dict(raw["meta"], extract=f"Atelier extract: the {len(tunes)} tunes the poetry engine offers, "
                                     "first 钦定 and first 龙榆生 format of each (atelier.poetry.forms.extract_cipai)")
    text = json.dumps({"meta": meta, "tunes": tunes}, ensure_ascii=False, indent=None)
    Path(dst).write_text(text.replace('}, {"id"', '},\n{"id"') + "\n", encoding="utf-8")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write atelier/poetry/data/cipai.json from the full cipai.json.")
    ap.add_argument("src", type=Path, help="the shared cipai.json (../shared/data/poetry/cipai.json)")
    extract_cipai(ap.parse_args().src)
