"""One-token decoders for imported transformers models whose architecture Atelier knows.

Serving decodes one token per sequence per step. Through transformers' modules that step
costs a few hundred tensor operations and Python calls whatever the model's size, which
for a small model is most of the time (benchmarks/text_decode.py --family hf-causal-lm).
A decoder here does the same arithmetic on the model's own weights in few operations, as
chargpt.Decoder does for our own models:
  - the projections that read the same input become one matmul: q, k and v; gate and up.
    Their weights are joined once into an (in, out) matrix that addmm reads fastest, and
    the modules' own weights become views of it, so memory is not doubled and the modules
    (prefill, poems) compute exactly as before
  - keys and values go straight into the engine's SlotCache rows (families/hf_cache.py),
    which are read as a view when the rows are consecutive slots
Architectures: GPT-2, and the Llama family (Llama, Qwen2, Mistral: RMSNorm, rotary
positions through the model's own rotary module, grouped-query attention, SiLU-gated MLP).
Anything unusual in a config (another activation, sliding windows shorter than the
context, tensor-parallel slices) gets no decoder: the model then decodes through its
modules, as every other architecture does. Where the native kernels are built
(atelier/common/native/) and the weights are float32, a step is one call to their gpt2_step
or llama_step, on the same weights and cache, and so is a prefill (its tokens flattened, each
with its row and position); otherwise prefill goes through the modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atelier.common.native import kernels, step_parts
from atelier.common.slots import NATIVE_CACHE_DTYPES, one_token_step
from atelier.families.hf_cache import SlotCache


def decoder_for(model, context: int):
    """A decoder for this transformers model, or None when its architecture or config is not one we know."""
    config = model.config
    kind = getattr(config, "model_type", "")
    if kind == "gpt2":
        plain = (not getattr(config, "scale_attn_by_inverse_layer_idx", False)
                 and not getattr(config, "reorder_and_upcast_attn", False)
                 and not getattr(config, "add_cross_attention", False)
                 and config.activation_function in GPT2_ACTIVATIONS)
        return Gpt2Decoder(model) if plain else None
    if kind in ("llama", "qwen2", "mistral"):
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        plain = (getattr(config, "hidden_act", "") == "silu" and getattr(config, "pretraining_tp", 1) == 1
                 and (window is None or window >= context) and len({type(layer) for layer in model.model.layers}) == 1)
        return LlamaDecoder(model) if plain else None
    return None


def _join(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (in, out) weight for linears that read the same input, and their joined bias (None if none
    has one). Each module's weight becomes a view of the joined matrix."""
    with torch.no_grad():
        joined = torch.cat([m.weight.detach() for m in linears], 0).T.contiguous()  # (in, Σ out)
        start = 0
        for m in linears:
            out = m.weight.shape[0]
            m.weight = nn.Parameter(joined[:, start:start + out].T, requires_grad=False)
            start += out
        biases = [m.bias for m in linears]
        if all(b is None for b in biases):
            return joined, None
        bias = torch.cat([b.detach() if b is not None else torch.zeros(m.weight.shape[0])
                          for b, m in zip(biases, linears)])
    return joined, bias


# MKL reads an (in, out) head 1.1× faster than the (out, in) one at 1 row and 2.4× at 8 (tang-poet's 7042 × 192):
# a head up to this size gets a copy in that layout for the native step; a larger one is read as it is.
HEAD_COPY_BYTES = 64 << 20


