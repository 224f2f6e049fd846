"""Sampling knobs: greedy, top-k/top-p/min-p, penalties, seeded determinism."""

import torch

from atelier.runtime.sampling import SamplingParams, sample

BANNED = [0, 1, 2]


def draw(logits, seed=0, generated=(), prompt=(), **kw):
    return sample(torch.tensor(logits), SamplingParams(**kw), banned=BANNED, prompt_ids=list(prompt),
                  generated=list(generated), generator=torch.Generator().manual_seed(seed)).token


LOGITS = [9.0, 9.0, 9.0, 1.0, 3.0, 2.9, 0.5]


def test_special_tokens_are_never_sampled():
    assert all(draw(LOGITS, seed=s, temperature=2.0) not in BANNED for s in range(50))


def test_temperature_zero_is_greedy():
    assert draw(LOGITS, temperature=0) == 4


def test_top_k_1_and_tiny_top_p_are_greedy():
    assert {draw(LOGITS, seed=s, top_k=1) for s in range(20)} == {4}
    assert {draw(LOGITS, seed=s, top_p=0.01) for s in range(20)} == {4}


def test_min_p_keeps_only_close_candidates():
    seen = {draw(LOGITS, seed=s, min_p=0.5) for s in range(100)}
    assert seen == {4, 5}  # 5 has ~0.9 of 4's probability; the rest are far below half


def test_same_seed_same_token_different_seeds_vary():
    flat = [0.0] * 3 + [1.0] * 20
    assert draw(flat, seed=3) == draw(flat, seed=3)
    assert len({draw(flat, seed=s) for s in range(30)}) > 5


def test_penalties_push_away_from_repeated_tokens():
    assert draw(LOGITS, temperature=0, generated=[4], presence_penalty=2.0) == 5
    assert draw(LOGITS, temperature=0, generated=[4, 4], frequency_penalty=0.1) == 5
    assert draw(LOGITS, temperature=0, prompt=[4], repetition_penalty=1.5) == 5


def test_logprobs_are_the_models_own():
    out = sample(torch.tensor(LOGITS), SamplingParams(temperature=0, logprobs=2), banned=BANNED,
                 prompt_ids=[], generated=[], generator=torch.Generator())
    ref = torch.log_softmax(torch.tensor([-1e9] * 3 + LOGITS[3:]), 0)
    assert abs(out.logprob - float(ref[4])) < 1e-5
    assert [t for t, _ in out.top] == [4, 5]
