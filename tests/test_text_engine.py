"""The text engine's batching leaves each sequence's text as it would be alone.

Sequences of different lengths share the batch: short ones finish and free their slots, the
engine moves the sequence in the highest slot into the freed one (so the active rows stay a run
of slots), and waiting sequences are admitted. None of it may change what a sequence writes.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from atelier.families.chargpt import CharLM
from atelier.models.chargpt import CharGPT, ChargptConfig
from atelier.models.tokenizer import CharTokenizer
from atelier.runtime.sampling import SamplingParams
from atelier.runtime.text_engine import Finished, Sequence, TextChunk, TextEngine

POEMS = ["春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"]


def tiny_lm() -> CharLM:
    torch.manual_seed(0)
    tok = CharTokenizer.train(POEMS)
    model = CharGPT(ChargptConfig(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():  # weights large enough that what a row has written sways its next token
        for p in model.parameters():
            p.normal_(0, 0.5)
    return CharLM(model, tok)


def run(lm: CharLM, requests: list[tuple[str, int, int]], max_batch: int) -> tuple[list[str], TextEngine]:
    """(prompt, max_tokens, seed) each, submitted at once; the texts in order."""

    async def go():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        engine = TextEngine(lm, max_batch)
        params = SamplingParams(temperature=1.0, ignore_eos=True)
        with engine._wake:  # admitted together, then as slots free
            for i, (prompt, n, seed) in enumerate(requests):
                engine.submit(Sequence(index=i, prompt_ids=lm.encode(prompt), params=params, max_tokens=n, stop=[],
                                       seed=seed, loop=loop, events=events))
        texts, done = [""] * len(requests), 0
        while done < len(requests):
            i, event = await events.get()
            if isinstance(event, TextChunk):
                texts[i] += event.text
            elif isinstance(event, Finished):
                assert event.completion_tokens == requests[i][1]
                done += 1
        engine.close()
        return texts, engine

    # A loop of its own in a thread of its own: the studio tests' browser keeps one running in this thread.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def test_finishing_moving_and_admitting_sequences_leave_each_text_as_alone():
    lm = tiny_lm()
    requests = [("春眠", 3, 1), ("夜来风", 20, 2), ("床前", 6, 3), ("举头", 30, 4), ("花落", 2, 5), ("低头", 12, 6)]
    together, engine = run(lm, requests, max_batch=4)
    alone = [run(lm, [r], max_batch=1)[0][0] for r in requests]
    assert together == alone
    assert [len(t) for t in together] == [n for _, n, _ in requests]
    assert all(s is None for s in engine.slots)
