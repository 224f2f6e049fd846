"""Loading and unloading model versions; one engine per loaded version.

A version is loaded on first use (from its files in the blob store) and kept until more
than `max_loaded` versions are loaded, then the least recently used one is closed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from atelier.models import chargpt
from atelier.storage.db import Version
from atelier.storage.blobs import BlobStore
from atelier.storage.registry import version_folder
from atelier.runtime.text_engine import TextEngine

TEXT_FAMILIES = {"chargpt"}


class LoadedModel:
    def __init__(self, version: Version, model, tokenizer, engine: TextEngine):
        self.key = (version.model.name, version.number)
        self.ref = f"{version.model.name}@{version.number}"
        self.model, self.tokenizer, self.engine = model, tokenizer, engine


class ModelManager:
    def __init__(self, blobs: BlobStore, cache_root: Path, max_batch: int = 16, max_loaded: int = 4):
        self.blobs, self.cache_root = blobs, Path(cache_root)
        self.max_batch, self.max_loaded = max_batch, max_loaded
        self._loaded: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: Version) -> LoadedModel:
        key = (version.model.name, version.number)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            family = version.model.family
            if family not in TEXT_FAMILIES:
                raise ValueError(f"model {version.model.name!r} is a {family} model; it cannot generate text")
            folder = version_folder(self.blobs, version, self.cache_root)
            model, tok = chargpt.from_pretrained(folder)
            loaded = LoadedModel(version, model, tok, TextEngine(model, tok, self.max_batch))
            self._loaded[key] = loaded
            while len(self._loaded) > self.max_loaded:
                _, old = self._loaded.popitem(last=False)
                old.engine.close()
            return loaded

    def get_image(self, version: Version, *, max_batch: int = 16, max_wait_ms: float = 10.0):
        """An image model (ddpm, dcgan) with its micro-batching engine; shares the LRU with text models."""
        from atelier.runtime.image_engine import load_image_model

        key = (version.model.name, version.number)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            folder = version_folder(self.blobs, version, self.cache_root)
            loaded = load_image_model(version, folder, max_batch=max_batch, max_wait_ms=max_wait_ms)
            self._loaded[key] = loaded
            while len(self._loaded) > self.max_loaded:
                _, old = self._loaded.popitem(last=False)
                old.engine.close()
            return loaded

    def get_loaded(self, name: str, number: int) -> LoadedModel | None:
        return self._loaded.get((name, number))

    def loaded(self) -> list[str]:
        return [m.ref for m in self._loaded.values()]

    def close(self) -> None:
        with self._lock:
            for m in self._loaded.values():
                m.engine.close()
            self._loaded.clear()
