"""chargpt: a GPT-2-style decoder over characters.

Read top to bottom: config → attention (with a key/value cache) → MLP → block → model →
the one-token decoder that serving uses → saving and loading in Hugging Face GPT-2 layout →
a plain sampling loop for offline use.

The weights are saved exactly as `transformers.GPT2LMHeadModel` names and shapes them
(`transformer.h.0.attn.c_attn.weight` is (n_embd, 3 * n_embd), a "Conv1D", i.e. the
transpose of our `nn.Linear`), so `GPT2LMHeadModel.from_pretrained(dir)` loads a saved
version and gives the same logits. The serving runtime (continuous batching, sampling
parameters) lives in `atelier/runtime/`; this file only knows how to compute logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from atelier.common.native import kernels, step_parts
from atelier.common.slots import NATIVE_CACHE_DTYPES, one_token_step, stepped
from atelier.models import int8
from atelier.models.tokenizer import CharTokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class ChargptConfig:
    vocab_size: int = 8000
    n_positions: int = 192  # context length in characters
    n_embd: int = 256
    n_layer: int = 6
    n_head: int = 8
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None  # the MLP's width; None: GPT-2's 4 × n_embd (a pruned model has fewer)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def n_params(self) -> int:
        d, L, f = self.n_embd, self.n_layer, self.inner
        per_block = 4 * d * d + 2 * d * f + f + 9 * d  # attn 4d² + mlp 2df, biases and two LayerNorms
        return self.vocab_size * d + self.n_positions * d + L * per_block + 2 * d


class KVCache:
    """Key/value buffers for `batch` sequences of up to `n_positions` tokens each.

    Shapes: k, v are (n_layer, batch, n_head, n_positions, head_dim), float32 or float16 (ATELIER_KV_CACHE_DTYPE:
    every path writes keys and values rounded to it and attends over them as floats). A sequence's token
    at position p is stored at index p of its row, so attention masks keys by position.
    Both are views of one buffer `kv` (n_layer, 2, …), so that the decoder writes a token's
    keys and values with one operation.
    """

    def __init__(self, config: ChargptConfig, batch: int, dtype=torch.float32):
        shape = (config.n_layer, 2, batch, config.n_head, config.n_positions, config.n_embd // config.n_head)
        self.kv = torch.zeros(shape, dtype=dtype)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]
        self.layer_keys, self.layer_values = list(self.k), list(self.v)  # per layer, for the native step

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Rows `dst` take the first `length` positions of rows `src` (a search forking its beams)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ChargptConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v projections at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, rows=None, pos=None):
        B, T, C = x.shape  # batch, time, channels
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            # Training and plain prefill: every sequence starts at position 0.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            # Write the new keys/values at their positions in the rows' cache slots, then
            # attend over everything up to each query's own position.
            r = rows[:, None]  # (B, 1) broadcasts against pos (B, T)
            cache.k[layer][r, :, pos] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[layer][r, :, pos] = v.transpose(1, 2).to(cache.v.dtype)
            span = int(pos.max()) + 1
            keys = cache.k[layer][rows, :, :span].to(q.dtype)  # (B, nh, span, hs)
            values = cache.v[layer][rows, :, :span].to(q.dtype)
            mask = torch.arange(span)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, span)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ChargptConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner)
        self.c_proj = nn.Linear(config.inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ChargptConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, layer=0, cache=None, rows=None, pos=None):
        x = x + self.attn(self.ln_1(x), layer, cache, rows, pos)
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    def __init__(self, config: ChargptConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def new_cache(self, batch: int) -> KVCache:
        """A KV cache with `batch` rows for this model (the poetry search forks rows of it)."""
        return KVCache(self.config, batch)

    def train(self, mode: bool = True):
        self._decoder = None  # weights about to change: the decoder's copies would go stale
        return super().train(mode)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache: KVCache | None = None, rows=None, pos=None, last=None):
        """Logits (B, T, vocab) for tokens idx (B, T); with targets, also the mean loss.

        Without a cache every row starts at position 0 (training). With a cache, `rows`
        (B,) names each sequence's cache slot and `pos` (B, T) its tokens' positions, so
        rows of different lengths decode together (continuous batching). With `last` (B,),
        only the logits (B, vocab) of each row's token last[b] (a prefill's next token): the
        head runs for those tokens alone.
        """
        B, T = idx.shape
        if cache is not None and targets is None and not torch.is_grad_enabled():
            if T == 1 or (pos is not None and Decoder.native(cache) is not None):  # one token a row, or native prefill
                return stepped(self.decoder().step, cache, idx, rows, pos, last), None
        if pos is None:
            pos = torch.arange(T).expand(B, T)
        if int(pos.max()) >= self.config.n_positions:
            raise ValueError(f"position {int(pos.max())} is past the context of {self.config.n_positions}")
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, i, cache, rows, pos)
        if last is not None:
            x = x[torch.arange(B), last]
        x = self.ln_f(x)
        logits = x @ self.wte.weight.T  # the LM head is tied to the token embedding
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def decoder(self) -> Decoder:
        """The one-token decoder over the current weights (rebuilt when they change in place)."""
        decoder = getattr(self, "_decoder", None)
        if decoder is None or decoder.version != decoder.weights_version():
            decoder = self._decoder = Decoder(self)
        return decoder

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, eos_id: int | None = None):
        """Sample a continuation of idx (1, T), the nanoGPT way, with a KV cache.

        >>> model.generate(torch.tensor([tok.encode("春眠不觉晓，")]), 20, temperature=0.8)
        """
        T = idx.shape[1]
        n = min(max_new_tokens, self.config.n_positions - T)
        cache = KVCache(self.config, 1)
        rows = torch.zeros(1, dtype=torch.long)
        logits, _ = self(idx, cache=cache, rows=rows, pos=torch.arange(T)[None])
        out = idx
        for step in range(n):
            last = logits[:, -1, :] / max(temperature, 1e-5)
            if top_k is not None:
                v, _ = torch.topk(last, min(top_k, last.size(-1)))
                last[last < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(last, dim=-1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            if eos_id is not None and int(nxt) == eos_id:
                break
            if step + 1 < n:
                logits, _ = self(nxt, cache=cache, rows=rows, pos=torch.tensor([[T + step]]))
        return out


# -- the one-token decoder ------------------------------------------------------------------


class Decoder:
    """CharGPT.forward with a cache, without gradients, in fewer operations: one new token for each of B rows
    (and, with the native kernels, whole prompts).

    Decoding a model this small on a CPU is bound by the cost of each tensor operation and by
    reading the weights, not by arithmetic (benchmarks/text_decode.py). Where the native kernels are
    built (atelier/common/native/), the whole step is one call to their `gpt2_step`, which runs the
    loop below in C++ without the GIL and attends in place over the cache; a version loaded from int8
    (models/int8.py) gives it the int8 matrices for steps of up to INT8_ROWS rows. Otherwise the decoder
      - keeps each matrix as the (in, out) copy that addmm reads fastest (one more copy of the
        weights: 16 MB for tang-poet), adding the biases inside addmm,
      - walks a flat list of tensors instead of the module tree,
      - writes a token's keys and values into the cache with one index_put per layer,
      - attends over a view of the cache when the rows are a run of consecutive slots (the text
        engine keeps its active sequences so), gathering a copy only otherwise, and
      - masks keys only when the rows are at different positions.
    The arithmetic is the module path's: the two agree to float rounding (tests/test_model.py).
    """

    def __init__(self, model: CharGPT):
        c = model.config
        self.n_head, self.eps = c.n_head, c.layer_norm_epsilon
        self.n_positions = c.n_positions
        self.params = list(model.parameters())
        self.version = self.weights_version()
        with torch.no_grad():
            t = lambda w: w.detach().T.contiguous()  # noqa: E731 — (out, in) → (in, out)
            self.layers = [(b.ln_1.weight, b.ln_1.bias, t(b.attn.c_attn.weight), b.attn.c_attn.bias,
                            t(b.attn.c_proj.weight), b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                            t(b.mlp.c_fc.weight), b.mlp.c_fc.bias, t(b.mlp.c_proj.weight), b.mlp.c_proj.bias)
                           for b in model.h]
            self.wte, self.wpe = model.wte.weight.detach(), model.wpe.weight.detach()
            self.ln_f = (model.ln_f.weight, model.ln_f.bias)
            self.head = t(model.wte.weight)  # tied to the token embedding
        flat = [w for layer in self.layers for w in layer]
        self.native_args = (self.wte, None, self.wpe, None, flat, [], *self.ln_f, self.head, None, None, False)
        self.native_int8_args = self._int8_args(model, flat)

    def _int8_args(self, model: CharGPT, flat: list[torch.Tensor]) -> tuple | None:
        """For a quantized version (loaded from int8, weights not changed since), the native step's weights
        as its int8 matrices with their per-row scales; None otherwise."""
        tensors = getattr(model, "int8_tensors", None) if getattr(model, "int8_version", -1) == self.version else None
        if tensors is None:
            return None

        def q8(name: str, dense: torch.Tensor) -> tuple:
            return (tensors[name], tensors[name + int8.SCALE]) if name + int8.SCALE in tensors else (dense, None)

        weights, scales = [], []
        for i, w in enumerate(flat):
            w, scale = q8(f"transformer.h.{i // 12}.{_MATRICES[i % 12]}", w) if i % 12 in _MATRICES else (w, None)
            weights.append(w)
            scales.append(scale)
        wte, wpe = q8("transformer.wte.weight", self.wte), q8("transformer.wpe.weight", self.wpe)
        head = wte if wte[1] is not None else (self.head, None)  # the head is tied to the token embedding
        return (*wte, *wpe, weights, scales, *self.ln_f, *head, None, head[1] is not None)

    @staticmethod
    def native(cache: KVCache):
        """The native kernels when they can step on this cache (built, on, and a float32 or float16 cache); None
        otherwise.
        Only they take a prefill's many tokens per row: the Python path below takes one."""
        native = kernels()
        return native if native is not None and cache.kv.dtype in NATIVE_CACHE_DTYPES else None

    def weights_version(self) -> int:
        """Grows whenever a weight is written in place (an optimizer step, load_state_dict)."""
        return sum(p._version for p in self.params)

    def step(self, ids: torch.Tensor, cache: KVCache, rows: torch.Tensor, pos: torch.Tensor,
             wanted: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) for token ids (B,) of cache rows `rows` (B,) at positions `pos` (B,): one token
        per row, or (the native step only) a prefill's tokens, each row's in order; with `wanted` (indices
        into the B tokens, ascending), those tokens' logits only."""
        native = self.native(cache)
        if native is not None:
            few = self.native_int8_args is not None and ids.shape[0] <= INT8_ROWS
            return native.gpt2_step(ids, pos, rows, cache.layer_keys, cache.layer_values,
                                    *(self.native_int8_args if few else self.native_args), self.n_head, self.eps, 0.0,
                                    "tanh", wanted, step_parts(ids.shape[0]))
        B, nh = ids.shape[0], self.n_head
        span, run, mask = one_token_step(rows, pos)
        if span > self.n_positions:
            raise ValueError(f"position {span - 1} is past the context of {self.n_positions}")
        x = self.wte[ids] + self.wpe[pos]  # (B, C)
        C = x.shape[1]
        # torch.layer_norm and torch._C._nn.gelu: F.*'s wrappers cost as much as the operations here
        norm, gelu, eps, shape, hs = torch.layer_norm, torch._C._nn.gelu, self.eps, (C,), C // nh
        for layer, (w1, b1, wqkv, bqkv, wo, bo, w2, b2, wfc, bfc, wp, bp) in enumerate(self.layers):
            qkv = torch.addmm(bqkv, norm(x, shape, w1, b1, eps), wqkv).view(B, 3, nh, hs)
            kv = cache.kv[layer]  # (2, slots, nh, positions, hs)
            kv[:, rows, :, pos] = qkv[:, 1:].to(kv.dtype)
            kv = kv[:, run, :, :span] if run is not None else kv[:, rows, :, :span]
            kv = kv.to(x.dtype)  # a float16 cache is read back as the floats it holds (no copy for float32)
            y = F.scaled_dot_product_attention(qkv[:, 0, :, None], kv[0], kv[1], attn_mask=mask)
            x = torch.addmm(x + bo, y.view(B, C), wo)
            h = gelu(torch.addmm(bfc, norm(x, shape, w2, b2, eps), wfc), approximate="tanh")
            x = torch.addmm(x + bp, h, wp)
        if wanted is not None:
            x = x[wanted]
        return norm(x, shape, *self.ln_f, eps) @ self.head


