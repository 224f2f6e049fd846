"""Continuous batching for a language model (any TextServable, atelier/families/base.py).

One engine per loaded text model, with one worker thread. Requests become *sequences*
(one per choice of `n`); each active sequence owns a row ("slot") of a shared KV cache.
Every iteration of the worker:
  1. admits waiting sequences into free slots, and computes up to `prefill_chunk` tokens of the
     prompts not yet in their slots (ATELIER_PREFILL_CHUNK, first come first served), together
     (right-padded to the longest on the Python paths, in forwards of up to PREFILL_TOKENS)
  2. decodes one token for every active sequence in a single batched forward, rows of
     different lengths together (the cache masks keys by position); with the native kernels the
     prompts' tokens join this forward (a step's rows may hold a token or part of a prompt), so
     admitting a request costs its prompt's tokens, not another pass over the weights
  3. samples each row with its own parameters and seeded generator, turns tokens into
     text (whole characters only: a byte-level token may end inside a UTF-8 character,
     which waits for the token that completes it), applies stop sequences, and hands text
     to the waiting request
A sequence leaves its slot when it finishes or is cancelled (client gone), and a waiting
one takes a slot at the next iteration, so short and long requests share the batch. A prompt longer
than what an iteration computes is prefilled over several (chunked prefill, as vLLM's scheduler and
llama.cpp's server do it): its first token comes from its last part, and meanwhile the active
sequences go on decoding a token an iteration instead of waiting for the whole prompt (a 1,900-token
prompt of a 24 M-parameter model took 0.6 s in one forward, every stream's next token with it). A step's text
goes out just before the next forward starts (or before the worker waits for work), and a native
forward wakes the event loops itself once it has let go of the GIL, so they turn tokens into SSE
chunks while it runs instead of taking the GIL from the worker in the middle of its Python. On the
Python paths the active sequences hold slots 0…n-1 (the last one moves into a slot that frees, cache
rows and all), so a decoding step reads the cache as one run of rows instead of gathering them; the
native step takes any rows, and a freed slot stays a hole. When the engine closes (its model is
unloaded), every waiting and running sequence gets an EngineClosed event instead of hanging.

Prefix caching (ATELIER_PREFIX_CACHE, as llama.cpp's server keeps a slot's prompt and vLLM its
blocks): a freed slot's cache rows still hold the keys and values of its last sequence's tokens, and
a sequence admitted with the same `owner` (the API key) whose prompt continues those tokens takes that
slot and computes only the rest of its prompt (the next turn of a chat carries the whole conversation
before it); a prompt that only starts the same way (the same prompt again, a shared system prompt) has
the keys and values it shares copied into a slot of its own. Keys at a position depend only on the
tokens up to it, so the reused ones are those a prefill would write, to a float's rounding (a step of
one row and a prefill of many sum in different orders). Owners never share: a hit would tell one key,
by its speed, what another sent.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from atelier.common.native import kernels
from atelier.runtime.errors import EngineClosed
from atelier.runtime.sampling import Sampled, SamplingParams, sample_rows

log = logging.getLogger(__name__)

PREFILL_TOKENS = 4096  # prompt tokens (padding included) prefilled in one forward
# Prompt tokens an iteration computes, by default: 256 of a 24 M-parameter model took 70 ms here, as long as
# streams beside a long prompt waited at most (benchmarks/chunked_prefill.py), for 6 % more time to its first token
PREFILL_CHUNK = 256


@dataclass
class TextChunk:
    text: str
    tokens: list[Sampled]  # the tokens whose text this is


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values were in the cache already (prefix caching)


class Outbox:
    """Events from engine threads to the event loops that wait for them, one wake-up per batch.

    `call_soon_threadsafe` writes to the loop's self-pipe each time it is called, and the write
    hands the GIL to the woken loop while the engine waits to take it back; per token, across
    32 streams, that is 32 hand-overs per decoding step. Here a loop is woken only when its
    first event arrives; the events that follow before it drains ride along.

    A loop that `listen`s (the text engine's callers do) is woken through a descriptor of its own
    instead: `post_all` returns those to write to, so that an engine can leave the write to its
    native decoding step. Written there, without the GIL, the loop turns the events into chunks
    while the step computes, instead of the engine waiting for the loop to give the GIL back
    (about 0.1 ms a token at batch 1, a tenth of it).

    The descriptor is an eventfd where there is one (Linux), else a pipe. A pipe's write wakes its
    reader as a "sync" wake-up (the writer is taken to be about to sleep), and Linux then queues
    the woken thread on the writer's CPU when that runs one task: the loop went to the core the
    engine's step was computing on, while the other was free. An eventfd's wake-up lets the loop
    run where it ran, or on an idle core (streamed 64-token completions, one client, alternating
    servers: 4 % less time each).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}
        self._pipes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (read fd, write fd)

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """From the loop's own thread: wake this loop through an eventfd (or a pipe) from now on."""
        if loop in self._pipes or loop.is_closed():
            return
        if hasattr(os, "eventfd"):
            r = w = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
        try:
            loop.add_reader(r, self._on_wake, loop, r)
        except NotImplementedError:  # a loop without readers (Windows' proactor): its self-pipe it is
            _close_pipe(r, w)
            return
        self._pipes[loop] = (r, w)
        weakref.finalize(loop, _close_pipe, r, w)

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
        if self.send([(loop, queue, item)]):
            raise RuntimeError("Event loop is closed")

    def send(self, events: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, object]]) -> set:
        """`post_all`, with the pipes woken here; the loops that have closed."""
        closed, fds = self.post_all(events)
        wake(fds)
        return closed

    def post_all(self, events: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, object]]) -> tuple[set, list[int]]:
        """Post a step's events at once, so that each loop wakes once with all of its events ready.
        Returns the loops that have closed (nobody is left to read their events) and the pipes to
        write a byte to (`wake`), for the loops that listen; the others are woken here."""
        woken = []
        with self._lock:
            for loop, queue, item in events:
                waiting = self._pending.setdefault(loop, [])
                if not waiting:
                    woken.append(loop)
                waiting.append((queue, item))
        closed, fds = set(), []
        for loop in woken:
            pipe = self._pipes.get(loop)
            if pipe is not None and not loop.is_closed():
                fds.append(pipe[1])
                continue
            try:
                loop.call_soon_threadsafe(self._drain, loop)
            except RuntimeError:
                with self._lock:
                    self._pending.pop(loop, None)
                closed.add(loop)
        return closed, fds

    def _on_wake(self, loop: asyncio.AbstractEventLoop, r: int) -> None:
        try:
            while os.read(r, 4096):
                pass
        except BlockingIOError:
            pass
        self._drain(loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            items = self._pending.pop(loop, [])
        for queue, item in items:
            queue.put_nowait(item)


def _close_pipe(r: int, w: int) -> None:
    for fd in {r, w}:
        try:
            os.close(fd)
        except OSError:
            pass


WAKE = (1).to_bytes(8, sys.byteorder)  # an eventfd's counter takes 8 bytes; a pipe reads them as any others


def wake(fds: list[int]) -> None:
    """Write a wake-up to each descriptor (a full pipe, or a counter at its limit, has one waiting already)."""
    for fd in fds:
        try:
            os.write(fd, WAKE)
        except (BlockingIOError, OSError):
            pass


OUTBOX = Outbox()


@dataclass
class Sequence:
    """One choice being generated.

    Its events arrive as `(index, TextChunk | Finished | Exception)` on `events`, an
    asyncio queue of the caller's event loop that the `n` choices of a request share.
    """

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    owner: str | None = None  # who may reuse the cache this sequence leaves, and whose it may reuse (the key)
    # worker-side state
    cached: int = 0  # leading prompt tokens found in its slot's cache, not computed again
    prefilled: int = 0  # leading prompt tokens whose keys and values its slot holds (found there or computed)
    upto: int = 0  # the prompt's tokens before this are what the step it joins computes (from `prefilled`)
    generated: list[int] = field(default_factory=list)
    sampled: list[Sampled] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already sent
    token_ends: list[int] = field(default_factory=list)  # len(text) once each sampled token's text is in it
    tokens_emitted: int = 0
    prefix_offset: int = 0  # detokenizing: ids[prefix_offset:read_offset] is text already taken
    read_offset: int = 0
    slot: int = -1
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


def prepare(seq: Sequence, context: int) -> None:
    """What an engine's `submit` does first, on the caller's thread: refuse a prompt that does not fit the
    context (ValueError), and have the request's loop woken through its eventfd (or pipe) when it submits
    from that loop."""
    try:
        if asyncio.get_running_loop() is seq.loop:
            OUTBOX.listen(seq.loop)
    except RuntimeError:  # submitted from outside any loop: woken through call_soon_threadsafe
        pass
    if len(seq.prompt_ids) >= context:
        raise ValueError(f"prompt of {len(seq.prompt_ids)} tokens does not fit the context of {context}")
    if not seq.prompt_ids:
        raise ValueError("a prompt of no tokens: its logits would have nothing to follow")


# ATELIER_KV_CACHE_DTYPE: float32 is a float32 model's own (None: the family's default, the dtype it computes in)
KV_DTYPES = {"float32": None, "float16": torch.float16}


class TextEngine:
    def __init__(self, lm, max_batch: int = 16, deliver: Callable[[list], None] | None = None,
                 kv_dtype: str = "float32", prefix_cache: bool = True, prefill_chunk: int = PREFILL_CHUNK):
        """`deliver`: where each step's events go, as [(sequence, event), …], instead of the sequences'
        event loops (an engine process sends them to the server: runtime/engine_process.py). `kv_dtype`
        (ATELIER_KV_CACHE_DTYPE): what the KV cache holds, "float16" or "float32"; every path writes keys and
        values rounded to it and attends over them as floats, so they agree on either. `prefix_cache`
        (ATELIER_PREFIX_CACHE): reuse what freed slots hold (the module's docstring). `prefill_chunk`
        (ATELIER_PREFILL_CHUNK): the most prompt tokens an iteration computes (1 to PREFILL_TOKENS)."""
        if not 1 <= prefill_chunk <= PREFILL_TOKENS:
            raise ValueError(f"prefill_chunk must be between 1 and {PREFILL_TOKENS}, not {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.lm = lm
        self._deliver = deliver
        self._pieces = getattr(lm, "token_pieces", None)  # each token's own text, when it never joins others
        self.max_batch = max_batch
        self.kv_dtype = kv_dtype
        self.cache = lm.new_cache(max_batch, dtype=KV_DTYPES[kv_dtype])
        self.native_decoding = str(getattr(lm, "decoding", "")).startswith("native")
        self.slots: list[Sequence | None] = [None] * max_batch
        self.prefix_cache = prefix_cache
        # Per free slot: (owner, tokens) whose keys and values its cache rows hold at positions 0…len-1, and
        # when it was freed (the slot freed longest ago is the one to overwrite).
        self._held: list[tuple[str | None, list[int]] | None] = [None] * max_batch
        self._freed_at = [0] * max_batch
        self._frees = itertools.count(1)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, in slots, their prompts not all computed: first come first
        self._wake = threading.Condition()
        self._closed = False
        self.cancelled = 0  # sequences dropped because their client left
        self._outgoing: list[tuple[Sequence, object]] = []  # events of the worker's last step, not yet sent
        self._thread = threading.Thread(target=self._run, name="text-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.lm.context

    def submit(self, seq: Sequence) -> Sequence:
        prepare(seq, self.context)
        with self._wake:
            if self._closed:
                raise EngineClosed("the model was unloaded before this request ran; retry it")
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    def close(self) -> None:
        """Stop the worker; every waiting and running sequence ends with EngineClosed."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        with self._wake:
            for seq in list(self.waiting) + [s for s in self.slots if s is not None]:
                self._post(seq, EngineClosed("the model was unloaded while this request was generating; retry it"))
            self._send()  # the worker has stopped: its outgoing list is this thread's now
            self.waiting.clear()
            self.prefilling.clear()
            self.slots = [None] * self.max_batch
            self._held = [None] * self.max_batch

    # -- worker -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting and not any(self.slots):
                    self._send()
                    self._wake.wait()
                if self._closed:
                    self._send()
                    return
            try:
                with torch.inference_mode():
                    native = kernels() if self.native_decoding else None
                    self._decode_step(self._admit(fuse=native is not None), native)
            except Exception:  # a bug must not kill the engine: fail the active sequences
                log.exception("text engine step failed")
                for i, s in enumerate(self.slots):
                    if s is not None:
                        self._post(s, RuntimeError("generation failed"))
                        self.slots[i] = None
                self.prefilling.clear()
                self._held = [None] * self.max_batch  # a step that failed may have written anywhere

    def _post(self, seq: Sequence, event) -> None:
        self._outgoing.append((seq, event))

    def _send(self, native=None) -> None:
        """Hand the events posted since the last send to their event loops. With `native` (the kernels,
        whose decoding step comes next) the loops that listen are woken by that step, without the GIL."""
        outgoing, self._outgoing = self._outgoing, []
        if outgoing and self._deliver is not None:
            self._deliver(outgoing)
        elif outgoing:
            closed, fds = OUTBOX.post_all([(seq.loop, seq.events, (seq.index, event)) for seq, event in outgoing])
            for seq, _ in outgoing:
                if seq.loop in closed:  # nobody is left to read: stop writing
                    seq.cancel()
            if native is not None:
                native.arm_wake(fds)
            else:
                wake(fds)

    def _admit(self, fuse: bool) -> list[Sequence]:
        """1. Waiting sequences take the free slots, and up to `prefill_chunk` tokens of the prompts not yet
        computed are (first come first served; the rest of a prompt waits for the next iteration), so a burst
        of requests waits one prefill, not one per request ahead of it, and a long prompt holds the active
        sequences up for a chunk at a time. With `fuse` (native steps, which compute no padding) they are
        returned for the decoding step to take; otherwise they are prefilled here, right-padded to the longest
        in forwards of up to PREFILL_TOKENS tokens, and nothing is returned."""
        with self._wake:
            free = [i for i, s in enumerate(self.slots) if s is None]
            while free and self.waiting:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    continue
                seq.slot = self._take_slot(seq, free)
                seq.prefilled = seq.cached
                seq.generator = torch.Generator().manual_seed(seq.seed)
                self.slots[seq.slot] = seq
                self.prefilling.append(seq)
        budget, joining = self.prefill_chunk, []
        for seq in self.prefilling:
            if budget == 0:
                break
            if seq.cancelled:
                continue
            seq.upto = seq.prefilled + min(len(seq.prompt_ids) - seq.prefilled, budget)
            budget -= seq.upto - seq.prefilled
            joining.append(seq)
        if fuse:
            return joining
        chunk: list[Sequence] = []
        width = 0  # the most tokens a row of the chunk computes: every row is padded to it
        for seq in joining:
            width = max(width, seq.upto - seq.prefilled)
            if chunk and width * (len(chunk) + 1) > PREFILL_TOKENS:
                self._prefill(chunk)
                chunk, width = [], seq.upto - seq.prefilled
            chunk.append(seq)
        if chunk:
            self._prefill(chunk)
        return []

    def _take_slot(self, seq: Sequence, free: list[int]) -> int:
        """Take a free slot for seq (removed from `free`): the lowest (Python paths) or the one freed longest ago
        (native, with prefix caching: the others keep their owners' last turns a while longer). With prefix
        caching, the free slot of seq's owner that holds the longest start of seq's prompt gives it: in place
        where the prompt continues at least half of what that slot holds (a conversation's next turn; native
        steps), else copied into the slot taken (the same prompt again, a shared system prompt: the slot's own
        tokens stay for their conversation). seq.cached says how much of its prompt it found; its last token is
        computed all the same (its logits give the first new token). The Python paths always copy into their
        lowest free slot, keeping the active rows a run, and move what that slot held to an empty one first."""
        holes = self._leaves_holes()
        slot = min(free, key=self._freed_at.__getitem__) if holes and self.prefix_cache else free[0]
        if self.prefix_cache:
            held = {i: self._held[i][1] for i in free if self._held[i] is not None and self._held[i][0] == seq.owner}
            match = {i: _common_prefix(tokens, seq.prompt_ids) for i, tokens in held.items()}
            # the longest match; between equals, one the prompt continues, then the one freed last
            source = max(match, default=None, key=lambda i: (match[i], 2 * match[i] >= len(held[i]),
                                                             self._freed_at[i]))
            reuse = min(match[source], len(seq.prompt_ids) - 1) if source is not None else 0
            continues = reuse > 0 and 2 * match[source] >= len(held[source])
            if not holes and not (continues and source == slot):
                self._keep_elsewhere(slot, free)
            if reuse > 0:
                if holes and continues:
                    slot = source
                elif source != slot:
                    self.cache.copy_rows(torch.tensor([source]), torch.tensor([slot]), reuse)
                seq.cached = reuse
        free.remove(slot)
        self._held[slot] = None
        return slot

    def _keep_elsewhere(self, slot: int, free: list[int]) -> None:
        """The Python paths take their lowest free slot: what it holds (another conversation) moves to a free slot
        that holds nothing, while there is one, rather than be overwritten."""
        if self._held[slot] is None:
            return
        empty = next((i for i in free if i != slot and self._held[i] is None), None)
        if empty is not None:
            self.cache.copy_rows(torch.tensor([slot]), torch.tensor([empty]), len(self._held[slot][1]))
            self._held[empty], self._freed_at[empty] = self._held[slot], self._freed_at[slot]

    def _leaves_holes(self) -> bool:
        """Whether a freed slot stays empty (the native step takes any rows) rather than taking the last row."""
        return self.native_decoding and kernels() is not None

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Each prompt's next part into its slot, then the first token of each whose last part that was: a step
        of prompts only."""
        self._step([], seqs, None)

    def _decode_step(self, joining: list[Sequence], native) -> None:
        """2. One token for every active row, each at its own position, and (`joining`, native steps only)
        this iteration's part of the prompts being prefilled."""
        for s in [s for s in self.slots if s is not None and s.cancelled]:
            self.cancelled += 1
            self._release(s)
        joining = [s for s in joining if not s.cancelled]
        active = [s for s in self.slots if s is not None and s.prefilled == len(s.prompt_ids)]
        if active or joining:
            self._step(active, joining, native)

    def _step(self, active: list[Sequence], joining: list[Sequence], native) -> None:
        """One forward: the last token of each active row at its position, and each joining prompt's tokens from
        the first its slot's cache lacks (position seq.prefilled: 0 but for a prefix found there or a part
        computed before) up to seq.upto, rows right-padded to the longest; each row's logits at its last real
        token, sampled where that ends its prompt or is a decoded one. The native step computes no padding. The
        Python paths write a padded position to the cache past its row's part (at most at the context's last),
        masked from every real query (keys are masked by position), and the next part or decoding overwrites it
        before any query can see it; they take prompts or active rows, never both. `native`: the kernels,
        armed to wake the event loops once they let go of the GIL."""
        width = max([s.upto - s.prefilled for s in joining], default=1)
        parts = [s.prompt_ids[s.prefilled:s.upto] for s in joining]
        ids = torch.tensor([[s.generated[-1]] * width for s in active] +
                           [part + [part[-1]] * (width - len(part)) for part in parts])
        start = torch.tensor([len(s.prompt_ids) + len(s.generated) - 1 for s in active] +
                             [s.prefilled for s in joining])
        last = torch.tensor([0] * len(active) + [s.upto - s.prefilled - 1 for s in joining])
        seqs = every = active + joining
        rows = torch.tensor([s.slot for s in every])
        pos = start[:, None] + torch.arange(width)
        if width > 1:
            pos.clamp_(max=self.context - 1)  # padding only: a prompt ends before the context does
        if joining:
            # The chunk can run out only inside the last prompt it takes (first come first served): that row's
            # part is then not its prompt's last, and gives no token.
            if joining[-1].upto < len(joining[-1].prompt_ids):
                seqs = every[:-1]
            for s in joining:
                s.prefilled = s.upto
            self.prefilling = [s for s in self.prefilling if s.prefilled < len(s.prompt_ids) and not s.cancelled]
        never, eos = self.lm.banned_ids, list(self.lm.eos_ids)
        banned = [never + eos if s.params.ignore_eos else never for s in seqs]
        # Rows that ask for nothing but a temperature are drawn by the native step itself, in the same call
        # without the GIL (sampling.py's native draw), so the worker takes the GIL back from the loops once a step.
        # A step with a row that gives no token draws after it (the native draw takes every row).
        plain = native is not None and len(seqs) == len(every) and all(s.params.plain for s in seqs)
        tokens = None
        self._send(native)
        if plain:
            native.draw_next(banned, [s.params.temperature for s in seqs], [s.generator for s in seqs])
        try:
            logits = self.lm.forward(ids, self.cache, rows, pos, last=last)
        finally:
            if plain:
                tokens = native.drawn()  # None when the step did not run natively after all
        if native is not None:
            wake(native.disarm())  # the step did not run natively after all: wake the loops now
        sampled = []
        if tokens is not None:
            sampled = [Sampled(token=t, logprob=0.0, top=[]) for t in tokens]
        elif seqs:
            if len(seqs) < len(every):
                logits = logits[:-1]
            sampled = sample_rows(logits, [s.params for s in seqs], banned=banned,
                                  prompt_ids=[s.prompt_ids for s in seqs], generated=[s.generated for s in seqs],
                                  generators=[s.generator for s in seqs], scratch=True)
        for seq, one in zip(seqs, sampled):
            self._accept(seq, one)

    def _accept(self, seq: Sequence, s: Sampled) -> None:
        """3. extend, apply stops and limits, emit; free the slot when done."""
        seq.generated.append(s.token)
        if s.token in self.lm.eos_ids:
            self._finish(seq, "stop")
            return
        seq.sampled.append(s)
        seq.text += self._detokenize(seq)
        seq.token_ends.append(len(seq.text))
        for stop in seq.stop:
            at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
            if at != -1:
                seq.text = seq.text[:at]
                self._finish(seq, "stop")
                return
        if len(seq.generated) >= seq.max_tokens or len(seq.prompt_ids) + len(seq.generated) >= self.context:
            self._finish(seq, "length")
            return
        # Hold back a tail that could still become a stop sequence.
        hold = max((k for stop in seq.stop for k in range(1, len(stop)) if seq.text.endswith(stop[:k])),
                   default=0) if seq.stop else 0
        self._flush(seq, len(seq.text) - hold)

    def _detokenize(self, seq: Sequence) -> str:
        """The text the newest token completes (as text-generation-inference does it): decode a short
        window of ids with and without the new ones, and take the difference once it does not end in
        U+FFFD (the decoder's mark for bytes of a character still incomplete). A model whose tokens are
        whole characters each (`token_pieces`, chargpt's) gives its token's text at once."""
        if self._pieces is not None:
            return self._pieces[seq.generated[-1]]
        ids = seq.generated
        before = self.lm.decode(ids[seq.prefix_offset:seq.read_offset])
        after = self.lm.decode(ids[seq.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return after[len(before):]
        return ""

    def _flush(self, seq: Sequence, upto: int, final: bool = False) -> None:
        if upto > seq.emitted or (final and seq.tokens_emitted < len(seq.sampled)):
            n = len(seq.sampled) if final else bisect.bisect_right(seq.token_ends, upto)
            self._post(seq, TextChunk(seq.text[seq.emitted:upto], seq.sampled[seq.tokens_emitted:n]))
            seq.emitted, seq.tokens_emitted = upto, max(seq.tokens_emitted, n)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._flush(seq, len(seq.text), final=True)
        completion = len(seq.generated)
        self._post(seq, Finished(reason, len(seq.prompt_ids), completion, seq.cached))
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free seq's slot, which keeps its tokens' keys and values for the owner's next prompt. For the Python
        paths the active sequence in the highest slot moves into it, keeping the active rows a run of slots
        (their steps attend over a view of the cache then, not a gathered copy), and its old slot holds its
        tokens so far; the native step takes any rows, and moving one (its keys and values, 1.2 MB for
        tang-poet) cost 0.33 ms, about every other step at 32 clients."""
        slot = seq.slot
        if not (0 <= slot < len(self.slots) and self.slots[slot] is seq):
            return
        self.slots[slot] = None
        self._hold(slot, seq)
        if self._leaves_holes():
            return
        last = max((i for i, s in enumerate(self.slots) if s is not None), default=-1)
        if last > slot:
            moving = self.slots[last]
            written = min(self.context, len(moving.prompt_ids) + len(moving.generated))
            self.cache.copy_rows(torch.tensor([last]), torch.tensor([slot]), written)
            self.slots[slot], self.slots[last], moving.slot = moving, None, slot
            self._held[slot] = None
            self._hold(last, moving)

    def _hold(self, slot: int, seq: Sequence) -> None:
        """Slot `slot` is free and its rows hold seq's tokens so far: its prompt, once prefilled (a first token
        was sampled from it), and every generated token but the last (each is written by the step it feeds)."""
        self._held[slot] = (seq.owner, seq.prompt_ids + seq.generated[:-1]) if seq.generated else None
        self._freed_at[slot] = next(self._frees)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share: compared a slice at a time (in C), halving the span, since a
    conversation's prompt is thousands of tokens and every free slot of its owner is looked at."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n  # a[:same] == b[:same], a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if a[:mid] == b[:mid]:
            same = mid
        else:
            differs = mid
    return same
