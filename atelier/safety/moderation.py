"""Lexicon moderation for Chinese and English text, in the categories of OpenAI's moderation API.

    >>> moderator = Moderator.load(None)              # the shipped lists only
    >>> text = "You ＩＤＩＯＴ, I’ll hurt you"
    >>> result = moderator.check(text)
    >>> result.flagged, result.categories["harassment"], result.categories["hate"]
    (True, True, False)
    >>> [(m.category, text[m.start:m.end]) for m in result.matches]
    [('harassment', 'ＩＤＩＯＴ'), ('harassment/threatening', 'I’ll hurt you')]
    >>> moderator.check("床前明月光，疑是地上霜。").flagged
    False

Lists. Every category has a list: `atelier/safety/data/moderation/<category>.txt` ships with
Atelier (a small, illustrative STARTING POINT, not a complete lexicon), and an operator's
`ATELIER_HOME/moderation/<category>.txt` is read in addition. A category with a slash is a
folder: `harassment/threatening.txt`. One entry per line:
    idiot          a term
    porn*          a term followed by anything (porn, porno, pornography): no end boundary
    re:\\bi will hurt you\\b   a regular expression (Python syntax), matched against the normalised text
    -moron         operator lists only: remove this entry from the shipped list
    \\-x, \\#x      a leading backslash keeps a leading '-', '#' or 're:' literal
    # comment      whole-line comments; blank lines are ignored
An operator file for a category that does not exist, or a regular expression that does not
compile, is a ValueError naming the file and line. The lists are read once, by `load`.

How a text is checked:
1. Normalise each character: NFKC (full-width Ａ→A, ｈｅｌｌｏ→hello, 。stays), case-folded,
   typographic apostrophes (’ ‘ ʼ) → '; every run of whitespace becomes one space. Each normalised character remembers the index
   of the original character it came from, so that matches are reported in the original text.
2. Run one Aho–Corasick automaton (ahocorapy, built once in __init__) over the normalised text:
   O(text + matches) whatever the number of terms.
3. Keep a term's hit only at word boundaries where the term begins or ends with a Latin letter
   or digit ("kill" is not in "skill"); terms in Chinese are plain substrings (no spaces
   between words to anchor on).
4. Run the regular expressions.
5. A category is flagged when it has a hit; a hit in a sub-category (`self-harm/intent`) flags
   its parent (`self-harm`) too.

What it catches: the listed words and phrases, in any letter case, in full-width or
half-width forms, with any amount of whitespace between words.
What it cannot: meaning. It has no context (a quotation, a news report, a history lesson or a
support message is flagged like an insult: false positives on quotes), no paraphrase or
synonyms beyond the lists, no images, no misspellings, and easy evasion: spacing inside a
word (i d i o t, 白 痴), homophones and look-alike characters (白吃, 1d1ot), pinyin, or
traditional characters missing from the lists. Scores are lexicon hits (1.0 or 0.0), not
probabilities.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ahocorapy.keywordtree import KeywordTree

log = logging.getLogger("atelier.safety")

CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
              "violence/graphic")
_NONE, _ZERO = dict.fromkeys(CATEGORIES, False), dict.fromkeys(CATEGORIES, 0.0)  # a clean Result's
DEFAULT_LISTS = Path(__file__).resolve().parent / "data" / "moderation"


class Match(NamedTuple):
    category: str
    term: str    # the list entry that matched, as written ("idiot*", "re:…")
    start: int   # offsets into the original text: text[start:end] is what matched
    end: int


@dataclass(frozen=True)
class Result:
    """What `Moderator.check` found. `category_scores` are lexicon hits (1.0 for a category with a hit,
    0.0 otherwise), not probabilities; `categories` and `category_scores` hold every category."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    matches: list[Match]


# -- normalisation ---------------------------------------------------------------------------------

_CJK = re.compile("[\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
                  "\uf900-\ufaff\U00020000-\U0003134f]")


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


@lru_cache(maxsize=16384)
def _fold(ch: str) -> str:
    return unicodedata.normalize("NFKC", ch).casefold().translate(_APOSTROPHES)


def _is_word(ch: str) -> bool:
    """A character that words are made of, in scripts that separate words by spaces."""
    return (ch.isalnum() or ch == "_") and not _CJK.match(ch)


