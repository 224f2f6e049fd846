"""The text engine's batching leaves each sequence's text as it would be alone.

Sequences of different lengths share the batch: short ones finish and free their slots, the
engine moves the sequence in the highest slot into the freed one (so the active rows stay a run
of slots), and waiting sequences are admitted. None of it may change what a sequence writes.
"""

import os

import pytest
import torch
from conftest import engine_answers, engine_texts

from atelier.families.chargpt import CharLM
from atelier.models.chargpt import CharGPT, ChargptConfig
from atelier.models.tokenizer import CharTokenizer

POEMS = ["春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"]


def tiny_lm() -> CharLM:
    torch.manual_seed(0)
    tok = CharTokenizer.train(POEMS)
    model = CharGPT(ChargptConfig(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():  # weights large enough that what a row has written sways its next token
        for p in model.parameters():
            p.normal_(0, 0.5)
    return CharLM(model, tok)


def test_finishing_moving_and_admitting_sequences_leave_each_text_as_alone():
    lm = tiny_lm()
    requests = [("春眠", 3, 1), ("夜来风", 20, 2), ("床前", 6, 3), ("举头", 30, 4), ("花落", 2, 5), ("低头", 12, 6)]
    together = engine_texts(lm, requests, max_batch=4)
    assert together == [engine_texts(lm, [r], max_batch=1)[0] for r in requests]
    assert [len(t) for t in together] == [n for _, n, _ in requests]


def test_the_outbox_wakes_a_listening_loop_through_its_eventfd_and_refuses_a_closed_one():
    """Events posted from another thread reach a loop that listens (woken through an eventfd on Linux, whose
    wake-up is not a pipe's "sync" one: atelier/runtime/text_engine.py Outbox) and one that does not
    (call_soon_threadsafe); a closed loop is refused."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from atelier.runtime.text_engine import Outbox

    outbox = Outbox()

    async def receive(listen: bool) -> list:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        if listen:
            outbox.listen(loop)
            r, w = outbox._pipes[loop]
            assert r == w and os.readlink(f"/proc/self/fd/{r}") == "anon_inode:[eventfd]"
        threading.Thread(target=lambda: [outbox.post(loop, queue, i) for i in range(3)]).start()
        return [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]

    # Each loop in a thread of its own: the studio's browser tests leave one running in this thread.
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(asyncio.run, receive(True)).result(10) == [0, 1, 2]
        assert pool.submit(asyncio.run, receive(False)).result(10) == [0, 1, 2]
    loop = asyncio.new_event_loop()
    outbox.listen(loop)
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        outbox.post(loop, asyncio.Queue(), "late")


def test_a_character_model_writes_the_same_text_from_its_table_of_pieces():
    """chargpt's `token_pieces` (each token's own text) stand in for decoding a window of ids twice per token:
    the same text either way; a special token's piece is nothing, as decode drops it."""
    lm = tiny_lm()
    assert len(lm.token_pieces) == len(lm.tokenizer) and lm.token_pieces[lm.tokenizer.eos_id] == ""
    requests = [("春眠", 12, 1), ("夜来风", 20, 2)]
    with_table = engine_texts(lm, requests, max_batch=2)
    lm.token_pieces = None  # the engine takes the window path
    try:
        assert engine_texts(lm, requests, max_batch=2) == with_table
    finally:
        del lm.token_pieces


def conversation(lm, *, prefix_cache: bool) -> list[tuple[list[int], int]]:
    """(tokens, cached prompt tokens) of each request of a scripted exchange on one engine: a's turn, a's next
    turn (its prompt: the first turn, its answer and more), the same again with another seed, b sending a's
    prompt, then two owners' turns together and their next turns together, b's first."""
    from atelier.runtime.text_engine import TextEngine

    engine = TextEngine(lm, 4, prefix_cache=prefix_cache)
    more = lambda text: lm.encode(text)[1:]  # noqa: E731 — without the <bos> a prompt starts with
    results = []

    def turn(*requests):
        answers = engine_answers(engine, list(requests))
        results.extend((tokens, done.cached_tokens) for tokens, done in answers)
        return [tokens for tokens, _ in answers]

    p1 = lm.encode("春眠")
    (t1,) = turn((p1, "a", 6, 1))
    p2 = p1 + t1 + more("夜来")
    turn((p2, "a", 8, 2))
    turn((p2, "a", 8, 3))
    turn((p2, "b", 8, 3))
    q1, r1 = lm.encode("床前"), lm.encode("举头")
    tq, tr = turn((q1, "a", 12, 4), (r1, "b", 3, 5))
    turn((r1 + tr + more("低"), "b", 5, 6), (q1 + tq + more("月"), "a", 5, 7))
    engine.close()
    return results


@pytest.mark.parametrize("on", [True, False], ids=["native", "python"])
def test_a_next_turn_computes_only_what_its_slot_lacks_and_writes_what_a_whole_prefill_would(on):
    """Prefix caching: a freed slot keeps its sequence's keys and values, and the same owner's next prompt that
    starts with those tokens computes only the rest (the turn's prompt but its last token, whose logits give the
    first new one), on the native step and the Python paths. Every seeded sample is the one an engine without the
    cache writes; another owner never reads what a was sent."""
    from atelier.common import native

    lm = tiny_lm()
    native.use(on)
    try:
        cached = conversation(lm, prefix_cache=True)
        fresh = conversation(lm, prefix_cache=False)
    finally:
        native.use(True)
    assert [tokens for tokens, _ in cached] == [tokens for tokens, _ in fresh]
    assert all(n == 0 for _, n in fresh)
    p1, t1, more = 3, 6, 2  # <bos>春眠; a's answer; 夜来
    second = [n for _, n in cached]
    assert second[:4] == [0, p1 + t1 - 1, p1 + t1 + more - 1, 0]  # b's copy of a's prompt: nothing of a's
    # Two owners' new poems at once: each copies the <bos> its owner's slots hold (native: into a slot freed
    # longest ago; the Python paths: into the lowest, whose tokens move to an empty slot first). Then their next
    # turns, b's admitted first: native, each continues its own slot in place; the Python paths copy b's rows
    # into the lowest free slot (the active rows stay a run), which held a's turn: with no empty slot left to
    # move it to, a's next turn finds only a <bos> of its own elsewhere.
    q1, tq, r1, tr = 3, 12, 3, 3
    assert second[4:6] == [1, 1]
    assert second[6:] == ([r1 + tr - 1, q1 + tq - 1] if on else [r1 + tr - 1, 1])


def test_the_same_prompt_again_copies_what_it_finds_and_the_conversation_keeps_its_slot():
    """Native steps: a prompt sent again after a long answer (a regenerated reply) finds its tokens in the slot
    of the first, copied into a slot of its own, so that slot still holds the first answer for the turn that
    continues it. The same tokens as an engine without the cache, at every step."""
    from atelier.runtime.text_engine import TextEngine

    lm = tiny_lm()
    p = lm.encode("春眠")
    runs = []
    for prefix_cache in (True, False):
        engine = TextEngine(lm, 4, prefix_cache=prefix_cache)
        [(first, a)] = engine_answers(engine, [(p, "a", 20, 1)])
        [(again, b)] = engine_answers(engine, [(p, "a", 20, 2)])
        [(_, c)] = engine_answers(engine, [(p + first + lm.encode("夜来")[1:], "a", 5, 3)])
        engine.close()
        runs.append(([first, again], [a.cached_tokens, b.cached_tokens, c.cached_tokens]))
    assert runs[0][0] == runs[1][0] and runs[1][1] == [0, 0, 0]
    assert runs[0][1] == [0, len(p) - 1, len(p) + 20 - 1]


@pytest.mark.parametrize("on", [True, False], ids=["native", "python"])
def test_two_keys_taking_turns_keep_their_conversations(on):
    """a's turn, b's turn, a's next turn: a finds its whole first turn. Native steps take the slot freed longest
    ago; the Python paths take their lowest slot, which held a's turn, and move a's tokens to an empty slot first.
    The same tokens as an engine without the cache."""
    from atelier.common import native
    from atelier.runtime.text_engine import TextEngine

    lm = tiny_lm()
    native.use(on)
    try:
        runs = []
        for prefix_cache in (True, False):
            engine = TextEngine(lm, 4, prefix_cache=prefix_cache)
            p = lm.encode("春眠")
            [(first, _)] = engine_answers(engine, [(p, "a", 10, 1)])
            [(other, _)] = engine_answers(engine, [(lm.encode("床前"), "b", 10, 2)])
            [(_, done)] = engine_answers(engine, [(p + first + lm.encode("夜来")[1:], "a", 5, 3)])
            engine.close()
            runs.append((first, other, done.cached_tokens))
    finally:
        native.use(True)
    assert runs[0][:2] == runs[1][:2] and runs[1][2] == 0
    assert runs[0][2] == len(p) + 10 - 1


def with_prefill_chunk(lm, chunk: int, requests: list[tuple[list[int], str, int, int]], max_batch: int = 3):
    from atelier.runtime.text_engine import TextEngine

    engine = TextEngine(lm, max_batch, prefill_chunk=chunk)
    try:
        return [(tokens, done.prompt_tokens, done.cached_tokens) for tokens, done in engine_answers(engine, requests)]
    finally:
        engine.close()


@pytest.mark.parametrize("on", [True, False], ids=["native", "python"])
def test_prompts_prefilled_in_parts_write_what_whole_prefills_would(on):
    """Chunked prefill: with 4 prompt tokens an iteration, long prompts go in over several (a burst of them one
    after another, one admitted once a slot frees, a conversation's next turn from what its slot holds), and
    every seeded sample is the one whole prefills give; so is the cache they leave for the owner's next turn."""
    from atelier.common import native
    from atelier.runtime.text_engine import PREFILL_CHUNK

    lm = tiny_lm()
    first, second = lm.encode(POEMS[0]), lm.encode(POEMS[1][:15])
    requests = [(first, "a", 10, 1), (lm.encode("春眠"), "b", 20, 2), (second, "c", 12, 3), (lm.encode("夜来"), "d", 8, 4)]
    native.use(on)
    try:
        runs = []
        for chunk in (4, PREFILL_CHUNK):
            answers = with_prefill_chunk(lm, chunk, requests)
            turn = first + answers[0][0][:-1] + lm.encode("举头")[1:]  # a's next turn, with a prompt of 9 new tokens
            runs.append(answers + with_prefill_chunk(lm, chunk, [(first, "a", 5, 1), (turn, "a", 6, 5)], 2))
    finally:
        native.use(True)
    assert runs[0] == runs[1]
    assert [prompt for _, prompt, _ in runs[0][:4]] == [len(first), 3, len(second), 3]


def tokens_around_a_long_prompt(lm, chunk: int) -> str:
    """A (a 3-token prompt, 40 tokens) and B (a 25-token prompt, 1 token) submitted together: their tokens in the
    order they arrive, "A" or "B" each (a step's events go out in its rows' order)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from atelier.runtime.sampling import SamplingParams
    from atelier.runtime.text_engine import Finished, Sequence, TextChunk, TextEngine

    engine = TextEngine(lm, 2, prefill_chunk=chunk)
    params = SamplingParams(ignore_eos=True)

    async def run():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with engine._wake:  # admitted together
            for i, (prompt, n) in enumerate([("春眠", 40), (POEMS[0], 1)]):
                engine.submit(Sequence(index=i, prompt_ids=lm.encode(prompt), params=params, max_tokens=n, stop=[],
                                       seed=i, loop=loop, events=events))
        order, finished = "", 0
        while finished < 2:
            index, event = await asyncio.wait_for(events.get(), 30)
            if isinstance(event, TextChunk):
                order += "AB"[index] * len(event.tokens)
            else:
                assert isinstance(event, Finished), event
                finished += 1
        return order

    try:
        with ThreadPoolExecutor(1) as pool:  # a loop of its own, as engine_run's
            return pool.submit(asyncio.run, run()).result(60)
    finally:
        engine.close()


@pytest.mark.parametrize("on", [True, False], ids=["native", "python"])
def test_running_sequences_go_on_decoding_while_a_long_prompt_is_prefilled(on):
    """With 2 prompt tokens an iteration, B's 25-token prompt goes in over 13 iterations after A's, each of which
    gives A a token, so 13 of A's come before B's first; with the default, both prompts go in at once, and A's
    first token comes with B's."""
    from atelier.common import native
    from atelier.runtime.text_engine import PREFILL_CHUNK

    lm = tiny_lm()
    native.use(on)
    try:
        chunked, whole = (tokens_around_a_long_prompt(lm, chunk) for chunk in (2, PREFILL_CHUNK))
    finally:
        native.use(True)
    assert chunked.index("B") == 13 and whole.index("B") == 1, (chunked, whole)
    assert chunked.count("A") == whole.count("A") == 40


def test_the_prefill_chunk_is_a_number_of_tokens_between_1_and_prefill_tokens(tmp_path):
    """ATELIER_PREFILL_CHUNK out of range stops the server's start, naming the setting; so does the engine."""
    from pydantic import ValidationError

    from atelier.config import Settings
    from atelier.runtime.text_engine import PREFILL_CHUNK, PREFILL_TOKENS, TextEngine

    assert Settings(home=tmp_path).prefill_chunk == PREFILL_CHUNK  # the server's default is the engine's
    for bad in (0, PREFILL_TOKENS + 1):
        with pytest.raises(ValueError, match="prefill_chunk"):
            TextEngine(tiny_lm(), 2, prefill_chunk=bad)
        with pytest.raises(ValidationError, match="prefill_chunk"):
            Settings(home=tmp_path, prefill_chunk=bad)
    assert Settings(home=tmp_path, prefill_chunk=PREFILL_TOKENS).prefill_chunk == PREFILL_TOKENS


def test_a_prompt_of_no_tokens_is_refused_before_it_reaches_a_step():
    """A text the model's tokenizer makes nothing of (an imported tokenizer that knows none of its characters)
    would have no logits to follow: submit refuses it, as it refuses one the context cannot hold."""
    from atelier.runtime.sampling import SamplingParams
    from atelier.runtime.text_engine import Sequence, TextEngine

    engine = TextEngine(tiny_lm(), 2)
    try:
        for ids, why in (([], "no tokens"), ([1] * 64, "does not fit")):
            with pytest.raises(ValueError, match=why):
                engine.submit(Sequence(index=0, prompt_ids=ids, params=SamplingParams(), max_tokens=1, stop=[],
                                       seed=0, loop=None, events=None))
    finally:
        engine.close()
