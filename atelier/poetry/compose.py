"""Compose and revise poems that obey their form, by constrained decoding with a char model.

How one poem is written:
1. plan: pick a pattern of the form that the fixed characters (acrostic heads, kept
   characters) fit, and the rhyme group of each rhyme key (given, or left to the model
   among the groups with enough common characters);
2. prefill the prompt `<bos>title\\n` into cache row 0 (the "beam" rows come first in the
   cache, the "sample" rows after them);
3. line by line: copy every beam into `samples` rows, sample the line character by
   character from the model's logits masked to what the position allows (its tone; at a
   rhyme the key's group minus the rhyme characters already used; the fixed character; the
   character a 叠 repeats), then force the line's punctuation. All rows decode in one
   batched forward per character;
4. drop rows whose new line is in the corpus or repeats an earlier line, keep the best
   `beam` rows by model log-likelihood (plus a bonus per keyword used), retry the line with
   fresh samples if none is left, and fail with a 422 `PoemError` when retries run out;
5. check the best finished poem with `checker.analyse` and return it with that report.

The search is stochastic (temperature sampling, a torch.Generator seeded from `seed`), so
the same request, seed and model give the same poem.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atelier.poetry.checker import PENDING, analyse, convert, detect_forms, fit_lines, parse_poem
from atelier.poetry.corpus import CorpusIndex, default_index
from atelier.poetry import parallel, readings, themes
from atelier.poetry.errors import PoemError
from atelier.poetry.forms import FORMS, Form, Pattern, get_form
from atelier.poetry.masks import VocabMasks, vocab_masks
from atelier.poetry.prosody import SCHEMES, is_han, tone_fits

MAX_N = 8
NUMERALS = frozenset("一二三四五六七八九十百")
# Words that set a poem's season (the explicit ones and their surest signs); mixing them is what a
# reader notices: 20 % of composed poems did (6 of 30), against 6 % of Tang poems.
SEASONS = {"春": "春桃杏莺", "夏": "夏蝉暑炎荷", "秋": "秋菊雁枫", "冬": "冬雪冰腊"}
SEASON_OF = {ch: season for season, chars in SEASONS.items() for ch in chars}
SCRIPTS = ("simplified", "traditional")
REQUEST_FIELDS = ("form", "acrostic", "keywords", "title", "rhyme", "rhyme_scheme", "script", "pattern", "seed",
                  "n", "temperature", "place_keywords")


@dataclass
class SearchConfig:
    beam: int = 4  # partial poems kept between lines
    samples: int = 4  # lines sampled from each beam (more: likelier but blander poems)
    retries: int = 4  # fresh rounds of samples for a line before giving up
    repeat_penalty: float = 1.5  # logit penalty on characters the poem already has
    keyword_bonus: float = 2.0  # logit bonus for keyword characters not yet used
    keyword_weight: float = 2.0  # ranking bonus per distinct keyword character used
    # 对仗 in a 律诗's middle couplets (atelier/poetry/parallel.py): a logit bonus for a known parallel of
    # the character above, and a ranking bonus per position that pairs one
    parallel_bonus: float = 3.0
    parallel_weight: float = 1.5
    # Survivors are ranked by log-likelihood plus Gumbel noise of this scale: 0 keeps the
    # most likely lines (bland), larger values keep more of the sampled variety.
    rank_noise: float = 0.0


@dataclass
class Plan:
    pattern: Pattern
    forced: dict[tuple[int, int], str]  # (line, position) → character
    groups: dict[str, torch.Tensor]  # rhyme key → (G,) bool: the groups it may still rhyme in


# -- validating a request ----------------------------------------------------------------


def _han_text(value, param: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise PoemError(f"{param} must be a string of Chinese characters, got {type(value).__name__}", param=param)
    text = "".join(value.split())
    bad = "".join(sorted({c for c in text if not is_han(c)}))
    if bad:
        raise PoemError(f"{param} must be Chinese characters only; found {bad[:20]!r} in {value!r}", param=param)
    if len(text) > max_len:
        raise PoemError(f"{param} has {len(text)} characters; at most {max_len}", param=param)
    return text


def _validate(form, n, temperature, script, rhyme_scheme, seed, max_n) -> Form:
    f = get_form(form)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise PoemError(f"n must be an integer from 1 to {max_n}, got {n!r}", param="n")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise PoemError(f"temperature must be a number from 0 to 2, got {temperature!r}", param="temperature")
    if script not in SCRIPTS:
        raise PoemError(f"unknown script {script!r}; valid: {', '.join(SCRIPTS)}", param="script")
    if rhyme_scheme not in SCHEMES:
        raise PoemError(f"unknown rhyme_scheme {rhyme_scheme!r}; valid: {', '.join(SCHEMES)}", param="rhyme_scheme")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise PoemError(f"seed must be a non-negative integer (or None for a random one), got {seed!r}",
                        param="seed")
    return f


def _keywords(keywords) -> str:
    if keywords is None:
        return ""
    if isinstance(keywords, str):
        keywords = [keywords]
    if not isinstance(keywords, (list, tuple)):
        raise PoemError(f"keywords must be a string or a list of strings, got {type(keywords).__name__}",
                        param="keywords")
    return "".join(_han_text(k, "keywords", 16) for k in keywords)[:16]


# -- planning: pattern and rhyme groups that the fixed characters fit ----------------------


def _conflicts(pattern: Pattern, forced: dict, masks: VocabMasks, tokenizer, rhyme_group: int | None):
    """(problems, forced characters with 叠 sources filled in, rhyme key → (G,) candidate groups)."""
    rhymes_t = masks.rhyme_table
    forced = dict(forced)
    problems = []
    # A fixed character at a 叠 position fixes the character it repeats (and the other way round).
    for i, line in enumerate(pattern.lines):
        for p, src in line.repeat:
            a, b = forced.get((i, p)), forced.get(src)
            if a and b and a != b:
                problems.append(f"line {i + 1} repeats line {src[0] + 1} (叠), but they start {a} and {b}")
            elif a or b:
                forced[(i, p)] = forced[src] = a or b
    # Candidate groups per key: the requested one; else any group of the key's tone that its
    # fixed rhyme characters share; else (an auto rhyme) those with enough common characters.
    fixed_keys = {pattern.lines[i].rhyme for i, p in forced if p == len(pattern.lines[i]) - 1}
    groups = {}
    for key, tone in pattern.keys.items():
        g = masks.groups_with_tone(tone)
        if key == "A" and rhyme_group is not None:
            g = torch.zeros_like(g)
            g[rhyme_group] = True
        elif key not in fixed_keys:
            g = g & masks.usable
        groups[key] = g
    seen = {}
    for (i, p), ch in sorted(forced.items()):
        if ch not in tokenizer.stoi:
            problems.append(f"the model does not know the character {ch}")
            continue
        spec = pattern.lines[i]
        where = f"line {i + 1}, character {p + 1}"
        if spec.rhyme is not None and p == len(spec) - 1:
            tone = pattern.rhyme_tone(i)
            member = masks.ye_member if spec.ye else masks.member
            g = groups[spec.rhyme] & member[:, tokenizer.stoi[ch]]
            if not g.any():
                names = "、".join(rhymes_t.groups[h].name for h in rhymes_t.groups_of(ch)) or "no group"
                problems.append(f"{where}: {ch} must rhyme ({tone}) with the other rhymes; it is in {names}")
            groups[spec.rhyme] = g
            if ch in seen and p not in dict(spec.repeat):
                problems.append(f"{where}: rhyme character {ch} is used twice")
            seen[ch] = i
        else:
            required = spec.tones[p]
            tones = masks.tones_in_context(ch, forced.get((i, p - 1)), forced.get((i, p + 1)))
            if not tone_fits(required, tones):
                has = "/".join(sorted(tones)) or "of unknown tone"
                problems.append(f"{where}: {ch} is {has}, {required} is required")
    return problems, forced, groups


def plan_poem(form: Form, tokenizer, masks: VocabMasks, rng: random.Random, *, pattern: str | None,
              forced: dict, rhyme: str, forced_param: str) -> Plan:
    patterns = [form.pattern(pattern)] if pattern else list(form.patterns)
    rhyme_group = None
    if rhyme != "auto":
        if not isinstance(rhyme, str):
            raise PoemError(f"rhyme must be a group name or 'auto', got {rhyme!r}", param="rhyme")
        tone = patterns[0].keys["A"]
        g = masks.rhyme_table.find(rhyme, tone=tone)
        if g.tone != tone:
            valid = "、".join(x.name for x in masks.rhyme_table.groups if x.tone == tone)
            raise PoemError(f"rhyme group {g.name} is {g.tone}; {form.key} rhymes in {tone} here; valid: {valid}",
                            param="rhyme")
        rhyme_group = g.index
    fits, reasons = [], []
    for p in patterns:
        problems, full, groups = _conflicts(p, forced, masks, tokenizer, rhyme_group)
        if problems:
            reasons.append(f"{p.name}: {'; '.join(problems[:3])}")
        else:
            fits.append(Plan(pattern=p, forced=full, groups=groups))
    if not fits:
        raise PoemError(f"the {forced_param} cannot fit {form.key}: " + " | ".join(reasons), param=forced_param)
    return rng.choice(fits)


# -- the search ----------------------------------------------------------------------------


class _Search:
    """Batched sample-and-rank decoding of one poem (see the module docstring)."""

    def __init__(self, model, tokenizer, masks: VocabMasks, plan: Plan, prompt: list[int], *, keywords: str,
                 temperature: float, generator: torch.Generator, corpus: CorpusIndex, cfg: SearchConfig,
                 check_corpus: set[int]):
        self.model, self.tok, self.masks, self.plan, self.cfg = model, tokenizer, masks, plan, cfg
        self.temperature, self.gen, self.corpus = temperature, generator, corpus
        self.check_corpus = check_corpus  # lines that must not be in the corpus (not the kept ones)
        self.debris = frozenset(readings.table().get("debris", ()))
        lines = plan.pattern.lines
        # a 律诗's 颔联 and 颈联: lines 4 and 6 answer lines 3 and 5 (indices 3 and 5)
        self.couplet_lines = {3, 5} if plan.pattern.kind == "shi" and len(lines) == 8 else set()
        self.B, self.S = cfg.beam, cfg.beam * cfg.samples  # beam rows, sample rows
        self.cache = model.new_cache(self.B + self.S)
        self.V = len(tokenizer)
        # One season per poem unless asked: the season word a row writes first rules out the others'
        # (SEASONS); a season the request names (title, keywords, fixed characters) holds from the start,
        # and a request naming two lifts the rule.
        self.season_of = torch.full((self.V,), -1, dtype=torch.long)
        for k, chars in enumerate(SEASONS.values()):
            for ch in chars:
                if ch in tokenizer.stoi:
                    self.season_of[tokenizer.stoi[ch]] = k
        asked = sorted({SEASON_OF[ch] for ch in keywords + tokenizer.decode(prompt) + "".join(plan.forced.values())
                        if ch in SEASON_OF})
        self.one_season = len(asked) <= 1
        self.asked_season = list(SEASONS).index(asked[0]) if len(asked) == 1 else None
        self.kw = torch.zeros(self.V, dtype=torch.bool)
        for ch in keywords:
            if ch in tokenizer.stoi:
                self.kw[tokenizer.stoi[ch]] = True
        self.prompt = prompt
        # Rhyme characters the writer fixed anywhere in the poem: no other rhyme position may take
        # them, even one decoded before them (the checker refuses a rhyme used twice).
        self.fixed_rhymes = torch.zeros(self.V, dtype=torch.bool)
        for (i, p), ch in plan.forced.items():
            spec = plan.pattern.lines[i]
            if spec.rhyme is not None and p == len(spec) - 1:
                self.fixed_rhymes[tokenizer.stoi[ch]] = True
        # Absolute token index of (line, position); punctuation follows each line.
        self.at, t = {}, len(prompt)
        for i, line in enumerate(plan.pattern.lines):
            for p in range(len(line)):
                self.at[(i, p)] = t
                t += 1
            t += 1
        self.length = t
        if t > model.config.n_positions:
            raise PoemError(f"title and poem need {t} positions; the model has {model.config.n_positions}",
                            param="title")

    @torch.no_grad()
    def run(self) -> dict:
        B, S, pat = self.B, self.S, self.plan.pattern
        # Beam state, one row to start with: the prompt.
        P = len(self.prompt)
        rows0 = torch.zeros(1, dtype=torch.long)
        logits, _ = self.model(torch.tensor([self.prompt]), cache=self.cache, rows=rows0, pos=torch.arange(P)[None])
        beam = {"tokens": torch.tensor([self.prompt]), "score": torch.zeros(1, dtype=torch.float64),
                "logits": logits[:, -1], "groups": {k: g[None].clone() for k, g in self.plan.groups.items()}}
        for i in range(len(pat.lines)):
            for attempt in range(self.cfg.retries):
                rows = self._sample_line(i, beam)
                keep = self._select(i, rows)
                if keep is not None:
                    break
            else:
                raise _SearchFailed(f"no compliant, uncopied line {i + 1} of {pat.name} after "
                                    f"{self.cfg.retries} rounds of {S} samples")
            # Move the survivors into the beam rows of the cache.
            n = len(keep)
            src = keep + B
            self.cache.copy_rows(src, torch.arange(n), self.length)
            beam = {"tokens": rows["tokens"][keep], "score": rows["score"][keep], "logits": rows["logits"][keep],
                    "groups": {k: g[keep] for k, g in rows["groups"].items()}}
        best = 0  # _select sorts survivors best first
        body = beam["tokens"][best, P:].tolist()
        return {"tokens": body, "score": float(beam["score"][best]),
                "groups": {k: int(g[best].nonzero()[0]) for k, g in beam["groups"].items()}}

    def _sample_line(self, i: int, beam: dict) -> dict:
        """Sample line i from every beam, `samples` rows each, in one batch."""
        B, S, m = self.B, self.S, self.masks
        nb = beam["tokens"].shape[0]
        parents = torch.arange(S) % nb  # spread the sample rows over the beams
        rows = torch.arange(B, B + S)
        t0 = beam["tokens"].shape[1]
        self.cache.copy_rows(parents, rows, t0)
        tokens = beam["tokens"][parents]
        score = beam["score"][parents].clone()
        logits = beam["logits"][parents]
        groups = {k: g[parents].clone() for k, g in beam["groups"].items()}
        alive = torch.ones(S, dtype=torch.bool)
        used = torch.zeros(S, self.V, dtype=torch.bool)
        body = tokens[:, len(self.prompt):]
        if body.numel():
            used.scatter_(1, body, True)
        spec = self.plan.pattern.lines[i]
        last = len(spec) - 1
        for p in range(len(spec) + 1):
            logp = F.log_softmax(logits.float(), dim=-1)  # the model's own probabilities, for the score
            if p == len(spec):  # the line's punctuation
                choice = torch.full((S,), self.tok.stoi[spec.end], dtype=torch.long)
            else:
                allowed = self._allowed(i, p, spec, tokens, groups, used, last)
                alive &= allowed.any(1)
                allowed[~alive, self.tok.stoi[spec.end]] = True  # dead rows emit anything; they are dropped
                choice = self._sample(logits, allowed, used, self._parallels(i, p, tokens))
                if spec.rhyme is not None and p == last:
                    member = m.ye_member if spec.ye else m.member
                    groups[spec.rhyme] &= member[:, choice].T
                used[torch.arange(S), choice] = True
            score += logp.gather(1, choice[:, None])[:, 0].double()
            tokens = torch.cat([tokens, choice[:, None]], 1)
            pos = torch.full((S, 1), tokens.shape[1] - 1)
            out, _ = self.model(choice[:, None], cache=self.cache, rows=rows, pos=pos)
            logits = out[:, -1]
        return {"tokens": tokens, "score": score.masked_fill(~alive, float("-inf")), "logits": logits,
                "groups": groups}

    def _allowed(self, i, p, spec, tokens, groups, used, last) -> torch.Tensor:
        """(S, V) the characters each row may write at line i, position p."""
        m, S = self.masks, tokens.shape[0]
        forced = self.plan.forced.get((i, p))
        if forced is not None:
            allowed = torch.zeros(S, self.V, dtype=torch.bool)
            allowed[:, self.tok.stoi[forced]] = True
            return allowed
        if p in dict(spec.repeat):
            src = tokens[:, self.at[dict(spec.repeat)[p]]]
            allowed = torch.zeros(S, self.V, dtype=torch.bool)
            allowed[torch.arange(S), src] = True
            return allowed
        if spec.rhyme is not None and p == last:
            member = m.ye_member if spec.ye else m.member
            in_group = (groups[spec.rhyme].float() @ member.float()) > 0
            # No rhyme character twice: everything already used is out (rhymes included).
            allowed = in_group & m.tone(self.plan.pattern.rhyme_tone(i))[None] & ~used & ~self.fixed_rhymes[None]
            allowed = self._in_context(allowed, i, p, spec, tokens, self.plan.pattern.rhyme_tone(i), rhyme=True)
        else:
            allowed = m.tone(spec.tones[p])[None].expand(S, -1).clone()
            allowed = self._in_context(allowed, i, p, spec, tokens, spec.tones[p], rhyme=False)
        return allowed & self._in_season(tokens) & self._unshared(i, tokens)

    def _in_season(self, tokens) -> torch.Tensor:
        """(S, V): no season word of another season than the one the row (or the request) has set."""
        S = tokens.shape[0]
        if not self.one_season:
            return torch.ones(S, self.V, dtype=torch.bool)
        ids = self.season_of[tokens[:, len(self.prompt):]] + 1  # 0: no season
        present = torch.zeros(S, len(SEASONS) + 1, dtype=torch.bool).scatter_(1, ids, True)[:, 1:]
        if self.asked_season is not None:
            present[:, self.asked_season] = True
        word = self.season_of >= 0
        same = present.gather(1, self.season_of.clamp(min=0)[None].expand(S, -1))
        return ~word[None] | same | (present.sum(1) != 1)[:, None]

    def _in_context(self, allowed, i, p, spec, tokens, required, *, rhyme: bool) -> torch.Tensor:
        """Polyphones read as their neighbours make them (atelier/poetry/readings.py), as the checker reads
        them: a candidate whose character before it decides its tone (相思 → 平) fits only where that
        tone does; a candidate that would decide the tone of the character before it (思归) is out
        when that tone does not fit there (unless the character before that already decided it); and
        before a fixed character, a candidate that would give it, or take from it, a tone that does
        not fit is out."""
        m = self.masks
        if not (m.left or m.right):
            return allowed
        fits = lambda tone, req: tone_fits(req, frozenset({tone}))  # noqa: E731
        S = allowed.shape[0]
        prev = tokens[:, -1].tolist() if p > 0 else [None] * S
        before = tokens[:, -2].tolist() if p > 1 else [None] * S
        for row, (a, z) in enumerate(zip(prev, before)):
            if a is None:
                break
            for c, tone in m.left.get(a, {}).items():
                allowed[row, c] = (allowed[row, c] & fits(tone, required)) if rhyme else fits(tone, required)
            if a in m.right and not (z is not None and a in m.left.get(z, {})):
                for n, tone in m.right[a].items():
                    if not fits(tone, spec.tones[p - 1]):
                        allowed[row, n] = False
        nxt = self.plan.forced.get((i, p + 1)) if p + 1 < len(spec) else None
        if nxt is not None and self.tok.stoi.get(nxt) is not None:
            f = self.tok.stoi[nxt]
            f_required = self.plan.pattern.rhyme_tone(i) if spec.rhyme is not None and p + 1 == len(spec) - 1 \
                else spec.tones[p + 1]
            for c, by_next in m.right.items():  # (c, f) would decide c's tone
                if f in by_next and not fits(by_next[f], required):
                    decided_by_left = [a is not None and c in m.left.get(a, {}) for a in prev]
                    allowed[[r for r in range(S) if not decided_by_left[r]], c] = False
            for c, by_prev in m.left.items():  # (c, f) would decide f's tone
                if f in by_prev and not fits(by_prev[f], f_required):
                    allowed[:, c] = False
        return allowed

    def _parallels(self, i, p, tokens) -> torch.Tensor | None:
        """(S, V) the known parallels of the character above, on the second line of a middle couplet."""
        if i not in self.couplet_lines:
            return None
        above = tokens[:, self.at[(i - 1, p)]].tolist()
        mask = torch.zeros(tokens.shape[0], self.V, dtype=torch.bool)
        for row, a in enumerate(above):
            ids = self.masks.counterparts.get(a)
            if ids is not None:
                mask[row, ids] = True
        return mask

    def _unshared(self, i, tokens) -> torch.Tensor | bool:
        """(S, V): on the second line of a middle couplet, no character of the line above (对仗)."""
        if i not in self.couplet_lines:
            return True
        start = self.at[(i - 1, 0)]
        above = tokens[:, start:start + len(self.plan.pattern.lines[i - 1])]
        return ~torch.zeros(tokens.shape[0], self.V, dtype=torch.bool).scatter_(1, above, True)

    def _sample(self, logits, allowed, used, parallels=None) -> torch.Tensor:
        cfg = self.cfg
        x = logits.float() - cfg.repeat_penalty * used.float() + cfg.keyword_bonus * (self.kw[None] & ~used).float()
        if parallels is not None:
            x = x + cfg.parallel_bonus * parallels.float()
        x = x.masked_fill(~allowed, float("-inf"))
        if self.temperature == 0:
            return x.argmax(-1)
        # Inverse-CDF sampling: one uniform number per row (torch.multinomial is ~10x slower
        # here on CPU for a (rows, 7k) distribution).
        cdf = F.softmax(x / self.temperature, dim=-1).cumsum(-1)
        u = torch.rand(x.shape[0], 1, generator=self.gen) * cdf[:, -1:]
        return torch.searchsorted(cdf, u)[:, 0].clamp_(max=x.shape[1] - 1)

    def _select(self, i: int, rows: dict) -> torch.Tensor | None:
        """Indices of the best distinct surviving rows (best first), or None if none survive."""
        P = len(self.prompt)
        score = rows["score"].clone()
        start = self.at[(i, 0)]
        n = len(self.plan.pattern.lines[i])
        seen, order = set(), []
        kw_ids = self.kw.nonzero()[:, 0]
        if len(kw_ids):
            body = rows["tokens"][:, P:]
            score += self.cfg.keyword_weight * (body[:, :, None] == kw_ids).any(1).sum(1)
        if i in self.couplet_lines:
            above, n_above = self.at[(i - 1, 0)], len(self.plan.pattern.lines[i - 1])
            for r in range(len(score)):
                toks = rows["tokens"][r].tolist()
                matched = parallel.couplet(self.tok.decode(toks[above:above + n_above]),
                                           self.tok.decode(toks[start:start + n]))["matched"]
                score[r] += self.cfg.parallel_weight * matched
        if self.cfg.rank_noise > 0:
            u = torch.rand(score.shape, generator=self.gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
            score = score - self.cfg.rank_noise * torch.log(-torch.log(u))
        for r in torch.argsort(score, descending=True).tolist():
            if score[r] == float("-inf"):
                break
            toks = tuple(rows["tokens"][r].tolist())
            if toks in seen:
                continue
            line = self.tok.decode(toks[start:start + n])
            earlier = [self.tok.decode(toks[self.at[(j, 0)]:self.at[(j, 0)] + len(self.plan.pattern.lines[j])])
                       for j in range(i)]
            if i in self.check_corpus and line in self.corpus:
                continue
            if self._debris(i, line):
                continue
            if n >= 2 and line in earlier and not self.plan.pattern.lines[i].repeat:
                continue
            seen.add(toks)
            order.append(r)
            if len(order) == self.B:
                break
        return torch.tensor(order) if order else None

    def _debris(self, i: int, line: str) -> bool:
        """A line that opens with a ci tune's name (渔家, 水调 …) or carries a title's count (二首): the
        model continuing a title it saw in training, not verse. What the writer fixed is theirs to keep."""
        if (i, 0) in self.plan.forced and (i, 1) in self.plan.forced:
            return False
        return line[:2] in self.debris or any(line[k] in NUMERALS and line[k + 1] == "首" for k in range(len(line) - 1))


class _SearchFailed(Exception):
    pass


# -- public functions ------------------------------------------------------------------------


def _prompt(tokenizer, form: Form, title: str | None, keywords: str) -> tuple[list[int], str]:
    """(prompt ids, title to show). Ci prompt with their tune name, as in the training data."""
    if form.kind == "ci":
        prompt_title = form.title + ("・" + title if title else "")
        shown = form.title + ("·" + title if title else "")
    else:
        prompt_title = title or keywords or None
        shown = title or keywords or "无题"
    ids = [tokenizer.bos_id] + (tokenizer.encode(prompt_title + "\n") if prompt_title else [])
    return ids, shown


def _place_keywords(form: Form, chars: str, forced: dict, masks: VocabMasks, tokenizer, rng: random.Random,
                    pattern: str | None) -> tuple[dict, str | None]:
    """(`forced` plus each keyword character fixed early in a line of its own, the pattern that placement
    is for), as Jiuge plans one keyword per line: keyword j of k goes to line ⌊j·L/k⌋, at one of the
    first three positions (never the rhyme) whose tone fits it. Of the patterns the poem may take, in
    random order, the first that places the most keywords wins; a character that fits nowhere is
    left to the search's keyword bonus."""
    tones_of = masks.char_tones
    candidates = [p for p in form.patterns if pattern in (None, p.name)]
    # the fixed characters must fit a candidate (the plan would refuse it otherwise)
    candidates = [p for p in candidates if all(
        i < len(p.lines) and q < len(p.lines[i]) and (q == len(p.lines[i]) - 1 or tone_fits(p.lines[i].tones[q], tones_of(ch)))
        for (i, q), ch in forced.items())]
    taken = set(forced.values())
    chars = [c for c in dict.fromkeys(chars) if c not in taken and c in tokenizer.stoi]
    best, best_pattern = dict(forced), pattern
    for p in rng.sample(candidates, len(candidates)):
        keep = chars[:len(p.lines)]
        out = dict(forced)
        for j, ch in enumerate(keep):
            i, line = j * len(p.lines) // len(keep), p.lines[j * len(p.lines) // len(keep)]
            spots = [q for q in range(len(line) - 1) if (i, q) not in out and q not in dict(line.repeat)
                     and tone_fits(line.tones[q], tones_of(ch))]
            if spots:
                out[(i, rng.choice(spots[:3]))] = ch
        if len(out) > len(best):
            best, best_pattern = out, p.name
    return best, best_pattern