def normalise(text: str) -> tuple[str, list[int]]:
    """NFKC + casefold + plain apostrophes per character, whitespace runs → " ". Returns (normalised, origin) where
    origin[i] is the index in `text` of the character normalised character i came from."""
    out, origin, _ = _normalise_from(text, 0, False)
    return "".join(out), origin


def _normalise_from(text: str, offset: int, space: bool) -> tuple[list[str], list[int], bool]:
    """`normalise` of a text that continues one already normalised: origins start at `offset`, and `space`
    says whether that one ended in a whitespace run. Returns the characters, origins and the new `space`."""
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text, offset):
        folded = " " if ch.isspace() else _fold(ch)
        for c in folded:
            if c.isspace():
                if space:
                    continue
                c, space = " ", True
            else:
                space = False
            out.append(c)
            origin.append(i)
    return out, origin, space


# -- lists ----------------------------------------------------------------------------------------

class _Entry(NamedTuple):
    text: str    # as written, without a removal '-' or an escaping '\'
    where: str   # "moderation/hate.txt:3", for error messages


def _read_list(path: Path, label: str) -> list[tuple[_Entry, bool]]:
    """(entry, is_removal) for every entry of one list file."""
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        removal = line.startswith("-")
        if removal:
            line = line[1:].strip()
        entries.append((_Entry(line, f"{label}:{n}"), removal))
    return entries


def _key(entry: str) -> str:
    """How entries are compared when an operator removes one: normalised, escape dropped."""
    return normalise(entry[1:] if entry.startswith("\\") else entry)[0].strip()


def _merged_lists(home: Path | None) -> dict[str, list[_Entry]]:
    if not DEFAULT_LISTS.is_dir():  # an install without package data would otherwise flag nothing, silently
        raise ValueError(f"the shipped moderation lists are missing: {DEFAULT_LISTS} (package data "
                         "atelier/safety/data/**)")
    lists: dict[str, list[_Entry]] = {}
    for category in CATEGORIES:
        path = DEFAULT_LISTS / f"{category}.txt"
        shipped = _read_list(path, f"defaults/{category}.txt") if path.exists() else []
        lists[category] = [e for e, removal in shipped if not removal]
    folder = home / "moderation" if home is not None else None
    if folder is None or not folder.is_dir():
        return lists
    for path in sorted(folder.rglob("*.txt")):
        category = path.relative_to(folder).with_suffix("").as_posix()
        label = f"moderation/{category}.txt"
        if category not in lists:
            raise ValueError(f"{label}: {category!r} is not a moderation category; the lists are named after "
                             f"these: {', '.join(CATEGORIES)} (a slash is a folder: harassment/threatening.txt)")
        for entry, removal in _read_list(path, label):
            if not removal:
                lists[category].append(entry)
                continue
            before = len(lists[category])
            lists[category] = [e for e in lists[category] if _key(e.text) != _key(entry.text)]
            if len(lists[category]) == before:
                log.warning("%s: '-%s' removes nothing: %r is not in the %s list", entry.where, entry.text,
                            entry.text, category)
    return lists


# -- the moderator --------------------------------------------------------------------------------

class _Term(NamedTuple):
    category: str
    entry: str            # as written in the list
    check_start: bool     # needs a word boundary before it
    check_end: bool       # needs a word boundary after it


