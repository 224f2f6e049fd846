"""hf-causal-lm: a Hugging Face transformers causal LM folder a user brings (GPT-2, Llama, Qwen2, …).

The folder is what `save_pretrained` writes: `config.json`, `*.safetensors`, the tokenizer
files (and `chat_template.jinja` where the tokenizer has one), with an optional
`atelier.json` manifest. It is served by Atelier's own continuous-batching engine
(atelier/runtime/text_engine.py), not by `generate`: every sequence owns a row ("slot") of
a KV cache that this file gives the model in transformers' own Cache interface —
  1. each layer's update writes the new keys and values at the row's own positions
  2. and returns the row's whole buffer, with a 4-D mask that lets each query see the keys
     at or before its position, so rows of different lengths share one forward
Weights load from safetensors only (never pickle); the tokenizer streams whole characters.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from atelier.common.native import kernels
from atelier.common.slots import as_run, stepped
from atelier.families.base import Family, manifest, refuse_pickles

if TYPE_CHECKING:
    from atelier.families.hf_cache import SlotCache

log = logging.getLogger("atelier.families")

MAX_CONTEXT = 32768  # positions a sequence may reach (cache rows grow as they are used, up to this)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def context_length(config: dict, wanted: int | None = None) -> int:
    """Positions a sequence may use: the model's own limit (or a manifest's smaller `context_length`),
    never more than MAX_CONTEXT."""
    limit = config.get("max_position_embeddings") or config.get("n_positions") or MAX_CONTEXT
    return int(min(wanted or limit, limit, MAX_CONTEXT))


# -- the servable --------------------------------------------------------------------------


class HFCausalLM:
    """A transformers causal LM as the text engine drives it (families/base.py: TextServable)."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        folder = Path(folder)
        refuse_pickles(folder)
        self.manifest = manifest(folder)
        if not (folder / "config.json").exists():
            raise ValueError("config.json is missing: a transformers model folder has one (save_pretrained writes it)")
        if not list(folder.glob("*.safetensors")):
            raise ValueError("no *.safetensors weights in the folder (model.safetensors or sharded "
                             "model-00001-of-0000N.safetensors with model.safetensors.index.json)")
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            raise ValueError(f"no tokenizer: the folder needs {' or '.join(TOKENIZER_FILES)} "
                             "(tokenizer.save_pretrained writes them)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 — the library's many failure types become one clear message
            raise ValueError(f"the tokenizer files do not load: {type(e).__name__}: {e}") from None
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, dtype=torch.float32,
                attn_implementation="sdpa").eval()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"config.json / *.safetensors do not load as a causal LM: {type(e).__name__}: {e}") from None
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        self.layers = config.num_hidden_layers
        self.context = context_length(config.to_dict(), self.manifest.get("context_length"))
        self.eos_ids = self._eos_ids(folder, GenerationConfig)
        if not self.eos_ids:
            raise ValueError("the model names no end-of-sequence token (eos_token_id in config.json, "
                             "generation_config.json or the tokenizer)")
        self.banned_ids: list[int] = []
        self.vocab = len(self.tokenizer)
        if self.manifest.get("chat_template"):
            self.tokenizer.chat_template = self.manifest["chat_template"]
        self.system_prompt = self.manifest.get("system_prompt")
        self._poet = None  # the poetry view, built on first use
        from atelier.families.hf_decoders import decoder_for

        self.decoder = decoder_for(self.model, self.context)  # one-token steps without the modules (or None)
        # transformers' causal LMs can run their head for chosen positions only (a prefill's last tokens)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _eos_ids(self, folder: Path, GenerationConfig) -> list[int]:
        ids: list[int] = []
        sources = [self.model.config.eos_token_id]
        if (folder / "generation_config.json").exists():
            sources.append(GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id)
        sources.append(self.tokenizer.eos_token_id)
        for s in sources:
            for i in ([s] if isinstance(s, int) else list(s or [])):
                if i is not None and i not in ids:
                    ids.append(int(i))
        return ids

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Prompt ids; the tokenizer adds its own special tokens (BOS for Llama), except to a rendered
        chat template, which already carries them."""
        return self.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def chat_prompt(self, messages: list[dict]) -> str:
        """The tokenizer's own chat template (or the manifest's), with the manifest's system prompt
        when the conversation has none."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if not self.tokenizer.chat_template:
            # No template: a plain transcript the model can continue.
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def decoding(self) -> str:
        """How a decoding step runs (GET /api/ps): "native" (atelier/common/native/), "python" (the decoder
        in Python: kernels off or not built, or weights not float32), or "modules" (transformers' own)."""
        if self.decoder is None:
            return "modules"
        return "native" if kernels() is not None and self.decoder.float32 else "python"

    def new_cache(self, rows: int, dtype: torch.dtype | None = None) -> SlotCache:
        from atelier.families.hf_cache import SlotCache  # transformers is imported only once a model loads

        return SlotCache(self.layers, rows, self.context, dtype)

    def forward(self, ids: torch.Tensor, cache: SlotCache, rows: torch.Tensor, pos: torch.Tensor,
                last: torch.Tensor | None = None) -> torch.Tensor:
        B, T = ids.shape
        if self.decoder is not None and not torch.is_grad_enabled() and (  # one token a row, or a prefill in C++
                (T == 1 and self.decoder.ready(cache)) or (T > 1 and self.decoder.native_ready(cache))):
            return stepped(self.decoder.step, cache, ids, rows, pos, last)
        cache.rows, cache.pos, cache.seen = rows, pos, int(pos.max()) + 1
        cache.run = as_run(rows.tolist())
        visible = torch.arange(cache.seen)[None, None, :] <= pos[:, :, None]  # (B, T, seen)
        mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)[:, None]
        kwargs = {}
        if last is not None and self._keeps_logits:  # the head for each row's last token only
            kwargs["logits_to_keep"] = last[:, None]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                         **kwargs)
        if last is None:
            return out.logits
        return out.logits[:, 0] if kwargs else out.logits[torch.arange(B), last]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def poet(self) -> tuple[PoetModel, PoetTokenizer]:
        """(model, tokenizer) for the poetry engine; ValueError saying why when the tokenizer has too
        few Han characters as tokens of their own (a constrained position holds one character)."""
        if self._poet is None:
            view = PoetTokenizer(self.tokenizer, self.model.get_output_embeddings().weight.shape[0])
            han = sum(1 for ch in view.stoi if "\u4e00" <= ch <= "\u9fff")
            missing = [repr(p) for p in POET_PUNCTUATION if p not in view.stoi]
            if han < MIN_POET_CHARACTERS or missing:
                self._poet = ValueError(
                    f"its tokenizer has {han} Han characters as tokens of their own (at least "
                    f"{MIN_POET_CHARACTERS} are needed)" + (f" and no single token for {', '.join(missing)}"
                                                             if missing else "")
                    + "; constrained poems decode one character per position")
            else:
                self._poet = (PoetModel(self), view)
        if isinstance(self._poet, ValueError):
            raise self._poet
        return self._poet


