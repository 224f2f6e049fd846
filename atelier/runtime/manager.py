"""The one runtime: every loaded model version (text, image, tabular, style), whatever its family.

A version is loaded on first use through its family (atelier/families/) and wrapped in the
engine its family asks for: continuous batching for text, micro-batching for images, none
for models called one request at a time. Like Ollama:
  1. at most `max_loaded` versions are held (ATELIER_MAX_LOADED_MODELS), and at most
     `max_memory` bytes of weights (ATELIER_MAX_MODEL_MEMORY); before loading past either,
     the least recently used version is unloaded (an idle one first)
  2. each request may say how long its model stays loaded once idle (`keep_alive`: "5m",
     30, 0 = unload right after the request, -1 = keep), default ATELIER_KEEP_ALIVE
  3. unloading closes the engine, which fails the requests still waiting or running on it
     with a clear error, and deletes the version's decrypted folder
Requests hold a model between `acquire` and `release`, so it is never unloaded for being
idle while in use (an operator's unload or a memory need can still take it).

What a loaded model is made of lives as long as it stays loaded, and so does what the server built at
start: both are kept out of the garbage collector's full passes (`settle_heap`). One pass over the
server's 280 k objects (torch, FastAPI, SQLAlchemy, the models) held the event loop for 160 ms, every
request in flight with it: the 170-210 ms TTFT p99 of some 32-client runs of benchmarks/serve.py.
"""

from __future__ import annotations

import gc
import logging
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from atelier.common.durations import parse_keep_alive
from atelier.families import FAMILIES, Family
from atelier.runtime.errors import ModelTooLarge, WrongTask
from atelier.runtime.image_engine import ImageEngine
from atelier.runtime.text_engine import PREFILL_CHUNK, TextEngine
from atelier.storage.blobs import BlobStore
from atelier.storage.db import Version
from atelier.storage.registry import version_folder

log = logging.getLogger("atelier.runtime")


def settle_heap() -> None:
    """Collect what is garbage now, then freeze the rest: Python's collector leaves frozen objects out of its
    passes (they are still freed by their reference counts). After the server starts and after each load."""
    gc.collect()
    gc.freeze()


def release_heap() -> None:
    """After an unload: give every frozen object back to the collector, so that reference cycles among what the
    unloaded model left behind are freed, then settle again."""
    gc.unfreeze()
    settle_heap()


CANNOT = {"text-generation": "cannot generate text", "image-generation": "cannot generate images",
          "style-transfer": "does not do style transfer; use model='style-transfer'",
          "classification": "does not predict rows; only classification and regression models do",
          "image-tagging": "does not tag images; use model='emoji-tagger'"}
@dataclass
class Loaded:
    """One loaded version: its servable (the family's model object) and the engine driving it."""

    name: str
    number: int
    family: Family
    task: str
    servable: object
    engine: TextEngine | ImageEngine | None
    folder: Path
    weight_bytes: int
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    expires_at: float | None = None  # None: stays until evicted
    in_use: int = 0  # requests holding it now
    lock: threading.Lock = field(default_factory=threading.Lock)  # "call" servables run one request at a time

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.number

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"

    def public(self) -> dict:
        """One row of GET /api/ps."""
        return {"model": self.ref, "name": self.name, "version": self.number, "family": self.family.name,
                "task": self.task, "engine": self.family.engine, "runtime": getattr(self.engine, "runtime", "local"),
                "size_bytes": self.weight_bytes,
                "loaded_at": int(self.loaded_at), "last_used": int(self.last_used), "in_use": self.in_use,
                "expires_at": None if self.expires_at is None else int(self.expires_at)} \
            | ({"decoding": self.servable.decoding} if hasattr(self.servable, "decoding") else {}) \
            | ({"kv_cache": self.engine.kv_dtype} if hasattr(self.engine, "kv_dtype") else {}) \
            | ({"prefill_chunk": self.engine.prefill_chunk} if hasattr(self.engine, "prefill_chunk") else {})


