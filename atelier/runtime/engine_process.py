"""Text engines in processes of their own (ATELIER_RUNTIME=process), as vLLM runs its engine core.

In one process the event loop (HTTP, SSE chunks, moderation, the database) and a text engine's
worker (sampling, detokenizing, stop strings) take turns on one GIL: at 32 streaming clients a
decoding step that takes 4 ms in process took 7-8 ms in the server, waiting for the loop. Here
each loaded text model's TextEngine runs in a child process (`python -m
atelier.runtime.engine_process`), which loads the version's unpacked folder through its family,
and the server keeps a proxy with the engine's `submit` and `close`:

  server                                            engine process
  ProcessTextEngine.submit ── {"op": "submit"} ──▶   TextEngine.submit
  the event loop's reader ──▶ request queues  ◀── one frame per step ──  TextEngine (deliver=…)

Frames are length-prefixed JSON over a Unix socket pair: the child sends every event of a step in
one frame, from its worker thread, with nothing else to wait for. The server reads them on the event
loop its requests run on (`add_reader`, as vLLM's asyncio output handler), straight into their
queues: a reader thread cost each frame a thread's wake-up, two hand-overs of the GIL and a wake-up of
the loop through its pipe. The child counts each frame on an eventfd, which the loop watches with the
child's pidfd (Linux; the socket elsewhere): see Channel for why not the socket. (Requests of another
loop, in tests, get theirs through OUTBOX.) A sequence the server cancels (its client left) is
cancelled in the child with the next frame that arrives. If the child dies, its requests end with
EngineClosed (a 503 to retry) and the proxy starts a new one; unloading the model stops it. The server
still loads the model itself for what routes do around generation (the tokenizer, the poetry
engine's constrained decoding), as with Ray Serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from atelier.runtime.errors import EngineClosed
from atelier.runtime.sampling import Sampled, SamplingParams
from atelier.runtime.text_engine import OUTBOX, PREFILL_CHUNK, WAKE, Finished, Sequence, TextChunk, TextEngine, prepare

log = logging.getLogger("atelier.runtime")

HEADER = struct.Struct("<I")  # a frame: its length, then that many bytes of JSON
LOAD_TIMEOUT_S = 300  # a child that neither loads its model nor fails in this long is stopped
RECEIVE_BYTES = 1 << 16


class Channel:
    """Frames of JSON over a connected socket; `send` may be called from any thread, and one reader at a
    time either waits for the next frame (`receive`) or takes those that have arrived (`receive_ready`).

    `signal`: an eventfd to count each frame sent on (the child's side). The server's loop then watches
    that eventfd and the child's pidfd (`watched`) rather than the socket: a socket's write wakes its
    reader as a "sync" wake-up, which Linux queues on the writer's CPU when that runs one task, and the
    engine's step was that task (see OUTBOX in runtime/text_engine.py)."""

    def __init__(self, sock: socket.socket, signal: int | None = None):
        self.sock = sock
        self.signal = signal
        self.watched: tuple[int, ...] = (sock.fileno(),)  # readable when frames, or the end, may be waiting
        self.counter: int | None = None  # the eventfd among them, cleared before each read (count_on)
        self.owned: tuple[int, ...] = ()  # descriptors closed with the channel
        self._lock = threading.Lock()
        self._pending = bytearray()  # bytes read past the last whole frame

    def count_on(self, counter: int, exited: int | None) -> None:
        """The server's side: the child counts its frames on eventfd `counter`; with the child's pidfd `exited`
        (Linux 5.3) the loop watches those two instead of the socket. Both are closed with the channel."""
        self.owned = (counter,) if exited is None else (counter, exited)
        if exited is not None:
            self.watched, self.counter = (counter, exited), counter

    def send(self, obj) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        with self._lock:
            self.sock.sendall(HEADER.pack(len(data)) + data)
            if self.signal is not None:
                try:
                    os.write(self.signal, WAKE)
                except OSError:
                    pass

    def receive(self):
        """The next frame, waiting for it; None once the other side has closed."""
        while (frame := self._next_frame()) is None:
            data = self.sock.recv(RECEIVE_BYTES)
            if not data:
                return None
            self._pending += data
        return frame

    def receive_ready(self) -> tuple[list, bool]:
        """The frames that have arrived, without waiting; and whether the other side has closed."""
        if self.counter is not None:  # cleared first: a frame sent after this read counts again
            try:
                os.read(self.counter, 8)
            except OSError:  # 0: nothing counted since the last read
                pass
        closed = False
        while True:
            try:
                data = self.sock.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # reset, or closed here
                closed = True
                break
            if not data:
                closed = True
                break
            self._pending += data
        frames = []
        while (frame := self._next_frame()) is not None:
            frames.append(frame)
        return frames, closed

    def _next_frame(self):
        if len(self._pending) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._pending)
        if len(self._pending) < HEADER.size + size:
            return None
        data = bytes(self._pending[HEADER.size:HEADER.size + size])
        del self._pending[:HEADER.size + size]
        return json.loads(data)

    def close(self) -> None:
        for closing in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close,
                        *(lambda fd=fd: os.close(fd) for fd in self.owned)):
            try:
                closing()
            except OSError:
                pass
        self.owned = ()