class Moderator:
    """One Aho–Corasick automaton over every term, plus the regular expressions; build once, check often."""

    def __init__(self, lists: dict[str, list[str]]):
        """`lists`: category → entries in the list-file syntax (terms, `term*`, `re:pattern`; no removals)."""
        unknown = sorted(set(lists) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown moderation categories {unknown}; expected some of: {', '.join(CATEGORIES)}")
        self._terms: dict[str, list[_Term]] = {}  # normalised term → who listed it
        self._patterns: list[tuple[str, str, re.Pattern]] = []
        self._tree = KeywordTree()
        for category, entries in lists.items():
            for raw in entries:
                entry = raw.text if isinstance(raw, _Entry) else raw
                where = raw.where if isinstance(raw, _Entry) else f"{category} list"
                self._add(category, entry, where)
        self._tree.finalize()
        self._longest = max(map(len, self._terms), default=1)  # normalised characters
        self.size = sum(len(v) for v in self._terms.values()) + len(self._patterns)

    @classmethod
    def load(cls, home: Path | None) -> Moderator:
        """The shipped lists plus the operator's `home/moderation/<category>.txt` (None: shipped only)."""
        return cls(_merged_lists(home))

    def _add(self, category: str, entry: str, where: str) -> None:
        if entry.startswith("re:"):
            try:
                self._patterns.append((category, entry, re.compile(entry[3:], re.IGNORECASE)))
            except re.error as e:
                raise ValueError(f"{where}: invalid regular expression {entry[3:]!r}: {e}") from None
            return
        body = entry[1:] if entry.startswith("\\") else entry
        prefix = body.endswith("*")
        term = normalise(body[:-1] if prefix else body)[0].strip()
        if not term:
            raise ValueError(f"{where}: the entry {entry!r} is empty once normalised")
        listed = self._terms.setdefault(term, [])
        if not listed:
            self._tree.add(term)
        t = _Term(category, entry, _is_word(term[0]), _is_word(term[-1]) and not prefix)
        if not any(x.category == t.category and x.check_end == t.check_end for x in listed):
            listed.append(t)

    def check(self, text: str) -> Result:
        """Every lexicon hit in `text`; see the module docstring for what is and is not caught."""
        norm, origin = normalise(text)  # 1. normalise, remembering where each character came from
        return self._hits(norm, origin, 0)

    def growing(self) -> Growing:
        """A checker for a text that grows (a streamed answer): each part is normalised and searched once."""
        return Growing(self)

    def _hits(self, norm: str, origin: list[int], new_from: int) -> Result:
        """The hits in `norm` that end after its character `new_from` (0: all of them)."""
        matches: list[Match] = []
        # 2–3. terms, at word boundaries where the term has Latin letters or digits at its ends
        window = max(0, new_from - self._longest + 1)
        for term, pos in self._tree.search_all(norm[window:]):
            pos += window
            end = pos + len(term)
            if end <= new_from:
                continue
            for t in self._terms[term]:
                if t.check_start and pos > 0 and _is_word(norm[pos - 1]):
                    continue
                if t.check_end and end < len(norm) and _is_word(norm[end]):
                    continue
                matches.append(Match(t.category, t.entry, origin[pos], origin[end - 1] + 1))
        # 4. regular expressions (over the whole text: a pattern's match may be any length)
        for category, entry, pattern in self._patterns:
            for m in pattern.finditer(norm):
                if m.end() > max(m.start(), new_from):
                    matches.append(Match(category, entry, origin[m.start()], origin[m.end() - 1] + 1))
        if not matches:  # the common case, at every token of a stream: copies, not comprehensions
            return Result(flagged=False, categories=dict(_NONE), category_scores=dict(_ZERO), matches=[])
        matches.sort(key=lambda m: (m.start, m.end, m.category))
        # 5. a sub-category's hit flags its parent
        hit = {m.category for m in matches}
        hit |= {c.split("/")[0] for c in hit}
        return Result(flagged=bool(hit), categories={c: c in hit for c in CATEGORIES},
                      category_scores={c: 1.0 if c in hit else 0.0 for c in CATEGORIES}, matches=matches)


class Growing:
    """A text checked as it grows, without going over what was checked before (a stream of 2,000 tokens
    would otherwise normalise and search its whole text 2,000 times).

    `extend(more)` returns the hits that end in `more`, or that `more` completes. That is every hit a
    check of the whole text would add: a term that ended earlier was found when its end arrived, and
    later text cannot make a boundary that was refused then pass (only the end of the text passes
    without a following character, and that was the case when the term was found).
    """

    def __init__(self, moderator: Moderator):
        self.moderator = moderator
        self.length = 0  # characters of the original text so far
        self._norm = ""
        self._origin: list[int] = []
        self._space = False

    def extend(self, more: str) -> Result:
        before = len(self._norm)
        chars, origin, self._space = _normalise_from(more, self.length, self._space)
        self._norm += "".join(chars)
        self._origin += origin
        self.length += len(more)
        return self.moderator._hits(self._norm, self._origin, before)
