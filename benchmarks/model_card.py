"""Write a chargpt version's model card (README.md) from its training record and fresh samples.

    .venv/bin/python benchmarks/model_card.py [--model-dir atelier/assets/models/tang-poet]

The card states the data and its licences, the training command, the validation metrics
from training.json, and samples drawn here with fixed seeds (so the card can be
regenerated and checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import torch

from atelier.models.chargpt import from_pretrained
from atelier.common.files import atomic_write_bytes
from atelier.families.shipped import SHIPPED_DIR

PROMPTS = [("title", "春晓\n"), ("title", "秋夜\n"), ("title", "浣溪沙\n"), ("opening", "床前明月光，"),
           ("opening", "白日依山尽，")]
COMMAND = """atelier train --data ../shared/data/poetry --name tang-poet --context 192 --n-embd 192 \\
  --n-layer 6 --n-head 6 --min-count 3 --steps 1400 --batch-size 20 --lr 2e-3 --warmup 100 \\
  --eval-every 200 --patience 4 --threads 1 --no-register"""


def sample(model, tok, prompt: str, seed: int) -> str:
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    g = torch.Generator().manual_seed(seed)
    out = model.generate(ids, 120, temperature=0.8, top_k=40, generator=g, eos_id=tok.eos_id)
    return tok.decode(out[0, ids.shape[1]:].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=SHIPPED_DIR / "tang-poet")
    args = ap.parse_args()
    model, tok = from_pretrained(args.model_dir)
    record = json.loads((args.model_dir / "training.json").read_text(encoding="utf-8"))
    m, d, c, t = record["metrics"], record["data"], record["model_config"], record["train_config"]
    history = "\n".join(f"| {h['step']} | {h['val_loss']:.4f} | {h['val_ppl']:.1f} |" for h in record["history"])
    samples = "\n".join(f"- {kind} `{prompt.strip()}` (seed {seed}): {prompt.replace(chr(10), ' / ')}"
                        f"{sample(model, tok, prompt, seed)}" for seed, (kind, prompt) in enumerate(PROMPTS))
    files = "\n".join(f"| `{f['file']}` | {f['records']} | `{f['sha256'][:16]}…` | {f.get('converted') or '—'} |"
                      for f in d["files"])
    card = f"""# tang-poet

A character-level GPT-2-style decoder (`chargpt`) that writes classical Chinese poetry:
Tang *shi* and Song *ci*, in simplified characters. Trained here, on 2 CPU cores, from
nothing but the public corpora below. Weights in Hugging Face GPT-2 layout
(`config.json` + `model.safetensors`), so `transformers.GPT2LMHeadModel.from_pretrained`
loads them; the character vocabulary is in `tokenizer.json` (Atelier's own format: one
token per character, ids 0–3 are `<pad> <unk> <bos> <eos>`).

## Use
Prompt with a title followed by a newline (`春晓\\n`) for a poem under that title, or with
opening lines (`床前明月光，`) to continue them. Through Atelier: `model="tang-poet"`.

## Model
| | |
| --- | --- |
| parameters | {model.config.n_params / 1e6:.2f} M |
| layers × width × heads | {c['n_layer']} × {c['n_embd']} × {c['n_head']} |
| context | {c['n_positions']} characters |
| vocabulary | {d['vocab_size']} (characters seen at least 3 times, plus 4 special tokens) |

## Data and licences
chinese-poetry (https://github.com/chinese-poetry/chinese-poetry, commit 99ebbef), **MIT**,
© 2016 JackeyGao, via `../shared/data/poetry/`. 全唐诗 was converted from traditional to
simplified characters with OpenCC (`t2s`); editorial notes in brackets and poems with
missing-character marks were dropped. Each poem is one document `title\\nbody`; a quarter
of them (chosen by a hash) without the title. The validation split is 2 % of poems, by a
hash of the poem, so no poem is in both.

| file | poems used | sha256 | conversion |
| --- | --- | --- | --- |
{files}

{d['train_docs']} training poems, {d['val_docs']} validation poems, {d['chars']:,} characters.

## Training
```bash
{COMMAND}
```
AdamW (β = 0.9, 0.95, weight decay 0.1 on matrices), peak learning rate {t['lr']}, {t['warmup_steps']}
warm-up steps then cosine decay to a tenth, batch {t['batch_size']} windows of {c['n_positions']}
characters, gradient clipping at {t['grad_clip']}, fp32 (bf16 autocast is about 100× slower
than fp32 on this CPU, which lacks AVX512-BF16). The run was interrupted once at step 400 and
resumed from its checkpoint with one thread instead of two (the machine was shared);
{m['tokens_seen']:,} training tokens in all.

## Metrics (validation split)
Best validation loss **{m['val_loss']:.4f}** nats per character (perplexity **{m['val_ppl']:.1f}**)
at step {m['best_step']} of {m['steps']}.

| step | validation loss | perplexity |
| --- | --- | --- |
{history}

## Samples
Temperature 0.8, top-k 40, plain sampling (no form constraints; Atelier's poetry engine adds
those):

{samples}

## Limits
A small model trained for about an hour: it has the vocabulary, imagery and punctuation of
the corpus, but plain sampling does not keep line lengths, tones or rhyme reliably, and
meaning is loose. It can reproduce famous lines it saw many times.
"""
    atomic_write_bytes(args.model_dir / "README.md", card.encode("utf-8"))
    print(card)


if __name__ == "__main__":
    main()