# -- events on the wire ------------------------------------------------------------------------------
def encode(sid: int, event) -> list:
    if isinstance(event, TextChunk):
        return [sid, "t", event.text, [[s.token, s.logprob, s.top] for s in event.tokens]]
    if isinstance(event, Finished):
        return [sid, "f", event.reason, event.prompt_tokens, event.completion_tokens, event.cached_tokens]
    if isinstance(event, EngineClosed):
        return [sid, "c", str(event)]
    return [sid, "e", f"{type(event).__name__}: {event}"]


def decode(item: list):
    kind = item[1]
    if kind == "t":
        return TextChunk(item[2], [Sampled(token, logprob, [tuple(t) for t in top]) for token, logprob, top in item[3]])
    if kind == "f":
        return Finished(item[2], item[3], item[4], item[5])
    if kind == "c":
        return EngineClosed(item[2])
    return RuntimeError(item[2])


# -- the server's side -------------------------------------------------------------------------------
class ProcessTextEngine:
    """TextEngine's `submit` and `close`, served by a TextEngine in a child process."""

    runtime = "process"  # GET /api/ps says where a loaded model runs

    def __init__(self, family: str, folder: Path, *, max_batch: int, threads: int, step_threads: int,
                 native: bool, context: int, kv_dtype: str = "float32", prefix_cache: bool = True,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.args = [sys.executable, "-m", "atelier.runtime.engine_process", family, str(folder), str(max_batch),
                     str(threads), str(step_threads), "1" if native else "0", kv_dtype, "1" if prefix_cache else "0",
                     str(prefill_chunk)]
        self.context = context
        self.cancelled = 0  # sequences dropped because their client left
        self._lock = threading.Lock()  # the live table, the channel, the reading loop, closing
        self._live: dict[int, Sequence] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._home: asyncio.AbstractEventLoop | None = None  # the loop reading the child's frames
        self._channel, self._proc = self._spawn()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _spawn(self) -> tuple[Channel, subprocess.Popen]:
        """Start a child and wait until it has loaded the model (OSError saying why when it cannot)."""
        ours, theirs = socket.socketpair()
        counter = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if hasattr(os, "eventfd") else None
        given = (theirs.fileno(),) + ((counter,) if counter is not None else ())
        try:
            proc = subprocess.Popen(self.args + [str(theirs.fileno()), str(-1 if counter is None else counter)],
                                    pass_fds=given, stdin=subprocess.DEVNULL)
        except BaseException:
            if counter is not None:
                os.close(counter)
            raise
        finally:
            theirs.close()
        channel = Channel(ours)
        if counter is not None:
            try:  # the child's end: the loop watches its pidfd for it, not the socket
                exited = os.pidfd_open(proc.pid)
            except (AttributeError, OSError):
                exited = None
            channel.count_on(counter, exited)
        ours.settimeout(LOAD_TIMEOUT_S)
        try:
            hello = channel.receive()
        except OSError:
            hello = None
        ours.settimeout(None)
        if not (hello and hello.get("ready")):
            channel.close()
            proc.kill()
            proc.wait()
            why = hello.get("error") if hello else f"it exited with status {proc.returncode}"
            raise OSError(f"the engine process could not load the model: {why}")
        self.kv_dtype = hello["kv_cache"]  # what the child's cache holds, as it says
        self.prefill_chunk = hello["prefill_chunk"]  # and the most prompt tokens it computes an iteration
        return channel, proc

    def submit(self, seq: Sequence) -> Sequence:
        prepare(seq, self.context)
        self._read_on(seq.loop)
        with self._lock:
            if self._closed:
                raise EngineClosed("the model was unloaded before this request ran; retry it")
            if self._channel is None:
                raise EngineClosed("the model's engine process is restarting; retry the request")
            sid = next(self._ids)
            self._live[sid] = seq
            message = {"op": "submit", "id": sid, "prompt_ids": list(seq.prompt_ids), "max_tokens": seq.max_tokens,
                       "stop": list(seq.stop), "seed": seq.seed, "params": dataclasses.asdict(seq.params),
                       "owner": seq.owner}
            try:
                self._channel.send(message)
            except OSError:
                del self._live[sid]
                raise EngineClosed("the model's engine process stopped; retry the request") from None
        return seq

    def close(self) -> None:
        """Stop the child; every waiting and running sequence ends with EngineClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channel, proc, home = self._channel, self._proc, self._home
        if channel is not None:
            try:
                channel.send({"op": "close"})  # the child fails its sequences, then exits
            except OSError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if channel is not None:
            self._take(channel, None)  # its last frames, whichever thread this is (the loop may be gone)
            self._unwatch(home, channel)
        self._fail_live("the model was unloaded while this request was generating; retry it")

    # -- reading, on the event loop ------------------------------------------------------------------
    def _read_on(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Read the child's frames on `loop` unless a loop that is still open does: the first to submit, and
        the next one once that has closed (a test's)."""
        if loop is None:
            return
        with self._lock:
            if self._home is not None and not self._home.is_closed():
                return
            self._home, channel = loop, self._channel
        if channel is not None:
            self._on_loop(loop, self._watch, loop, channel)

    def _watch(self, loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
        with self._lock:
            if channel is not self._channel or self._closed:
                return
        for fd in channel.watched:
            loop.add_reader(fd, self._readable, loop, channel)

    def _unwatch(self, loop: asyncio.AbstractEventLoop | None, channel: Channel) -> None:
        """Stop reading `channel` on `loop`, then close it (a closed socket must leave the selector first)."""
        def stop():
            self._stop_reading(loop, channel)
            channel.close()

        if loop is None or loop.is_closed() or not self._on_loop(loop, stop):
            channel.close()

    @staticmethod
    def _on_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
        """Run fn(*args) in `loop`'s thread: now if this is it, else soon; False if the loop has closed."""
        try:
            if asyncio.get_running_loop() is loop:
                fn(*args)
                return True
        except RuntimeError:
            pass
        try:
            loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:
            return False

    @staticmethod
    def _stop_reading(loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
        for fd in channel.watched:
            try:
                loop.remove_reader(fd)
            except (ValueError, OSError):  # closed already
                pass

    def _readable(self, loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
        if self._take(channel, loop):
            return
        self._stop_reading(loop, channel)
        with self._lock:
            gone = channel is self._channel and not self._closed
        if gone:  # the child died: restarting waits for it and loads a model, so not on the loop
            threading.Thread(target=self._restart, args=(channel,), name="engine-process-restart",
                             daemon=True).start()

    def _take(self, channel: Channel, loop: asyncio.AbstractEventLoop | None) -> bool:
        """Hand the frames that have arrived to their requests (those of `loop`, the one running this, into
        their queues; others through OUTBOX); cancel in the child what the server cancelled. False once the
        child has closed its end."""
        with self._lock:
            try:
                frames, closed = channel.receive_ready()
            except ValueError:  # not JSON: a child gone wrong
                frames, closed = [], True
            here, posts, cancels = [], [], []
            for frame in frames:
                for item in frame:
                    seq = self._live.get(item[0])
                    if seq is None:
                        continue
                    if item[1] != "t":
                        del self._live[item[0]]
                    event = (seq.index, decode(item))
                    if seq.loop is loop:
                        here.append((seq.events, event))
                    else:
                        posts.append((seq.loop, seq.events, event))
            if frames:
                for sid, seq in list(self._live.items()):
                    if seq.cancelled:
                        cancels.append(sid)
                        del self._live[sid]
        for queue, event in here:
            queue.put_nowait(event)
        if cancels:
            self.cancelled += len(cancels)
            try:
                channel.send({"op": "cancel", "ids": cancels})
            except OSError:
                pass
        gone = OUTBOX.send(posts) if posts else set()
        if gone:
            with self._lock:
                for seq in self._live.values():
                    if seq.loop in gone:  # nobody is left to read: cancelled with the next frame
                        seq.cancel()
        return not closed

    def _restart(self, channel: Channel) -> None:
        """The child has gone: fail its requests, and start another unless the engine is closing."""
        code = self._proc.wait()
        with self._lock:
            if self._closed or channel is not self._channel:
                return
            self._channel = None
        channel.close()
        log.error("the engine process for %s exited (status %s); starting another", Path(self.args[4]).name, code)
        self._fail_live("the model's engine process stopped while this request was generating; retry it")
        try:
            channel, proc = self._spawn()
        except OSError as e:
            log.error("%s", e)
            with self._lock:
                self._closed = True
            return
        with self._lock:
            closing = self._closed  # unloaded while the new child was loading: it goes too
            if not closing:
                self._channel, self._proc = channel, proc
            home = self._home
        if closing:
            channel.close()  # the child reads the end of its input and exits
            proc.wait()
        elif home is not None and not home.is_closed():
            self._on_loop(home, self._watch, home, channel)

    def _fail_live(self, why: str) -> None:
        with self._lock:
            live, self._live = self._live, {}
        OUTBOX.send([(s.loop, s.events, (s.index, EngineClosed(why))) for s in live.values()])


class ProcessRuntime:
    """ATELIER_RUNTIME=process: text engines in child processes; images stay in the server."""

    kinds = ("text",)

    def __init__(self, settings):
        from atelier.config import inference_threads, step_threads

        self.max_batch, self.threads, self.native = settings.max_batch, inference_threads(settings), settings.native
        self.step_threads, self.kv_dtype = step_threads(settings), settings.kv_cache_dtype
        self.prefix_cache, self.prefill_chunk = settings.prefix_cache, settings.prefill_chunk

    def engine(self, kind: str, family: str, folder: Path, servable) -> ProcessTextEngine:
        return ProcessTextEngine(family, folder, max_batch=self.max_batch, threads=self.threads,
                                 step_threads=self.step_threads, native=self.native, context=servable.context,
                                 kv_dtype=self.kv_dtype, prefix_cache=self.prefix_cache,
                                 prefill_chunk=self.prefill_chunk)

    def close(self) -> None:
        pass  # each engine stops its own child when its model is unloaded


# -- the child's side ----------------------------------------------------------------------------------
def serve(channel: Channel, engine_for) -> None:
    """Read submissions and cancellations until the server closes the channel or says close."""
    live: dict[int, Sequence] = {}

    def deliver(events: list) -> None:  # from the engine's worker: one frame per step
        frame = []
        for seq, event in events:
            frame.append(encode(seq.index, event))
            if not isinstance(event, TextChunk):
                live.pop(seq.index, None)
        try:
            channel.send(frame)
        except OSError:
            pass  # the server has gone: the read below ends

    engine: TextEngine = engine_for(deliver)
    channel.send({"ready": True, "kv_cache": engine.kv_dtype,  # what the server's GET /api/ps says
                  "prefill_chunk": engine.prefill_chunk})
    try:
        while (message := channel.receive()) is not None and message["op"] != "close":
            if message["op"] == "cancel":
                for sid in message["ids"]:
                    seq = live.pop(sid, None)
                    if seq is not None:
                        seq.cancel()
                continue
            seq = Sequence(index=message["id"], prompt_ids=message["prompt_ids"],
                           params=SamplingParams(**message["params"]), max_tokens=message["max_tokens"],
                           stop=message["stop"], seed=message["seed"], loop=None, events=None, owner=message["owner"])
            live[seq.index] = seq
            try:
                engine.submit(seq)
            except (ValueError, EngineClosed) as e:
                live.pop(seq.index, None)
                deliver([(seq, e)])
    finally:
        engine.close()


def main(argv: list[str]) -> int:
    (family, folder, max_batch, threads, step_threads, native_on, kv_dtype, prefix_cache, prefill_chunk, fd,
     counter) = argv
    channel = Channel(socket.socket(fileno=int(fd)), signal=None if counter == "-1" else int(counter))
    try:
        import torch

        from atelier.common import native
        from atelier.families import FAMILIES

        torch.set_num_threads(int(threads))
        native.use(native_on == "1", int(step_threads))
        lm = FAMILIES[family].load(Path(folder))
        # What is loaded stays: the collector need not walk it again, and collects young objects less
        # often (a step makes a few hundred of them; at 32 rows a collection took about a step in 15).
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
    except Exception as e:  # noqa: BLE001 — said to the server, which answers the request with a 503
        channel.send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    serve(channel, lambda deliver: TextEngine(lm, int(max_batch), deliver=deliver, kv_dtype=kv_dtype,
                                              prefix_cache=prefix_cache == "1", prefill_chunk=int(prefill_chunk)))
    channel.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