# -- poems: the poetry engine decodes characters under tone and rhyme masks -------------------

MIN_POET_CHARACTERS = 500  # Han characters with a token of their own, below which poems are refused
POET_PUNCTUATION = "，。\n"


class PoetTokenizer:
    """A tokenizer as the poetry engine sees a character tokenizer (itos, stoi, encode, decode): each
    character that has a token of its own keeps it; every other token has no character, so the
    masks never allow it at a constrained position."""

    def __init__(self, tokenizer, vocab: int):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids)
        self.itos = [""] * vocab  # the model's vocabulary may be padded past the tokenizer's
        self.stoi: dict[str, int] = {}
        for i in range(min(vocab, len(tokenizer))):
            text = tokenizer.decode([i])
            self.itos[i] = text
            if len(text) == 1 and i not in self.special_ids and text not in self.stoi \
                    and tokenizer.encode(text, add_special_tokens=False) == [i]:
                self.stoi[text] = i
        own = set(self.stoi.values())  # a set: Qwen2-sized vocabularies have 150,000 tokens
        self.common = torch.tensor([i in own for i in range(vocab)])
        eos = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else self.bos_id

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class PoetModel:
    """The model as the poetry engine calls chargpt: model(ids, cache=, rows=, pos=) → (logits, None)."""

    def __init__(self, lm: "HFCausalLM"):
        self.lm = lm
        self.config = type("Config", (), {"n_positions": lm.context})()

    def new_cache(self, batch: int) -> SlotCache:
        return self.lm.new_cache(batch)

    def __call__(self, ids: torch.Tensor, cache: SlotCache | None = None, rows=None, pos=None):
        if cache is None:  # one pass over whole sequences (the checker's suggestions)
            B, T = ids.shape
            cache, rows, pos = self.lm.new_cache(B), torch.arange(B), torch.arange(T).expand(B, T)
        return self.lm.forward(ids, cache, rows, pos), None


class HFCausalLMFamily(Family):
    name = "hf-causal-lm"
    task = "text-generation"
    engine = "text"

    def recognises(self, folder: Path) -> bool:
        path = Path(folder) / "config.json"
        if not path.exists():
            return False
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return False
        archs = config.get("architectures") or []
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
            "model_type" in config and not archs and (Path(folder) / "tokenizer.json").exists())

    def describe(self, config: dict, files: dict) -> dict:
        return {"architecture": (config.get("architectures") or [config.get("model_type")])[0],
                "context_length": context_length(config)}

    def load(self, folder: Path) -> HFCausalLM:
        return HFCausalLM(Path(folder))

    def weight_bytes(self, folder: Path) -> int:
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


family = HFCausalLMFamily()
