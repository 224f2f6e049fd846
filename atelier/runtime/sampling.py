"""Turning one row of logits into the next token, with OpenAI's and HF's sampling knobs.

Order of operations (as in transformers' logits processors, then OpenAI's penalties):
  1. special tokens other than <eos> are never sampled
  2. repetition_penalty over prompt + generated tokens (HF: divide positive logits, multiply negative)
  3. presence_penalty / frequency_penalty over generated tokens (OpenAI's formula)
  4. temperature 0 → greedy; otherwise divide by temperature, then top_k, top_p, min_p
Log-probabilities reported to the client are the model's own (log-softmax after step 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


@dataclass
class Sampled:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob) alternatives, best first


def sample(logits: torch.Tensor, params: SamplingParams, *, banned: list[int], prompt_ids: list[int],
           generated: list[int], generator: torch.Generator) -> Sampled:
    """Pick the next token from logits (vocab,) for one sequence."""
    logits = logits.float().clone()
    # 1. never sample <pad>, <unk>, <bos>
    logits[banned] = -float("inf")
    logprobs = F.log_softmax(logits, dim=-1)
    # 2. repetition penalty
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(generated)), dtype=torch.long)
        if len(seen):
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    # 3. presence / frequency penalties: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(generated).unique(return_counts=True)
        logits[ids] -= counts.float() * params.frequency_penalty + params.presence_penalty
    # 4. choose
    if params.temperature == 0:
        token = int(torch.argmax(logits))
    else:
        logits = logits / params.temperature
        if params.top_k and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits[logits < kth] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = (sorted_p.cumsum(0) - sorted_p) >= params.top_p
            probs[order[drop]] = 0.0
        if params.min_p > 0.0:
            probs[probs < params.min_p * probs.max()] = 0.0
        token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
    top = []
    if params.logprobs:
        vals, idx = torch.topk(logprobs, params.logprobs)
        top = list(zip(idx.tolist(), vals.tolist()))
    return Sampled(token=token, logprob=float(logprobs[token]), top=top)