FUNCTION_CHARS = frozenset("之其与和及而以于乎也者矣焉兮的了")


def title_words(title: str) -> str:
    """The characters of a title that say what the poem is about: not function words, not a title's count
    (二首, 其一)."""
    return "".join(dict.fromkeys(c for c in title if is_han(c) and c not in FUNCTION_CHARS
                                 and c not in NUMERALS and c != "首"))


def _write(model, tokenizer, form: Form, plan_kw: dict, *, title, keywords, temperature, seed, rhyme_scheme,
           script, cfg, check_lines, fail_param, place_keywords: bool = False) -> dict:
    masks = vocab_masks(tokenizer, rhyme_scheme, form.kind)
    rng = random.Random(seed)
    # What the poem is about: the keywords, or else the title's words (江雪 must have its snow)
    theme = keywords or (title_words(title) if place_keywords and title and form.kind == "shi" else "")
    planned = ""
    if place_keywords and theme:
        planned = theme
        if form.kind == "shi":  # one keyword per line: the theme's associates in the corpus fill the rest
            seasons = {SEASON_OF[c] for c in theme if c in SEASON_OF}
            other_seasons = {c for c, season in SEASON_OF.items() if season not in seasons}
            exclude = other_seasons | set(plan_kw["forced"].values()) | set(readings.table().get("debris", ()))
            planned += themes.expand(theme, len(form.patterns[0].lines) - len(set(theme)), rng, exclude)
        forced, pattern = _place_keywords(form, planned, plan_kw["forced"], masks, tokenizer, rng,
                                          plan_kw.get("pattern"))
        plan_kw = plan_kw | {"forced": forced, "pattern": pattern}
    plan = plan_poem(form, tokenizer, masks, rng, **plan_kw)
    prompt, shown_title = _prompt(tokenizer, form, title, keywords)
    gen = torch.Generator().manual_seed(seed)
    check_corpus = set(range(len(plan.pattern.lines))) if check_lines is None else check_lines
    search = _Search(model, tokenizer, masks, plan, prompt, keywords=theme, temperature=temperature,
                     generator=gen, corpus=default_index(), cfg=cfg, check_corpus=check_corpus)
    try:
        found = search.run()
    except _SearchFailed as e:
        raise PoemError(f"could not write a compliant {form.key} within the search budget ({e}); "
                        "try another seed or fewer constraints", param=fail_param, status=422) from e
    text = tokenizer.decode(found["tokens"])
    lines, start = [], 0
    for spec in plan.pattern.lines:
        lines.append(text[start:start + len(spec)])
        start += len(spec) + 1
    report = analyse(lines, plan.pattern, rhyme_scheme, fixed_rhymes=found["groups"])
    if not report["compliant"]:  # the decoder and the checker disagree: a bug, never a poem
        raise RuntimeError(f"constrained decoding produced a non-compliant poem: {report['violations']}")
    shown = lines
    if script == "traditional":
        shown = [convert(l, "s2t") for l in lines]
        shown_title = convert(shown_title, "s2t")
        for line, out in zip(report["lines"], shown):
            line["text"] = out
            for c, ch in zip(line["chars"], out):
                c["char"] = ch
    body = "".join(l + spec.end + ("\n" if spec.end == "。" else "") for l, spec in zip(shown, plan.pattern.lines))
    return {"title": shown_title, "lines": shown, "text": body.strip(), "form": form.key,
            "pattern": plan.pattern.name, "rhyme_group": report["rhyme_group"], "rhyme_groups": report["rhyme_groups"],
            "mean_logprob": found["score"] / (plan.pattern.n_chars + len(plan.pattern.lines)),
            "seed": seed, "report": report} | ({"plan": planned} if planned else {})


