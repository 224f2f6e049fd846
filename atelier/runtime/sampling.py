"""Turning rows of logits into next tokens, with OpenAI's and HF's sampling knobs.

Every row (sequence) has its own parameters and its own seeded generator; the arithmetic
runs on the whole batch at once. Order of operations (as transformers' logits processors,
then OpenAI's penalties):
  1. banned tokens (<pad>, <unk>, <bos>; <eos> too with ignore_eos) are never sampled
  2. repetition_penalty over prompt + generated tokens (HF: divide positive logits, multiply negative)
  3. presence_penalty / frequency_penalty over generated tokens (OpenAI's formula)
  4. temperature 0 → greedy; otherwise divide by temperature, then top_k, top_p, min_p
  5. draw by inverse CDF with one uniform number from the row's generator, so a row's
     draw does not depend on the other rows in the batch
Log-probabilities reported to the client are the model's own (log-softmax after step 1).
When no row asks for more than a temperature (the common case, and every benchmark), steps 1, 4 and 5
are one call to the native kernels (atelier/common/native/), fused into three passes over each row: the
same tokens either way (tests/test_native.py), but for a draw that falls within a float's rounding of the
boundary between two tokens (about one in 10⁵), which may take the neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from atelier.common.native import kernels


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = off; k = also return the top k alternatives
    ignore_eos: bool = False  # keep going to max_tokens (vLLM's option; benchmarks use it)

    @cached_property  # read for every row at every step
    def plain(self) -> bool:
        """Nothing asked for but a temperature: no penalties, no truncation, no log-probabilities."""
        return (self.top_p >= 1 and self.top_k == 0 and self.min_p <= 0 and self.repetition_penalty == 1.0
                and not self.presence_penalty and not self.frequency_penalty and self.logprobs is None)


@dataclass
class Sampled:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob) alternatives, best first


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], *, banned: list[list[int]],
                prompt_ids: list[list[int]], generated: list[list[int]],
                generators: list[torch.Generator], scratch: bool = False) -> list[Sampled]:
    """Pick the next token for each row of logits (B, vocab). With scratch=True the caller gives the
    logits away and they are edited in place (the text engine: a copy of 32 rows costs 0.14 ms)."""
    logits = logits.float() if scratch else logits.float().clone()
    native = kernels()
    if native is not None and all(p.plain for p in params):
        tokens = native.sample_plain(logits.contiguous(), banned, [p.temperature for p in params], generators)
        return [Sampled(token=t, logprob=0.0, top=[]) for t in tokens]
    B = logits.shape[0]
    # 1. banned tokens: one write per distinct list (rows usually share theirs)
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for i, ids in enumerate(banned):
        rows_of.setdefault(tuple(ids), []).append(i)
    for ids, rows in rows_of.items():
        if ids:
            logits[rows[0] if len(rows) == 1 else torch.tensor(rows)[:, None], list(ids)] = -float("inf")
    want_logprobs = [i for i in range(B) if params[i].logprobs is not None]
    model_logprobs = F.log_softmax(logits, dim=-1) if want_logprobs else None
    for i, p in enumerate(params):
        # 2. repetition penalty
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids[i]) | set(generated[i])), dtype=torch.long)
            if len(seen):
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        # 3. presence / frequency penalties: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence
        if generated[i] and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(generated[i]).unique(return_counts=True)
            logits[i, ids] -= counts.float() * p.frequency_penalty + p.presence_penalty
        # top_k, per row
        if p.temperature > 0 and 0 < p.top_k < logits.shape[1]:
            kth = torch.topk(logits[i], p.top_k).values[-1]
            logits[i, logits[i] < kth] = -float("inf")
    # 4. temperature, top_p, min_p on the whole batch (each only when some row asks for it)
    temps = [p.temperature for p in params]
    if any(t not in (0.0, 1.0) for t in temps):
        logits_t = logits / torch.tensor([t or 1.0 for t in temps])[:, None]
    else:
        logits_t = logits
    probs = F.softmax(logits_t, dim=-1)
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params])
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params])
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
    # 5. inverse-CDF draw: the first token whose cumulative mass exceeds u * total
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators])
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_(max=logits.shape[1] - 1)
    if 0.0 in temps:
        tokens = torch.where(torch.tensor(temps) == 0, logits.argmax(-1), tokens)
    out = []
    for i, t in enumerate(tokens.tolist()):
        lp, top = 0.0, []
        if model_logprobs is not None and params[i].logprobs is not None:
            lp = float(model_logprobs[i, t])
            if params[i].logprobs:
                vals, idx = torch.topk(model_logprobs[i], params[i].logprobs)
                top = list(zip(idx.tolist(), vals.tolist()))
        out.append(Sampled(token=t, logprob=lp, top=top))
    return out


def sample(logits: torch.Tensor, params: SamplingParams, *, banned: list[int], prompt_ids: list[int],
           generated: list[int], generator: torch.Generator) -> Sampled:
    """One row: `sample_rows` for a batch of one."""
    return sample_rows(logits[None], [params], banned=[banned], prompt_ids=[prompt_ids], generated=[generated],
                       generators=[generator])[0]
