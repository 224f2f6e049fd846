"""The prosody tables as tensors over a model's vocabulary, for masking logits.

For one tokenizer and one (tone table, rhyme table) pair:
- `han` (V,): the token is one CJK character (no punctuation, no special token);
- `ping`, `ze` (V,): the character can be read 平 / 仄 (a 多音字 can be both);
- `member` (G, V): the character is in rhyme group g;
- `ye_member` (G, V): the character is in a group of g's part with the other tone (叶韵);
- `usable` (G,): the group has enough common characters to rhyme a whole poem in, so an
  `auto` rhyme may pick it (三江, 十五咸 and the like are left to explicit requests);
- `left`, `right`: polyphones whose reading the character before (相思) or after (思归)
  decides, as token ids, for the decoder to apply as it writes.
With the pingshui tables, a polyphone's tone is the one Tang poets gave it and a rhyme's
groups are those they rhymed it in (atelier/poetry/readings.py).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from atelier.poetry import parallel, readings
from atelier.poetry.prosody import EITHER, PING, ZE, RhymeTable, is_han, tables

COMMON_IDS = 2500  # CharTokenizer ids are in order of corpus frequency: the 2,500 most common characters
MIN_COMMON_IN_GROUP = 12  # a group needs this many of them to be picked by an auto rhyme


class VocabMasks:
    def __init__(self, tokenizer, tone_table: RhymeTable, rhyme_table: RhymeTable):
        V, G = len(tokenizer), len(rhyme_table.groups)
        self.tone_table, self.rhyme_table = tone_table, rhyme_table
        # How Tang poets read polyphones (atelier/poetry/readings.py), learnt with the pingshui tables:
        # their usual tone everywhere, and in 近体 rhymes only the groups they rhymed them in.
        readings_apply = tone_table.scheme == "pingshui"
        rhymes_by_usage = rhyme_table.scheme == "pingshui"
        usual = readings.table()["tones"] if readings_apply else {}
        self._usual = usual
        self.left, self.right = self._contexts(tokenizer) if readings_apply else ({}, {})
        # 对仗: each character's known parallels (atelier/poetry/parallel.py) as token ids
        stoi = tokenizer.stoi
        self.counterparts = {stoi[x]: torch.tensor([stoi[y] for y in ys if y in stoi], dtype=torch.long)
                             for x, ys in parallel.lexicon().items() if x in stoi}
        self.han = torch.zeros(V, dtype=torch.bool)
        self.ping = torch.zeros(V, dtype=torch.bool)
        self.ze = torch.zeros(V, dtype=torch.bool)
        self.member = torch.zeros(G, V, dtype=torch.bool)
        for i, ch in enumerate(tokenizer.itos):
            if len(ch) != 1 or not is_han(ch) or i in getattr(tokenizer, "special_ids", range(4)):
                continue  # a CharTokenizer's ids 0-3 are <pad> <unk> <bos> <eos>
            self.han[i] = True
            tones = tone_table.tones(ch)
            if readings_apply and ch in usual:  # a polyphone takes the reading Tang poets gave it
                tones = frozenset({usual[ch]})
            self.ping[i], self.ze[i] = PING in tones, ZE in tones
            allowed = readings.rhyme_groups(ch) if rhymes_by_usage else None
            for g in rhyme_table.groups_of(ch):
                self.member[g, i] = allowed is None or g in allowed
        groups = rhyme_table.groups
        # A 叶 character of group g: in a group of the same part (第七部) with the other tone.
        other = torch.tensor([[h.part == g.part and h.tone != g.tone for h in groups] for g in groups])
        self.ye_member = (other.float() @ self.member.float()) > 0
        common = getattr(tokenizer, "common", None)  # (V,) bool, when ids are not in order of frequency
        self.usable = (self.member[:, common] if common is not None else self.member[:, 4:COMMON_IDS]).sum(1) \
            >= MIN_COMMON_IN_GROUP
        self.group_tone = [g.tone for g in groups]

    @staticmethod
    def _contexts(tokenizer) -> tuple[dict, dict]:
        """Context readings as token ids: left[prev][ch] and right[ch][next] → 平/仄 of ch."""
        stoi, t = tokenizer.stoi, readings.table()
        left, right = {}, {}
        for pair, tone in t["left"].items():
            if pair[0] in stoi and pair[1] in stoi:
                left.setdefault(stoi[pair[0]], {})[stoi[pair[1]]] = tone
        for pair, tone in t["right"].items():
            if pair[0] in stoi and pair[1] in stoi:
                right.setdefault(stoi[pair[0]], {})[stoi[pair[1]]] = tone
        return left, right

    def char_tones(self, ch: str) -> frozenset[str]:
        """The tones the masks give a character: a polyphone's usual reading where Tang poets had one."""
        return frozenset({self._usual[ch]}) if ch in self._usual else self.tone_table.tones(ch)

    def tones_in_context(self, ch: str, before: str | None, after: str | None) -> frozenset[str]:
        """char_tones, unless a known neighbour decides the reading, as the checker reads it."""
        if self.left or self.right:
            read = readings.reading((before or "") + ch + (after or ""), len(before or ""))
            if read:
                return frozenset({read[0]})
        return self.char_tones(ch)

    def tone(self, required: str) -> torch.Tensor:
        """(V,) the characters that may stand where `required` (平/仄/中) is asked for."""
        if required == EITHER:
            return self.han
        return self.ping if required == PING else self.ze

    def groups_with_tone(self, tone: str) -> torch.Tensor:
        """(G,) the groups whose rhymes have this tone."""
        return torch.tensor([t == tone for t in self.group_tone])


@lru_cache(maxsize=8)
def vocab_masks(tokenizer, rhyme_scheme: str, kind: str) -> VocabMasks:
    """Cached per tokenizer object, scheme (pingshui/xinyun) and kind (shi/ci)."""
    return VocabMasks(tokenizer, *tables(rhyme_scheme, kind))