def compose(model, tokenizer, *, form: str, acrostic: str | None = None, keywords=None, title: str | None = None,
            rhyme: str = "auto", rhyme_scheme: str = "pingshui", script: str = "simplified",
            pattern: str | None = None, seed: int | None = 0, n: int = 1, temperature: float = 0.8,
            place_keywords: bool = False, max_n: int = MAX_N, search: SearchConfig | None = None) -> dict:
    """Write `n` poems of `form` that obey it, each with its compliance report.

    >>> out = compose(model, tok, form="qijue", acrostic="春夏秋冬", seed=1)
    >>> out["poems"][0]["lines"], out["poems"][0]["report"]["compliant"]
    (['春…', '夏…', '秋…', '冬…'], True)

    Keywords are favoured while sampling; with place_keywords=True each keyword character is also
    fixed early in a line of its own (one per line, spread over the poem), so a rare one is not lost,
    and without keywords a 诗's title words are placed the same way (江雪: 江 and 雪); a 诗's lines left
    without one get an associate of the theme from the corpus (atelier/poetry/themes.py), as Jiuge
    plans, and the poem's "plan" lists them.
    Poem i uses seed + i, so the first poem of n=3 is the poem of n=1; seed=None draws one
    (returned in "seed"). Raises PoemError: status 400 for a bad request (param names the
    field), 422 when the search fails.
    """
    seed = random.randrange(2**31) if seed is None else seed
    f = _validate(form, n, temperature, script, rhyme_scheme, seed, max_n)
    kw = _keywords(keywords)
    title = convert(_han_text(title, "title", 20), "t2s") if title else None
    forced = {}
    if acrostic is not None:
        heads = convert(_han_text(acrostic, "acrostic", 64), "t2s")
        n_lines = len(f.patterns[0].lines)
        if len(heads) != n_lines:
            raise PoemError(f"acrostic {acrostic!r} has {len(heads)} characters; {f.key} has {n_lines} lines",
                            param="acrostic")
        forced = {(i, 0): ch for i, ch in enumerate(heads)}
    kw = convert(kw, "t2s")
    cfg = search or SearchConfig()
    fail_param = "acrostic" if acrostic else ("rhyme" if rhyme != "auto" else "form")
    poems = [_write(model, tokenizer, f, dict(pattern=pattern, forced=forced, rhyme=rhyme, forced_param="acrostic"),
                    title=title, keywords=kw, temperature=temperature, seed=seed + k, rhyme_scheme=rhyme_scheme,
                    script=script, cfg=cfg, check_lines=None, fail_param=fail_param,
                    place_keywords=place_keywords)
             for k in range(n)]
    return {"poems": poems, "seed": seed}


