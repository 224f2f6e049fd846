"""The KV cache Atelier gives a transformers causal LM (families/hf_causal_lm.py), in transformers'
own Cache interface: one row per sequence slot of the text engine, each row at its own positions.

A module of its own so that transformers (half a second to import) is imported when an imported
model first loads, not when the server starts.
"""

from __future__ import annotations

import logging
import math
import mmap

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger(__name__)


def reserve(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of `shape` in memory the OS commits a page at a time, as it is first written (an anonymous
    mapping; a page never written reads as zeros and holds none): a cache reserves its whole context at once
    and holds memory for the positions its rows have reached, each row its own. Allocating positions as rows
    reached them, doubling, copied the whole cache each time: a long prompt taking a 24 M-parameter model's 32
    slots to 1,024 positions held every stream up for 0.18 s, and 1.5 times the cache's memory meanwhile."""
    count = math.prod(shape)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        return torch.frombuffer(mmap.mmap(-1, max(1, count * dtype.itemsize), flags=flags), dtype=dtype,
                                count=count).view(shape)
    except OSError as e:  # a kernel that commits every mapped byte (vm.overcommit_memory=2), or too little room
        log.warning("KV cache of %.1f GB allocated whole (%s)", count * dtype.itemsize / 1e9, e)
        return torch.zeros(shape, dtype=dtype)


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values: (slots, kv_heads, length, head_dim)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "SlotCache"):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Every slot's buffers for the whole context, reserved (`reserve`): memory as positions are reached."""
        dtype = self.cache.dtype or key_states.dtype
        self.keys = reserve((self.cache.slots, key_states.shape[1], self.cache.length, key_states.shape[-1]), dtype)
        self.values = reserve((self.cache.slots, value_states.shape[1], self.cache.length, value_states.shape[-1]),
                              dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, pos = self.cache.rows, self.cache.pos  # (B,), (B, T)
        # 1. states (B, heads, T, dim) go to [row, :, position]
        self.keys[rows[:, None], :, pos] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[rows[:, None], :, pos] = value_states.transpose(1, 2).to(self.values.dtype)
        # 2. each row's buffer up to the furthest position any row has reached; the mask hides the
        #    positions after each query's own
        #    (a view when the rows are a run of consecutive slots, as the text engine keeps them)
        #    (and read back as the states' dtype, where the cache holds float16)
        seen, run, dtype = self.cache.seen, self.cache.run, key_states.dtype
        if run is not None:
            return self.keys[run, :, :seen].to(dtype), self.values[run, :, :seen].to(dtype)
        return self.keys[:, :, :seen][rows].to(dtype), self.values[:, :, :seen][rows].to(dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.seen, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.cache.length


class SlotCache(Cache):
    def __init__(self, layers: int, slots: int, length: int, dtype: torch.dtype | None = None):
        """`dtype`: what the buffers hold (float16: the text engine's kv_dtype, for a natively decoded model);
        None: the model's own states' dtype."""
        self.slots, self.length, self.dtype = slots, length, dtype
        self.rows: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.seen = 0  # positions attended to in this forward: 1 + the largest position written
        self.run: slice | None = None  # the rows as a slice, when they are consecutive slots
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Rows `dst` take the first `length` positions of rows `src` (a search forking its beams)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[dst, :, :length] = layer.keys[src, :, :length]
                layer.values[dst, :, :length] = layer.values[src, :, :length]


