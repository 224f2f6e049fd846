"""What one decoding step touches in a KV cache: which rows, how many positions, which keys each
row may see. Shared by the one-token decoders (models/chargpt.py, families/hf_decoders.py) and the
transformers cache Atelier gives imported models (families/hf_causal_lm.py)."""

from __future__ import annotations

import torch

# What the native step's caches may hold (ATELIER_KV_CACHE_DTYPE): it writes keys and values rounded to either.
NATIVE_CACHE_DTYPES = (torch.float32, torch.float16)


def as_run(rows: list[int]) -> slice | None:
    """The rows as a slice when they are consecutive slots (the text engine keeps its active sequences
    so), for a view of the cache instead of a gathered copy; None otherwise."""
    run = slice(rows[0], rows[0] + len(rows))
    return run if rows == list(range(run.start, run.stop)) else None


def one_token_step(rows: torch.Tensor, pos: torch.Tensor) -> tuple[int, slice | None, torch.Tensor | None]:
    """(span, run, mask) for one new token per row at positions `pos` (B,): the keys to attend (up to
    span), the rows as a run (as_run), and a (B, 1, 1, span) mask of the keys each row may see, None when
    every row is at the same position (then all of them see every key up to span)."""
    at = pos.tolist()
    span = max(at) + 1
    mask = None if min(at) == span - 1 else (torch.arange(span) <= pos[:, None])[:, None, None, :]
    return span, as_run(rows.tolist()), mask


def prompt_tokens(ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, last: torch.Tensor | None):
    """(ids, rows, pos, wanted) of a prefill's (B, T) tokens for one native step, flattened: with `last`
    (B,), each row's tokens up to last[b] only (the padding after them is neither computed nor written to
    the cache) and `wanted` the flat index of each row's last token; without, every token, wanted None."""
    B, T = ids.shape
    if last is None:
        return ids.reshape(-1), rows.repeat_interleave(T), pos.reshape(-1), None
    keep = torch.arange(T) <= last[:, None]
    return ids[keep], rows[:, None].expand(B, T)[keep], pos[keep], torch.cumsum(last + 1, 0) - 1


def stepped(step, cache, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, last: torch.Tensor | None):
    """A forward's logits from a decoder's `step(ids, cache, rows, pos, wanted)`, one call for its (B, T)
    tokens: one token a row, or a prefill's flattened (prompt_tokens). (B, T, vocab); with `last` (B,),
    each row's token last[b] only, (B, vocab)."""
    B, T = ids.shape
    if T == 1:  # each row's only token is its last
        logits = step(ids[:, 0], cache, rows, pos[:, 0], None)
    else:
        flat_ids, flat_rows, flat_pos, wanted = prompt_tokens(ids, rows, pos, last)
        logits = step(flat_ids, cache, flat_rows, flat_pos, wanted)
    return logits if last is not None else logits.view(B, T, -1)