def revise(model, tokenizer, *, lines, keep, form: str | None = None, title: str | None = None,
           keywords=None, rhyme: str = "auto", rhyme_scheme: str = "pingshui", script: str = "simplified",
           pattern: str | None = None, seed: int | None = 0, temperature: float = 0.8,
           search: SearchConfig | None = None) -> dict:
    """Keep some lines (or characters) of a poem and rewrite the rest under the same form.

    `keep` is a list of line indices ([0, 3]) or a per-character mask with the poem's shape
    ([[True, True, False, …], …]). Kept characters are fixed; the pattern and rhyme group are
    chosen so that they fit, else PoemError(param="keep").
    >>> revise(model, tok, lines=poem["lines"], keep=[0, 1], form="qijue", seed=2)
    """
    seed = random.randrange(2**31) if seed is None else seed
    _, clauses = parse_poem(lines)
    simple = [convert(c, "t2s") for c in clauses]
    f = get_form(form) if form is not None else (detect_forms(simple) or [None])[0]
    if f is None:
        raise PoemError(f"cannot tell the form of lines of lengths {[len(c) for c in simple]}; pass form=, one of "
                        f"{', '.join(FORMS)}", param="form")
    _validate(f.key, 1, temperature, script, rhyme_scheme, seed, 1)
    fitted = fit_lines(simple, f.patterns[0])
    if fitted is None:
        raise PoemError(f"{f.key} needs lines of lengths {list(f.patterns[0].lengths)}; got "
                        f"{[len(c) for c in simple]}", param="lines")
    forced, full_lines = {}, set()
    if not isinstance(keep, (list, tuple)):
        raise PoemError(f"keep must be a list of line indices or a per-character mask, got {keep!r}", param="keep")
    if all(isinstance(k, int) and not isinstance(k, bool) for k in keep):
        for k in keep:
            if not 0 <= k < len(fitted):
                raise PoemError(f"keep index {k} is out of range; the poem has {len(fitted)} lines", param="keep")
            forced.update({(k, p): ch for p, ch in enumerate(fitted[k])})
            full_lines.add(k)
    elif len(keep) == len(fitted) and all(isinstance(m, (list, tuple)) and len(m) == len(l)
                                          for m, l in zip(keep, fitted)):
        for i, (mask, line) in enumerate(zip(keep, fitted)):
            forced.update({(i, p): ch for p, (m, ch) in enumerate(zip(mask, line)) if m})
            if all(mask):
                full_lines.add(i)
    else:
        raise PoemError(f"keep must be line indices or a mask of lengths {[len(l) for l in fitted]}", param="keep")
    kw = convert(_keywords(keywords), "t2s")
    title = convert(_han_text(title, "title", 20), "t2s") if title else None
    poem = _write(model, tokenizer, f, dict(pattern=pattern, forced=forced, rhyme=rhyme, forced_param="keep"),
                  title=title, keywords=kw, temperature=temperature, seed=seed, rhyme_scheme=rhyme_scheme,
                  script=script, cfg=search or SearchConfig(),
                  check_lines=set(range(len(fitted))) - full_lines, fail_param="keep")
    poem["kept"] = sorted(full_lines)
    return {"poems": [poem], "seed": seed}