class ModelManager:
    def __init__(self, blobs: BlobStore, cache_root: Path, *, max_loaded: int = 3, max_memory: int | None = None,
                 keep_alive: str | float = "5m", max_batch: int = 16, kv_cache_dtype: str = "float32",
                 prefix_cache: bool = True, prefill_chunk: int = PREFILL_CHUNK, image_max_batch: int = 16,
                 image_wait_ms: float = 10.0,
                 image_threads: int = 1, remote=None):
        self.blobs, self.cache_root = blobs, Path(cache_root)
        # a RayRuntime (runtime/ray_serve.py: text and image engines on Ray Serve) or a ProcessRuntime
        # (runtime/engine_process.py: text engines in child processes); None: every engine in this process
        self.remote = remote
        self.max_loaded, self.max_memory = max_loaded, max_memory
        self.default_keep_alive = parse_keep_alive(keep_alive)
        self.max_batch, self.image_max_batch, self.image_wait_ms = max_batch, image_max_batch, image_wait_ms
        self.kv_cache_dtype, self.prefix_cache, self.prefill_chunk = kv_cache_dtype, prefix_cache, prefill_chunk
        self.image_threads = image_threads
        self._loaded: OrderedDict[tuple[str, int], Loaded] = OrderedDict()
        self._loading: dict[tuple[str, int], threading.Event] = {}  # versions being loaded, by one request each
        self._incoming = 0  # bytes of weights being loaded now
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.evictions = 0
        self._reaper = threading.Thread(target=self._reap, name="model-reaper", daemon=True)
        self._reaper.start()

    # -- requests ------------------------------------------------------------------------
    def acquire(self, version: Version, *, tasks: tuple[str, ...] | None = None) -> Loaded:
        """The version loaded and held for one request; pair with `release`.

        `tasks` (e.g. ("text-generation",)) are what the route serves: WrongTask if the version
        does something else; OSError/ValueError if its files cannot be loaded; ModelTooLarge if its
        weights exceed the memory budget on their own.
        """
        family = self._family(version, tasks)
        key = (version.model.name, version.number)
        while True:
            with self._lock:
                loaded = self._hold(key)
                if loaded is not None:
                    return loaded
                loading = self._loading.get(key)
                if loading is None:  # this request loads it; others for the same version wait for it
                    loading = self._loading[key] = threading.Event()
                    break
            loading.wait()  # then look again: loaded, or this request tries itself after a failure
        try:
            return self._load(version, family)
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()

    def acquire_loaded(self, version: Version, *, tasks: tuple[str, ...] | None = None) -> Loaded | None:
        """`acquire` when the version is loaded already (it never waits: the event loop may call it);
        None when it is not, and then `acquire` loads it."""
        self._family(version, tasks)
        if not self._lock.acquire(blocking=False):  # held by an unload or a load's bookkeeping: take the slow way
            return None
        try:
            return self._hold((version.model.name, version.number))
        finally:
            self._lock.release()

    def _family(self, version: Version, tasks: tuple[str, ...] | None) -> Family:
        family = FAMILIES.get(version.model.family)
        if family is None or family.engine is None:
            raise WrongTask(f"model {version.model.name!r} is a {version.model.family} model; it is not served "
                            "on its own")
        if tasks is not None and version.model.task not in tasks:
            can_not = CANNOT.get(tasks[0], f"cannot do {' or '.join(tasks)}")
            raise WrongTask(f"model {version.model.name!r} (a {family.name} model, {version.model.task}) {can_not}")
        return family

    def _hold(self, key: tuple[str, int]) -> Loaded | None:
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            loaded.in_use += 1
            loaded.last_used = time.time()
        return loaded

    def release(self, loaded: Loaded, keep_alive=None) -> None:
        """The request is done with it: start its keep-alive clock (unload now if it is 0)."""
        seconds = self.default_keep_alive if keep_alive is None else parse_keep_alive(keep_alive)
        with self._lock:
            loaded.in_use = max(0, loaded.in_use - 1)
            loaded.last_used = time.time()
            loaded.expires_at = None if seconds is None else loaded.last_used + seconds
            if loaded.in_use == 0 and seconds == 0:
                self._unload(loaded, "keep_alive=0")

    # -- operators ------------------------------------------------------------------------
    def unload(self, name: str, number: int) -> bool:
        """Unload a version now (its running requests fail with EngineClosed); False if it was not loaded."""
        with self._lock:
            loaded = self._loaded.get((name, number))
            if loaded is None:
                return False
            self._unload(loaded, "unloaded by request")
            return True

    def ps(self) -> list[dict]:
        """What is loaded, most recently used first."""
        with self._lock:
            return [m.public() for m in reversed(self._loaded.values())]

    def get_loaded(self, name: str, number: int) -> Loaded | None:
        return self._loaded.get((name, number))

    def loaded(self) -> list[str]:
        return [m.ref for m in self._loaded.values()]

    def memory(self) -> int:
        return sum(m.weight_bytes for m in self._loaded.values())

    def close(self) -> None:
        """Unload everything and delete every decrypted folder (server shutdown)."""
        self._stop.set()
        with self._lock:
            for m in list(self._loaded.values()):
                self._unload(m, "server stopping", settle=False)
        gc.unfreeze()  # nothing of this server is frozen any longer: what a process keeps after it is collected
        if self.remote is not None:
            self.remote.close()
        self.blobs.close()

    # -- inside ---------------------------------------------------------------------------
    def _load(self, version: Version, family: Family) -> Loaded:
        """Unpack, make room, load — outside the manager's lock, so that requests to models already
        loaded are not held up by a slow load (seconds for a big imported model)."""
        folder = version_folder(self.blobs, version, self.cache_root)
        weight = family.weight_bytes(folder)
        if self.max_memory is not None and weight > self.max_memory:
            self._remove_folder(folder)
            raise ModelTooLarge(f"model {version.model.name}@{version.number} holds {weight} bytes of weights; "
                                f"ATELIER_MAX_MODEL_MEMORY is {self.max_memory}")
        with self._lock:
            self._make_room(weight)
            self._incoming += weight
        try:
            servable = family.load(folder)
        except Exception:
            self._remove_folder(folder)
            raise
        finally:
            with self._lock:
                self._incoming -= weight
        if self.remote is not None and family.engine in self.remote.kinds:
            engine = self.remote.engine(family.engine, family.name, folder, servable)
        elif family.engine == "text":
            engine = TextEngine(servable, self.max_batch, kv_dtype=self.kv_cache_dtype, prefix_cache=self.prefix_cache,
                                prefill_chunk=self.prefill_chunk)
        elif family.engine == "image":
            engine = ImageEngine(servable, max_batch=self.image_max_batch, max_wait_ms=self.image_wait_ms,
                                 threads=self.image_threads)
        else:
            engine = None
        loaded = Loaded(version.model.name, version.number, family, version.model.task, servable, engine, folder,
                        weight, in_use=1)  # held for the request that loaded it
        with self._lock:
            self._loaded[loaded.key] = loaded
        settle_heap()
        log.info("loaded %s (%s, %d bytes of weights)", loaded.ref, family.name, weight)
        return loaded

    def _make_room(self, incoming: int) -> None:
        """1. Unload least recently used versions (idle ones first) until one more fits."""
        def over() -> bool:  # versions being loaded by other requests count as loaded
            return len(self._loaded) + len(self._loading) - 1 >= self.max_loaded or (
                self.max_memory is not None and self.memory() + self._incoming + incoming > self.max_memory)

        while self._loaded and over():
            idle = [m for m in self._loaded.values() if m.in_use == 0]
            victim = idle[0] if idle else next(iter(self._loaded.values()))
            self.evictions += 1
            self._unload(victim, "evicted to make room")

    def _unload(self, loaded: Loaded, why: str, settle: bool = True) -> None:
        """3. Close the engine (failing its requests), forget the model, delete its decrypted files, and free
        what it was made of (`release_heap`; not when the server stops: `close` lets the collector have it)."""
        if self._loaded.get(loaded.key) is loaded:
            del self._loaded[loaded.key]
        if loaded.engine is not None:
            loaded.engine.close()
        self._remove_folder(loaded.folder)
        if settle:
            release_heap()
        log.info("unloaded %s (%s)", loaded.ref, why)

    def _remove_folder(self, folder: Path) -> None:
        if self.blobs.encrypted:  # plaintext weights never outlive their use
            shutil.rmtree(folder, ignore_errors=True)

    def _reap(self) -> None:
        """2. Unload idle versions whose keep-alive has run out."""
        while not self._stop.wait(0.5):
            now = time.time()
            with self._lock:
                for m in list(self._loaded.values()):
                    if m.in_use == 0 and m.expires_at is not None and now >= m.expires_at:
                        self._unload(m, "keep_alive expired")
