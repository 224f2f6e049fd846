"""Prosody tables: which tone class a character has and which rhyme groups it belongs to.

Three tables, all read the same way (a character → the groups it is in; a group has a tone):
- `pingshui` 平水韵: 106 groups (上平/下平 are 平; 上声/去声/入声 are 仄). Tones and rhymes
  of 近体诗, and the tones of ci.
- `cilin` 词林正韵: 19 parts split by tone into 33 groups (平, 仄 = 上+去, 入). Rhymes of ci.
- `xinyun` 中华新韵: 14 rhymes × {平, 仄} = 28 groups, from the most common modern
  reading that `pypinyin` gives (tones 1/2 平, 3/4 仄; the neutral tone is unknown). Tones and rhymes
  of either kind of poem when a request asks for `rhyme_scheme="xinyun"`.

A character's tone class is the set of tones of its groups: {平}, {仄}, {平, 仄} (a 多音字
with readings of both kinds counts as either) or the empty set: *unknown*. Unknown is not
仄: the engine never puts an unknown character where a tone or a rhyme is required.

Tables are read from `atelier/poetry/data/` (small copies of the shared data, with their
licences), so the server works without the shared data folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from atelier.poetry.errors import PoemError

PING, ZE, EITHER = "平", "仄", "中"  # required tone at a position; 中 = 可平可仄
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
SCHEMES = ("pingshui", "xinyun")  # what a request may name as rhyme_scheme


def is_han(ch: str) -> bool:
    """True for a CJK ideograph (basic block, extension A, compatibility block)."""
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF


def tone_fits(required: str, tones: frozenset[str]) -> bool:
    """Does a character with tone class `tones` fit a position that requires `required`?"""
    if required == EITHER:
        return True
    return required in tones


@dataclass(frozen=True)
class RhymeGroup:
    index: int  # position in its table
    name: str  # simplified: 一东 (pingshui), 第一部平 (cilin), 一麻平 (xinyun)
    name_trad: str  # traditional name where there is one (一東), else = name
    part: str  # the family a request names: 一东, 第一部, 一麻
    tone: str  # 平 | 仄: the tone class its characters take as rhymes
    label: str  # finer tone: 上平/下平/上声/去声/入声 (pingshui), 平/仄/入 (cilin), 平/仄 (xinyun)
    chars: frozenset[str]

    def __repr__(self) -> str:
        return f"RhymeGroup({self.name}, {self.tone}, {len(self.chars)} chars)"


class RhymeTable:
    """Groups of one scheme and the index from character to groups."""

    def __init__(self, scheme: str, groups: list[RhymeGroup]):
        self.scheme = scheme
        self.groups = groups
        self._of: dict[str, tuple[int, ...]] = {}
        for g in groups:
            for ch in g.chars:
                self._of[ch] = self._of.get(ch, ()) + (g.index,)

    def groups_of(self, ch: str) -> tuple[int, ...]:
        return self._of.get(ch, ())

    def tones(self, ch: str) -> frozenset[str]:
        """{平}, {仄}, {平, 仄} or frozenset() when the character is not in the table."""
        return frozenset(self.groups[i].tone for i in self.groups_of(ch))

    def find(self, name: str, tone: str | None = None) -> RhymeGroup:
        """The group a request names: 一东 or 一東 or 东 (pingshui); 第七部 (cilin); 一麻 (xinyun).

        Names that stand for a family with groups of both tones (cilin, xinyun) take the
        group of `tone`; without it, the 平 one.
        """
        name = name.strip()
        matches = [g for g in self.groups
                   if name in (g.name, g.name_trad, g.part) or (len(name) == 1 and g.part.endswith(name))]
        if len(matches) > 1:
            matches = [g for g in matches if g.tone == (tone or PING)] or matches
        if not matches:
            valid = "、".join(dict.fromkeys(g.part for g in self.groups))
            raise PoemError(f"unknown {self.scheme} rhyme group {name!r}; valid: {valid}", param="rhyme")
        return matches[0]


# -- the three tables ---------------------------------------------------------------------


@lru_cache(maxsize=4)
def pingshui(data_dir: Path = PACKAGE_DATA) -> RhymeTable:
    """平水韵, simplified and traditional characters in one index.

    A traditional character and its simplified form share the group, so a poem checks the
    same in either script. Where a traditional character is also the simplified form of
    another (后/後, 干/乾), it takes both characters' groups: more readings, never fewer.
    """
    raw = json.loads((Path(data_dir) / "pingshui.json").read_text(encoding="utf-8"))
    members = [set(g["chars_s"]) | set(g["chars"]) for g in raw["groups"]]
    # pingshui_supplement.json: common characters the Wikisource table spells another way
    # (溪 is there as 谿) or lacks (啼, 沉, 炉): small, hand-written, documented in its meta.
    extra = json.loads((Path(data_dir) / "pingshui_supplement.json").read_text(encoding="utf-8"))
    known = set().union(*members)
    index = {g["name_s"]: i for i, g in enumerate(raw["groups"])}
    for ch, form in extra["variants"].items():
        if ch not in known:
            for m in members:
                if form in m:
                    m.add(ch)
    for ch, names in extra["groups"].items():
        if ch not in known:
            for name in names:
                members[index[name]].add(ch)
    groups = [RhymeGroup(index=i, name=g["name_s"], name_trad=g["name"], part=g["name_s"],
                         tone=PING if g["ping"] else ZE, label=g["tone"], chars=frozenset(members[i]))
              for i, g in enumerate(raw["groups"])]
    return RhymeTable("pingshui", groups)


@lru_cache(maxsize=4)
def cilin(data_dir: Path = PACKAGE_DATA) -> RhymeTable:
    """词林正韵: 第一部平 … 第十四部仄, 第十五部入 … 第十九部入 (simplified characters)."""
    raw = json.loads((Path(data_dir) / "cilin.json").read_text(encoding="utf-8"))
    groups = []
    for i, g in enumerate(raw["groups"]):
        name = g["name"] + g["tone"]
        groups.append(RhymeGroup(index=i, name=name, name_trad=name, part=g["name"],
                                 tone=PING if g["ping"] else ZE, label=g["tone"], chars=frozenset(g["chars"])))
    return RhymeTable("cilin", groups)


# 中华新韵 (中华诗词学会, 2004): 14 rhymes by final. "-i" is the apical vowel of zhi/chi/shi/ri/zi/ci/si.
XINYUN_RHYMES = {
    "一麻": ("a", "ia", "ua"),
    "二波": ("o", "e", "uo", "ê"),
    "三皆": ("ie", "üe"),
    "四开": ("ai", "uai"),
    "五微": ("ei", "ui"),
    "六豪": ("ao", "iao"),
    "七尤": ("ou", "iu"),
    "八寒": ("an", "ian", "uan", "üan"),
    "九文": ("en", "in", "un", "ün"),
    "十唐": ("ang", "iang", "uang"),
    "十一庚": ("eng", "ing", "ong", "iong"),
    "十二齐": ("i", "er", "ü"),
    "十三支": ("-i",),
    "十四姑": ("u",),
}
_FINAL_TO_RHYME = {f: r for r, finals in XINYUN_RHYMES.items() for f in finals}
_INITIALS = ("zh", "ch", "sh", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "r", "z", "c", "s")
# Spellings with y/w stand for a final with no initial (yu = ü, wei = uei → ui, …).
_YW = {"yi": "i", "ya": "ia", "yao": "iao", "ye": "ie", "you": "iu", "yan": "ian", "yin": "in", "yang": "iang",
       "ying": "ing", "yong": "iong", "yo": "o", "yu": "ü", "yue": "üe", "yuan": "üan", "yun": "ün",
       "wu": "u", "wa": "ua", "wo": "uo", "wai": "uai", "wei": "ui", "wan": "uan", "wen": "un", "wang": "uang",
       "weng": "eng"}


def pinyin_final(syllable: str) -> str | None:
    """The 中华新韵 final of a toneless pinyin syllable ('zhong' → 'ong', 'shi' → '-i', 'lv' → 'ü')."""
    s = syllable.replace("v", "ü").replace("u:", "ü")
    if s in _YW:
        return _YW[s]
    for ini in _INITIALS:
        if s.startswith(ini) and len(s) > len(ini):
            final = s[len(ini):]
            if ini in ("j", "q", "x") and final.startswith("u"):
                final = "ü" + final[1:]  # ju = jü
            if final == "i" and ini in ("zh", "ch", "sh", "r", "z", "c", "s"):
                return "-i"
            return final
    return s  # a bare final: a, e, er, ou, …


@lru_cache(maxsize=65536)
def xinyun_readings(ch: str) -> tuple[tuple[str, str], ...]:
    """(rhyme, tone) of the modern reading of ch, e.g. 空 → (('十一庚', '平'),).

    Only pypinyin's first (most common) reading counts: its lists of other readings hold
    rare and historical ones (呼 xià, 家 jià) that would let almost anything rhyme.
    """
    from pypinyin import Style, pinyin  # optional dependency, needed for xinyun only

    if not is_han(ch):
        return ()
    out = []
    found = pinyin(ch, style=Style.TONE3, heteronym=False, neutral_tone_with_five=True, errors="ignore")
    for syl in found[0] if found else []:
        if not syl or not syl[-1].isdigit() or syl[-1] == "5":
            continue  # no reading, or the neutral tone: neither 平 nor 仄
        rhyme = _FINAL_TO_RHYME.get(pinyin_final(syl[:-1]))
        if rhyme:
            out.append((rhyme, PING if syl[-1] in "12" else ZE))
    return tuple(dict.fromkeys(out))


class XinyunTable(RhymeTable):
    """中华新韵 computed from pypinyin, character by character (cached).

    The group member lists cover the characters of the 平水韵 table (for reports and for
    choosing a group); `groups_of` answers for any character.
    """

    def __init__(self, universe: frozenset[str]):
        order = list(XINYUN_RHYMES)
        members: dict[tuple[str, str], set[str]] = {(r, t): set() for r in order for t in (PING, ZE)}
        for ch in universe:
            for key in xinyun_readings(ch):
                members[key].add(ch)
        groups = [RhymeGroup(index=i, name=r + t, name_trad=r + t, part=r, tone=t, label=t,
                             chars=frozenset(members[(r, t)]))
                  for i, (r, t) in enumerate(members)]
        self._index = {(g.part, g.tone): g.index for g in groups}
        super().__init__("xinyun", groups)

    def groups_of(self, ch: str) -> tuple[int, ...]:
        return tuple(self._index[key] for key in xinyun_readings(ch))


@lru_cache(maxsize=1)
def xinyun() -> XinyunTable:
    return XinyunTable(frozenset(c for g in pingshui().groups for c in g.chars))


def tables(rhyme_scheme: str, kind: str) -> tuple[RhymeTable, RhymeTable]:
    """(tone table, rhyme table) for a scheme and a kind of poem ('shi' or 'ci').

    pingshui: 近体诗 take tones and rhymes from 平水韵; ci take tones from 平水韵 and rhymes
    from 词林正韵 (ci rhyme by its wider parts). xinyun: both from 中华新韵.
    """
    if rhyme_scheme == "pingshui":
        return pingshui(), (pingshui() if kind == "shi" else cilin())
    if rhyme_scheme == "xinyun":
        try:
            table = xinyun()
        except ImportError as e:
            raise PoemError("rhyme_scheme 'xinyun' needs the pypinyin package (pip install pypinyin==0.55.0)",
                            param="rhyme_scheme") from e
        return table, table
    raise PoemError(f"unknown rhyme_scheme {rhyme_scheme!r}; valid: {', '.join(SCHEMES)}", param="rhyme_scheme")