def suggest(model, tokenizer, *, lines, form: str, mask=None, n: int = 3, title: str | None = None, keywords=None,
            rhyme: str = "auto", rhyme_scheme: str = "pingshui", script: str = "simplified",
            pattern: str | None = None, seed: int | None = 0, temperature: float = 0.8, max_n: int = MAX_N,
            search: SearchConfig | None = None) -> dict:
    """Co-writing: up to `n` different candidates for the next line (the poem so far in `lines`), or,
    with `mask` (a keep mask per character of the lines written), for the characters it leaves free.

    Each candidate comes from a whole compliant poem that keeps what the writer wrote, so accepting
    one never leads into a line that cannot be finished. They are ranked by the mean log-probability
    per character of that poem; each carries its line's report (tones, rhyme) and the poem.
    >>> suggest(model, tok, lines=["白日依山尽"], form="wujue", n=3)["suggestions"][0]["line"]
    """
    seed = random.randrange(2**31) if seed is None else seed
    f = _validate(form, n, temperature, script, rhyme_scheme, seed, max_n)
    shape = list(f.patterns[0].lengths)
    _, given = parse_poem(lines) if lines else (None, [])
    given = [convert(c, "t2s") for c in given]
    if len(given) > len(shape) or [len(c) for c in given] != shape[:len(given)]:
        raise PoemError(f"{f.key} lines have lengths {shape}; got {[len(c) for c in given]}", param="lines")
    to_write = [PENDING * k for k in shape[len(given):]]  # lines still to write: never kept, never read
    if mask is None:
        if not to_write:
            raise PoemError(f"the poem already has its {len(shape)} lines; pass mask to ask for replacements",
                            param="lines")
        keep, targets = list(range(len(given))), [len(given)]
    else:
        if not (isinstance(mask, list) and len(mask) == len(given) and
                all(isinstance(m, list) and len(m) == len(c) for m, c in zip(mask, given))):
            raise PoemError(f"mask must be one list of true/false per line written, of lengths "
                            f"{[len(c) for c in given]}", param="mask")
        targets = [i for i, m in enumerate(mask) if not all(m)]
        if not targets:
            raise PoemError("the mask keeps every character: mark the ones to replace false", param="mask")
        keep = list(mask) + [[False] * len(line) for line in to_write]
    full = given + to_write
    # A replacement that gives back what the writer already has is no suggestion.
    found: dict[tuple, dict] = {tuple(full[i] for i in targets): {}} if mask is not None else {}
    wanted = n + len(found)
    for attempt in range(3 * n):
        if len(found) == wanted:
            break
        try:
            poem = revise(model, tokenizer, lines=full, keep=keep, form=f.key, title=title, keywords=keywords,
                          rhyme=rhyme, rhyme_scheme=rhyme_scheme, script=script, pattern=pattern,
                          seed=seed + attempt, temperature=temperature, search=search)["poems"][0]
        except PoemError as e:
            if e.status == 422:  # this seed's search ran out of budget; the next may not
                continue
            raise
        changed = tuple(poem["lines"][i] for i in targets)
        if changed not in found:
            first = targets[0]
            found[changed] = {"line": poem["lines"][first], "index": first, "report": poem["report"]["lines"][first],
                              "logprob": poem["mean_logprob"], "seed": seed + attempt, "lines": poem["lines"],
                              "changed": targets}
    ranked = sorted((s for s in found.values() if s), key=lambda s: -s["logprob"])
    if not ranked:
        raise PoemError(f"no compliant continuation found for this {f.key}; try another seed or fewer constraints",
                        param="lines", status=422)
    return {"suggestions": ranked, "form": f.key, "seed": seed}


def poem_constraints_from_extra_body(body: dict) -> dict:
    """The keyword arguments for `compose` from a chat/completions `extra_body["poem"]`.

    >>> poem_constraints_from_extra_body({"form": "qijue", "acrostic": "春夏秋冬"})
    {'form': 'qijue', 'acrostic': '春夏秋冬'}
    """
    if not isinstance(body, dict):
        raise PoemError(f"poem must be an object with fields {', '.join(REQUEST_FIELDS)}", param="poem")
    unknown = [k for k in body if k not in REQUEST_FIELDS]
    if unknown:
        raise PoemError(f"unknown poem field {unknown[0]!r}; valid: {', '.join(REQUEST_FIELDS)}", param=unknown[0])
    if "form" not in body:
        raise PoemError(f"poem.form is required; valid: {', '.join(FORMS)}", param="form")
    return dict(body)