def _native_head(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The head's weight for the native step, and whether it is (out, in)."""
    weight = weight.detach()
    if weight.numel() * weight.element_size() <= HEAD_COPY_BYTES:
        return weight.T.contiguous(), False
    return weight, True


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


class _Decoder:
    """What both architectures share: the cache bookkeeping of one step."""

    def _begin(self, cache: SlotCache, rows: torch.Tensor, pos: torch.Tensor):
        span, run, mask = one_token_step(rows, pos)
        cache.rows, cache.pos, cache.seen, cache.run = rows, pos[:, None], span, run
        return span, run, mask

    @staticmethod
    def _attend(layer, rows, pos, span, run, mask, q, k, v, scale, gqa):
        """Write k, v (B, kv_heads, head_dim) at each row's position; attend q (B, heads, head_dim) over the row."""
        layer.keys[rows, :, pos] = k.to(layer.keys.dtype)
        layer.values[rows, :, pos] = v.to(layer.values.dtype)
        keys = layer.keys[run, :, :span] if run is not None else layer.keys[rows, :, :span]
        values = layer.values[run, :, :span] if run is not None else layer.values[rows, :, :span]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a float16 cache's floats, as they are
        y = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return y.reshape(q.shape[0], -1)

    def ready(self, cache: SlotCache) -> bool:
        """A cache the modules have prefilled (its buffers exist)."""
        return all(layer.is_initialized for layer in cache.layers)

    def native_ready(self, cache: SlotCache) -> bool:
        """Whether the native kernels can run on this cache (float32 weights; float32 or float16 buffers),
        creating its buffers as the modules would on their first update: a prefill can then run natively too."""
        if kernels() is None or not self.float32:
            return False
        for layer in cache.layers:
            if not layer.is_initialized:
                like = torch.zeros(1, self.cache_heads, 1, self.cache_head_dim)
                layer.lazy_initialization(like, like)
        return all(layer.keys.dtype in NATIVE_CACHE_DTYPES for layer in cache.layers)

    def _native(self, cache: SlotCache):
        """The native kernels when they can take this step; None otherwise."""
        if not self.native_ready(cache):
            return None
        return kernels()


GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class Gpt2Decoder(_Decoder):
    def __init__(self, model):
        config, t = model.config, model.transformer
        self.heads, self.dim = config.n_head, config.n_embd
        self.cache_heads, self.cache_head_dim = self.heads, self.dim // self.heads
        self.scale = None if config.scale_attn_weights else 1.0  # None: SDPA's 1/sqrt(head_dim)
        self.gelu = GPT2_ACTIVATIONS[config.activation_function]
        self.eps = config.layer_norm_epsilon
        self.wte, self.wpe = t.wte.weight.detach(), t.wpe.weight.detach()
        # Conv1D keeps its weight as (in, out) already: addmm reads it as it is.
        self.layers = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                        b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                        b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in t.h]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.head = (model.lm_head.weight, model.lm_head.bias)
        flat = [w.detach() for layer in self.layers for w in layer]
        self.float32 = all(w.dtype == torch.float32 for w in (*flat, self.wte, self.wpe, self.head[0]))
        head, out_in = _native_head(self.head[0])
        # gpt2_step's weights, from the token embedding to the head's layout (no int8 scales here)
        self.native_args = (self.wte, None, self.wpe, None, flat, [], self.ln_f[0].detach(), self.ln_f[1].detach(),
                            head, None, _detached(self.head[1]), out_in)

    def step(self, ids: torch.Tensor, cache: SlotCache, rows: torch.Tensor, pos: torch.Tensor,
             wanted: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) for ids (B,) in cache rows `rows` at positions `pos` (B,); with `wanted` (indices
        into the B tokens, ascending), those tokens' logits only."""
        native = self._native(cache)
        if native is not None:
            return native.gpt2_step(ids, pos, rows, [layer.keys for layer in cache.layers],
                                    [layer.values for layer in cache.layers], *self.native_args, self.heads,
                                    self.eps, self.scale or 0.0, self.gelu, wanted, step_parts(ids.shape[0]))
        span, run, mask = self._begin(cache, rows, pos)
        B, C, nh = ids.shape[0], self.dim, self.heads
        norm, shape, eps = torch.layer_norm, (C,), self.eps
        x = self.wte[ids] + self.wpe[pos]
        for layer, (w1, b1, wqkv, bqkv, wo, bo, w2, b2, wfc, bfc, wp, bp) in zip(cache.layers, self.layers):
            qkv = torch.addmm(bqkv, norm(x, shape, w1, b1, eps), wqkv).view(B, 3, nh, C // nh)
            y = self._attend(layer, rows, pos, span, run, mask, qkv[:, 0], qkv[:, 1], qkv[:, 2], self.scale, False)
            x = torch.addmm(x + bo, y, wo)
            h = torch._C._nn.gelu(torch.addmm(bfc, norm(x, shape, w2, b2, eps), wfc), approximate=self.gelu)
            x = torch.addmm(x + bp, h, wp)
        if wanted is not None:
            x = x[wanted]
        return F.linear(norm(x, shape, *self.ln_f, eps), *self.head)


class LlamaDecoder(_Decoder):
    def __init__(self, model):
        config, inner = model.config, model.model
        attn = inner.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.cache_heads, self.cache_head_dim = self.kv_heads, self.head_dim
        self.embed = inner.embed_tokens.weight.detach()
        self.rotary = inner.rotary_emb
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                                *_join([a.q_proj, a.k_proj, a.v_proj]), *_join([a.o_proj]),
                                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                                *_join([m.gate_proj, m.up_proj]), *_join([m.down_proj])))
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.head = (model.lm_head.weight, model.lm_head.bias)
        # llama_step's weights after the rotary angles: the tensors without their epsilons, the epsilons, then
        # the final norm and the head
        flat = [_detached(w) for (w1, e1, *attn, w2, e2, g, bg, d, bd) in self.layers
                for w in (w1, *attn, w2, g, bg, d, bd)]
        eps = [float(e) for layer in self.layers for e in (layer[1], layer[7])] + [float(self.norm[1])]
        weights = [w for w in flat if w is not None] + [self.embed, self.head[0]]
        self.float32 = all(w.dtype == torch.float32 for w in weights)
        head, out_in = _native_head(self.head[0])
        self.native_args = (flat, eps, self.norm[0].detach(), head, _detached(self.head[1]), out_in)

    def step(self, ids: torch.Tensor, cache: SlotCache, rows: torch.Tensor, pos: torch.Tensor,
             wanted: torch.Tensor | None = None) -> torch.Tensor:
        native = self._native(cache)
        if native is not None:
            cos, sin = self.rotary(self.embed[:1], pos[:, None])  # (B, 1, head_dim): one position per row
            hd = self.head_dim
            return native.llama_step(ids, pos, rows, [layer.keys for layer in cache.layers],
                                     [layer.values for layer in cache.layers], self.embed,
                                     cos.reshape(-1, hd).float().contiguous(), sin.reshape(-1, hd).float().contiguous(),
                                     *self.native_args, self.heads, self.kv_heads, hd, float(self.scale), wanted,
                                     step_parts(ids.shape[0]))
        span, run, mask = self._begin(cache, rows, pos)
        B, nh, nkv, hd = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        x = self.embed[ids]
        cos, sin = self.rotary(x, pos[:, None])  # (B, 1, head_dim): one position per row
        rope = lambda t: t * cos + torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1) * sin  # noqa: E731
        for layer, (w1, e1, wqkv, bqkv, wo, bo, w2, e2, wgu, bgu, wd, bd) in zip(cache.layers, self.layers):
            qkv = _project(torch.rms_norm(x, (x.shape[1],), w1, e1), wqkv, bqkv)
            q = rope(qkv[:, :nh * hd].view(B, nh, hd))
            k = rope(qkv[:, nh * hd:(nh + nkv) * hd].view(B, nkv, hd))
            v = qkv[:, (nh + nkv) * hd:].view(B, nkv, hd)
            y = self._attend(layer, rows, pos, span, run, mask, q, k, v, self.scale, nkv != nh)
            x = x + _project(y, wo, bo)
            gate, up = _project(torch.rms_norm(x, (x.shape[1],), w2, e2), wgu, bgu).chunk(2, dim=-1)
            x = x + _project(F.silu(gate) * up, wd, bd)
        if wanted is not None:
            x = x[wanted]
        return F.linear(torch.rms_norm(x, (x.shape[1],), *self.norm), *self.head)