# A quantized version decodes up to this many tokens a step with its int8 matrices: a quarter of the bytes
# to read, 1.9× faster at 1 row; from 8 rows MKL's fp32 GEMM on the dequantized copies is faster than the
# native int8 loops (benchmarks/compress_eval.py).
INT8_ROWS = 4
# The matrices of a block's 12 decoder tensors, under their Hugging Face names (for the int8 ones).
_MATRICES = {2: "attn.c_attn.weight", 4: "attn.c_proj.weight", 8: "mlp.c_fc.weight", 10: "mlp.c_proj.weight"}


# -- saving and loading in Hugging Face GPT-2 layout ------------------------------------

_CONV1D = tuple(_MATRICES.values())


def hf_state_dict(model: CharGPT) -> dict[str, torch.Tensor]:
    """Our parameters under GPT2LMHeadModel's names, Conv1D weights transposed."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(_CONV1D):
            t = t.T
        out["transformer." + name] = t.detach().contiguous().clone()
    return out


def hf_config(config: ChargptConfig, tokenizer: CharTokenizer | None = None) -> dict:
    d = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "atelier_family": "chargpt",
        "atelier_config": asdict(config),
    }
    if tokenizer is not None:
        d.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return d


def save_pretrained(model: CharGPT, tokenizer: CharTokenizer, directory: str | Path) -> Path:
    """Write config.json, model.safetensors and tokenizer.json into directory."""
    from atelier.common.files import atomic_write_bytes, atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    # transformers expects the tied head to be absent (it re-ties it) and "format": "pt".
    import safetensors.torch

    atomic_write_bytes(directory / WEIGHTS_FILE, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, hf_config(model.config, tokenizer))
    tokenizer.save(directory / TOKENIZER_FILE)
    return directory


def config_from_hf(d: dict) -> ChargptConfig:
    names = {f.name for f in fields(ChargptConfig)}
    if "atelier_config" in d:
        return ChargptConfig(**{k: v for k, v in d["atelier_config"].items() if k in names})
    return ChargptConfig(vocab_size=d["vocab_size"], n_positions=d["n_positions"], n_embd=d["n_embd"],
                         n_layer=d["n_layer"], n_head=d["n_head"], n_inner=d.get("n_inner"),
                         layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5))


def load_state(model: CharGPT, tensors: dict[str, torch.Tensor]) -> CharGPT:
    ours = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight":
            continue  # tied to wte
        ours[name] = t.T if name.endswith(_CONV1D) else t
    model.load_state_dict(ours, strict=True)
    return model


def from_pretrained(directory: str | Path, tokenizer=CharTokenizer) -> tuple[CharGPT, CharTokenizer]:
    """Rebuild a model from config.json + model.safetensors (never pickle), with its tokenizer.json read
    by `tokenizer` (characters by default; ABC tokens for a tune model)."""
    directory = Path(directory)
    config = config_from_hf(json.loads((directory / CONFIG_FILE).read_text()))
    # A quantized version (atelier/models/int8.py) stores int8 matrices with their scales: floats again here.
    tensors = load_file(directory / WEIGHTS_FILE)
    model = load_state(CharGPT(config), int8.dequantize(tensors))
    model.eval()
    if int8.quantized_count(tensors):  # the native step reads the int8 matrices themselves
        model.int8_tensors, model.int8_version = tensors, sum(p._version for p in model.parameters())
    return model, tokenizer.load(directory / TOKENIZER_FILE)


__all__ = ["ChargptConfig", "CharGPT", "KVCache", "save_pretrained", "from_pretrained"]
