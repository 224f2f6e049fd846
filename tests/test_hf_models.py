"""Bring your own Hugging Face causal LM: tiny GPT-2, Llama and Qwen2 models with a byte-level BPE
tokenizer trained here (as real GPT-2/Llama-3/Qwen2 tokenizers are), imported through the real
server and called with the official SDK — decoded by Atelier's continuous-batching engine."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from conftest import ADMIN_KEY, LiveServer, admin_http, admin_openai, engine_answers, engine_texts, make_settings

# Varied text so that frequent Han characters become single tokens and rare ones stay bytes.
LINES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。",
         "白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。", "the cat sat on the mat.", "a poem about snow 雪"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line[i:] + line[:i] for line in LINES for i in range(len(line))]  # every rotation: no whole-line merges
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    return fast


def tiny_model(kind: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            **common))
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128, **common))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tok = train_tokenizer()
    out = {}
    for kind in ("gpt2", "llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"hf-{kind}")
        model = tiny_model(kind, len(tok))
        with torch.no_grad():  # random weights, scaled so that sampling is not uniform noise
            model.get_output_embeddings().weight.mul_(20)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = folder
    return out


def zipped(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, prefix + p.relative_to(folder).as_posix())
    return buf.getvalue()


def import_folder(http, folder: Path, name: str, prefix: str = ""):
    return http.post("/api/models/import", files={"file": (f"{name}.zip", zipped(folder, prefix))},
                     data={"name": name}, timeout=120)


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory, folders):
    settings = make_settings(tmp_path_factory.mktemp("hf-home"), run_worker=False, max_loaded_models=2,
                             max_body_bytes=200_000)
    with LiveServer(settings) as s, admin_http(s) as http:
        for kind, folder in folders.items():
            r = import_folder(http, folder, f"tiny-{kind}", prefix="my-model/" if kind == "llama" else "")
            assert r.status_code == 200, r.text
        yield s


@pytest.fixture()
def hf_http(hf_server):
    with admin_http(hf_server) as c:
        yield c


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_greedy_decoding_matches_transformers_generate(hf_server, folders, kind):
    """Our engine (slot KV cache, rows at their own positions) picks the same tokens as `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[kind])
    model = AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
    prompt = "床前明月光，"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    client = admin_openai(hf_server)
    got = client.completions.create(model=f"tiny-{kind}", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    # U+FFFD only where the model wrote bytes that form no character; a character cut off at the end is dropped
    assert got.choices[0].text == expected.rstrip("\ufffd")
    assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == ids.shape[1]


def test_imported_models_are_listed_with_their_family(hf_http):
    ids = {m["id"]: m for m in hf_http.get("/v1/models").json()["data"]}
    for kind, arch in (("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")):
        m = ids[f"tiny-{kind}"]
        assert m["family"] == "hf-causal-lm" and m["task"] == "text-generation" and m["architecture"] == arch
    assert "tang-poet" in ids


def test_seeds_n_stream_and_whole_characters(hf_server):
    client = admin_openai(hf_server)
    kw = dict(model="tiny-qwen2", prompt="春眠", max_tokens=40, seed=11, n=2, temperature=1.0,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # choice i uses seed + i
    assert a.usage.completion_tokens == 80
    pieces: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            pieces[c.index] += c.text
    # A character streamed in halves would show as U+FFFD in the pieces but not in the whole text (which
    # test_greedy_decoding_matches_transformers_generate checks against the tokenizer's own decode).
    assert [pieces[0], pieces[1]] == [c.text for c in a.choices]


def test_chat_uses_the_tokenizers_template_with_a_system_message(hf_server, folders):
    from transformers import AutoTokenizer

    client = admin_openai(hf_server)
    messages = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "写雪"}]
    out = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, seed=3,
                                         extra_body={"ignore_eos": True})
    tok = AutoTokenizer.from_pretrained(folders["llama"])
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False).input_ids)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 6


def test_stop_logprobs_and_penalties(hf_server):
    client = admin_openai(hf_server)
    base = client.completions.create(model="tiny-gpt2", prompt="明月", max_tokens=30, seed=5,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model="tiny-gpt2", prompt="明月", max_tokens=30, seed=5, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model="tiny-gpt2", prompt="明月", max_tokens=5, seed=5, logprobs=2,
                                   frequency_penalty=0.5, extra_body={"ignore_eos": True})
    assert len(lp.choices[0].logprobs.token_logprobs) == 5
    assert all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)


def test_split_utf8_waits_for_the_byte_that_completes_it(hf_server):
    """雪 is three bytes; fed one byte-token at a time, nothing is emitted until the third arrives."""
    from atelier.runtime.text_engine import Sequence

    lm = hf_server.app.state.manager.get_loaded("tiny-gpt2", 1)
    if lm is None:
        admin_openai(hf_server).completions.create(model="tiny-gpt2", prompt="a", max_tokens=1)
        lm = hf_server.app.state.manager.get_loaded("tiny-gpt2", 1)
    servable, engine = lm.servable, lm.engine
    spelled = _bytes_to_unicode()  # byte-level BPE spells byte b as the character spelled[b]
    byte_tokens = [servable.tokenizer.convert_tokens_to_ids(spelled[b]) for b in "雪".encode("utf-8")]
    assert all(isinstance(t, int) for t in byte_tokens)
    seq = Sequence(index=0, prompt_ids=[1], params=None, max_tokens=10, stop=[], seed=0, loop=None, events=None)
    emitted = []
    for t in byte_tokens:
        seq.generated.append(t)
        emitted.append(engine._detokenize(seq))
    assert emitted == ["", "", "雪"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character table (what ByteLevel tokens are spelled with)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def test_poems_refuse_a_model_without_character_tokens(hf_http):
    r = hf_http.post("/api/poems", json={"model": "tiny-qwen2", "form": "wujue", "seed": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    assert "character" in r.json()["error"]["message"]


def test_openai_before_1_0_engines_route(hf_server):
    """openai<1.0 posts Completion.create(engine=...) to /v1/engines/{engine}/completions, without `model`."""
    with httpx.Client(base_url=hf_server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
        r = c.post("/v1/engines/tiny-gpt2/completions", json={"prompt": "明月", "max_tokens": 3, "seed": 1,
                                                               "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion" and r.json()["usage"]["completion_tokens"] == 3
        r = c.post("/v1/engines/tiny-gpt2/completions", json={"prompt": "x", "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = c.post("/v1/engines/tiny-gpt2/completions", json={"model": "tang-poet", "prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_manifest_defaults_and_system_prompt(hf_http, folders, tmp_path):
    import shutil

    folder = tmp_path / "with-manifest"
    shutil.copytree(folders["gpt2"], folder)
    (folder / "atelier.json").write_text(json.dumps({
        "display_name": "Tiny GPT-2", "license": "MIT", "defaults": {"max_tokens": 4, "temperature": 0},
        "system_prompt": "你是诗人。"}))
    r = import_folder(hf_http, folder, "tiny-manifest")
    assert r.status_code == 200, r.text
    assert r.json()["manifest"]["display_name"] == "Tiny GPT-2" and r.json()["manifest"]["license"] == "MIT"
    out = hf_http.post("/v1/completions", json={"model": "tiny-manifest", "prompt": "明月", "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 4  # the manifest's max_tokens, not the route's 16
    again = hf_http.post("/v1/completions", json={"model": "tiny-manifest", "prompt": "明月", "ignore_eos": True})
    assert again.json()["choices"][0]["text"] == out["choices"][0]["text"]  # temperature 0 by default


def bad_import(http, files: dict[str, bytes], name="bad-model"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return http.post("/api/models/import", files={"file": ("m.zip", buf.getvalue())}, data={"name": name})


def test_bad_imports_are_400s_and_register_nothing(hf_http, folders):
    good = {p.name: p.read_bytes() for p in folders["gpt2"].iterdir()}
    cases = [
        (good | {"pytorch_model.bin": b"\x80\x04pickle"}, "file", "safetensors"),
        ({k: v for k, v in good.items() if k != "tokenizer.json"}, "file", "tokenizer"),
        ({k: v for k, v in good.items() if k != "model.safetensors"}, "file", "safetensors"),
        (good | {"config.json": b"{not json"}, "file", "config.json"),
        (good | {"model.safetensors": b"garbage"}, "file", "safetensors"),
        (good | {"../escape.json": b"{}"}, "file", "unsafe path"),
        ({"readme.txt": b"hello"}, "file", "not a model"),
        (good | {"atelier.json": b'{"colour": "red"}'}, "file", "unknown fields colour"),
    ]
    for files, param, says in cases:
        r = bad_import(hf_http, files)
        assert r.status_code == 400, (says, r.text)
        err = r.json()["error"]
        assert err["param"] == param and says in err["message"], (says, err)
    r = hf_http.post("/api/models/import", files={"file": ("weights.pt", b"\x80\x04")}, data={"name": "bad-model"})
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
    r = hf_http.post("/api/models/import", files={"file": ("m.zip", zipped(folders["gpt2"]))}, data={"name": "Bad Name"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert hf_http.get("/v1/models/bad-model").status_code == 404


def test_an_imported_model_is_a_new_version_and_evicts_under_the_limit(hf_http, hf_server, folders):
    r = import_folder(hf_http, folders["gpt2"], "tiny-gpt2")
    assert r.status_code == 200 and r.json()["latest"]["version"] == 2
    client = admin_openai(hf_server)
    for kind in ("gpt2", "llama", "qwen2"):  # ATELIER_MAX_LOADED_MODELS=2 here
        client.completions.create(model=f"tiny-{kind}", prompt="月", max_tokens=2)
    assert len(hf_http.get("/api/ps").json()["data"]) == 2


def test_cli_imports_a_folder(hf_server, folders, tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"ATELIER_URL": hf_server.url, "ATELIER_API_KEY": ADMIN_KEY}
    r = subprocess.run([sys.executable, "-m", "atelier.cli", "models", "import", str(folders["llama"]), "--name",
                        "cli-llama"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "imported cli-llama@1 (hf-causal-lm, text-generation)" in r.stdout


def han_tokenizer(chars: str):
    """A byte-level BPE like Qwen2's: every character of `chars` is one token (its UTF-8 bytes merged)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spelled = _bytes_to_unicode()
    vocab = {"<|endoftext|>": 0}
    for s in spelled:
        vocab.setdefault(s, len(vocab))
    merges = []
    for ch in chars:
        b = [spelled[x] for x in ch.encode("utf-8")]
        for k in range(1, len(b)):
            left, right = "".join(b[:k]), b[k]
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_poems_on_an_imported_lm_with_single_character_tokens(hf_http, tmp_path):
    """The poetry engine masks every multi-character token at constrained positions and decodes the
    characters the tokenizer has as tokens of their own — here the 1,500 commonest of tang-poet."""
    from atelier.families.shipped import SHIPPED_DIR
    from atelier.models.tokenizer import CharTokenizer

    chars = "".join(CharTokenizer.load(SHIPPED_DIR / "tang-poet" / "tokenizer.json").itos[4:1504]) + "，。"
    tok = han_tokenizer(chars)
    folder = tmp_path / "han-qwen2"
    tiny_model("qwen2", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert import_folder(hf_http, folder, "han-qwen2").status_code == 200
    r = hf_http.post("/api/poems", json={"model": "han-qwen2", "form": "wujue", "seed": 2, "title": "春"})
    assert r.status_code == 200, r.text
    poem = r.json()["poems"][0]
    assert poem["report"]["compliant"] and len(poem["lines"]) == 4 and all(len(line) == 5 for line in poem["lines"])
    assert r.json()["model"] == "han-qwen2@1"


def generate_together(lm, prompts: list[str], max_tokens: int = 12) -> list[str]:
    """Greedy continuations of prompts submitted at once: the engine admits them in one batched prefill."""
    return engine_texts(lm, [(p, max_tokens, 1) for p in prompts], temperature=0.0)


@pytest.mark.parametrize("kind", ["chargpt", "gpt2", "llama"])
def test_prompts_of_different_lengths_prefilled_together_continue_as_they_do_alone(folders, kind):
    """Right-padded batched prefill: the padding is written past each prompt and never seen."""
    from atelier.families import get_family
    from atelier.families.shipped import SHIPPED_DIR

    lm = get_family("chargpt").load(SHIPPED_DIR / "tang-poet") if kind == "chargpt" else \
        get_family("hf-causal-lm").load(folders[kind])
    prompts = ["春", "床前明月光，疑是地上霜。", "白日依山尽，", "the cat sat on"]
    together = generate_together(lm, prompts)
    assert together == [generate_together(lm, [p])[0] for p in prompts]
    assert all(together)


def imported_loud(model, tokenizer_folder: Path, folder: Path):
    """`model` with weights larger than a random init's (so that a wrong step shows in the logits), saved with the
    fixture's tokenizer to `folder` and loaded through the hf-causal-lm family."""
    from atelier.families.hf_causal_lm import HFCausalLM

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_folder / name).read_bytes())
    return HFCausalLM(folder)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("native_kernels", [True, False])
@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_the_one_token_decoder_gives_the_modules_logits(folders, kind, native_kernels, kv, tmp_path, request):
    """GPT-2 and Llama-family imports decode one token per row without transformers' modules
    (families/hf_decoders.py): the same logits and cache contents as the modules, for rows that are a
    run of slots or scattered, at one position or at several. In C++ (atelier/common/native/), which
    prefills too, or in Python, where prefill runs the modules. Over a float16 cache (ATELIER_KV_CACHE_DTYPE)
    every path writes the same rounded keys, which a float's rounding between the paths can put an ulp of
    float16 apart: the logits agree to about 1e-3 there."""
    from transformers import AutoModelForCausalLM

    from atelier.common import native

    native.use(native_kernels)
    request.addfinalizer(lambda: native.use(True, os.cpu_count() or 1))

    lm = imported_loud(AutoModelForCausalLM.from_pretrained(folders[kind]), folders[kind], tmp_path)
    assert lm.decoder is not None
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [20] * 9]
    dtype = getattr(torch, kv)
    tol = {"atol": 1e-4, "rtol": 1e-4} if kv == "float32" else {"atol": 2e-3, "rtol": 2e-3}
    for rows in ([1, 2, 3, 4], [4, 0, 2, 1]):
        modules, decoder = lm.new_cache(5, dtype), lm.new_cache(5, dtype)
        next_logits = []
        for r, p in zip(rows, prompts):
            prompt = (torch.tensor([p]), torch.tensor([r]), torch.arange(len(p))[None])
            expected = lm.forward(prompt[0], modules, *prompt[1:])  # grad on: the modules
            with torch.no_grad():  # the native prefill when the kernels are on
                got = lm.forward(prompt[0], decoder, *prompt[1:])
            torch.testing.assert_close(got, expected.detach(), **tol)
            next_logits.append(expected[0, -1].detach())
        assert lm.decoder.native_ready(decoder) == native_kernels  # float16 buffers too
        # The engine's prefill: the prompts at once, right-padded, each one's last logits only (`last`).
        width = max(map(len, prompts))
        ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in prompts])
        last, at = torch.tensor([len(p) - 1 for p in prompts]), (torch.tensor(rows), torch.arange(width).expand(4, width))
        via_modules = lm.forward(ids, lm.new_cache(5, dtype), *at, last=last)
        torch.testing.assert_close(via_modules.detach(), torch.stack(next_logits), **tol)
        for threads in (1, 3):  # the native step whole, and its prompts split between three threads
            native.use(native_kernels, threads)
            with torch.no_grad():
                via_decoder = lm.forward(ids, lm.new_cache(5, dtype), *at, last=last)
            torch.testing.assert_close(via_decoder, torch.stack(next_logits), **tol)
        for same_position in (False, True):
            pos = torch.tensor([[9]] * 4 if same_position else [[len(p)] for p in prompts])
            nxt = torch.tensor([[30], [31], [32], [33]])
            expected = lm.forward(nxt, modules, torch.tensor(rows), pos)  # grad on: the modules
            with torch.no_grad():
                got = lm.forward(nxt, decoder, torch.tensor(rows), pos)
            assert expected.abs().max() > 1
            torch.testing.assert_close(got, expected, **tol)
            for a, b in zip(decoder.layers, modules.layers):
                assert a.keys.dtype == b.keys.dtype == dtype
                torch.testing.assert_close(a.keys.float(), b.keys.float(), atol=1e-5 if kv == "float32" else 2e-3,
                                           rtol=1e-5 if kv == "float32" else 2e-3)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_an_imported_models_native_step_draws_as_sample_plain(folders, kind, tmp_path):
    """The text engine's plain rows are drawn by the native step itself (draw_next): for an imported GPT-2
    (gpt2_step) and Llama (llama_step), the tokens sample_plain draws from the step's logits."""
    from transformers import AutoModelForCausalLM

    from atelier.common import native

    lm = imported_loud(AutoModelForCausalLM.from_pretrained(folders[kind]), folders[kind], tmp_path)
    kernels = native.kernels()
    ids, rows, pos = torch.tensor([[5], [9], [14]]), torch.tensor([2, 0, 1]), torch.tensor([[0], [3], [6]])
    banned, temps = [[0], [0, 1], []], [1.0, 0.5, 0.0]

    def step():
        cache = lm.new_cache(3)
        assert lm.decoder.native_ready(cache)  # its buffers made, as a prefill makes them
        with torch.no_grad():
            return lm.forward(ids, cache, rows, pos, last=torch.zeros(3, dtype=torch.long))

    def generators(seed):
        return [torch.Generator().manual_seed(seed * 3 + i) for i in range(3)]

    for seed in range(5):
        expected = kernels.sample_plain(step().clone(), banned, temps, generators(seed))
        kernels.draw_next(banned, temps, generators(seed))
        step()
        assert kernels.drawn() == expected


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("native_kernels", [True, False])
def test_a_chats_next_turn_reads_the_conversation_from_the_cache(folders, kind, native_kernels):
    """Prefix caching on an imported model: the second turn's prompt (the chat template over the first turn, its
    answer and a new message) finds the first turn's tokens in the slot it left, as far as the template's text
    tokenizes the same, and computes the rest at their positions; the answer is the one a whole prefill gives.
    Native steps, and the Python paths (transformers' modules prefilling at an offset through SlotCache)."""
    from atelier.common import native
    from atelier.families import get_family
    from atelier.runtime.text_engine import TextEngine

    lm = get_family("hf-causal-lm").load(folders[kind])
    first = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "写雪"}]
    native.use(native_kernels)
    try:
        runs = []
        for prefix_cache in (True, False):
            engine = TextEngine(lm, 2, prefix_cache=prefix_cache)
            p1 = lm.encode(lm.chat_prompt(first), chat=True)
            [(t1, _)] = engine_answers(engine, [(p1, "key", 10, 1)])
            second = first + [{"role": "assistant", "content": lm.decode(t1)}, {"role": "user", "content": "再写月"}]
            p2 = lm.encode(lm.chat_prompt(second), chat=True)
            [(t2, done)] = engine_answers(engine, [(p2, "key", 10, 2)])
            engine.close()
            runs.append((t2, done.cached_tokens))
    finally:
        native.use(True)
    held = p1 + t1[:-1]
    same = next((i for i, (a, b) in enumerate(zip(held, p2)) if a != b), min(len(held), len(p2)))
    assert same >= len(p1) - 2 and 2 * same >= len(held)  # the template's text splits the same up to the answer
    assert runs[0] == (runs[1][0], same) and runs[1][1] == 0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("hidden, heads, kv_heads", [(64, 4, 1), (64, 4, 2), (128, 2, 1)])
@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_grouped_query_heads_decode_as_the_modules_do(folders, tmp_path, kind, hidden, heads, kv_heads, kv):
    """Grouped-query attention (one or two key/value heads for every two or four query heads) with heads of 16 and
    64 floats, which the native step attends in its AVX-512 loops (the fixture's heads of 8 take the plain ones):
    one token a row at positions past a block of 16 and inside one, over 40 cached positions, gives the modules'
    logits, over float32 and float16 caches."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config, model_class = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = model_class(config(vocab_size=420, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                               bos_token_id=0, eos_token_id=0))
    lm = imported_loud(model, folders[kind], tmp_path)
    dtype = getattr(torch, kv)
    tol = {"atol": 1e-4, "rtol": 1e-4} if kv == "float32" else {"atol": 2e-3, "rtol": 2e-3}
    modules, native = lm.new_cache(3, dtype), lm.new_cache(3, dtype)
    rows, held = torch.tensor([2, 0]), torch.randint(1, 400, (2, 40))
    for cache in (modules, native):  # what the rows hold, the same in both: the modules' prefill
        lm.forward(held, cache, rows, torch.arange(40).expand(2, 40))
    for pos in ([[40], [12]], [[41], [40]]):
        nxt, at = torch.randint(1, 400, (2, 1)), torch.tensor(pos)
        expected = lm.forward(nxt, modules, rows, at)  # grad on: the modules
        with torch.no_grad():
            assert lm.decoder.native_ready(native)
            got = lm.forward(nxt, native, rows, at)
        assert expected.abs().max() > 1
        torch.testing.assert_close(got, expected.detach(), **tol)


def test_a_kv_cache_reserves_its_whole_context_and_holds_memory_only_where_rows_have_written():
    """An imported model's KV cache takes every slot's whole context at once, in memory the OS commits as it
    is written: a gigabyte reserved holds next to nothing, what a row writes is there, the rest reads zeros."""
    from atelier.families.hf_cache import reserve

    resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    before = resident()
    keys = reserve((32, 2, 32768, 64), torch.float32)  # 32 slots of a 32 k-position context: 1 GiB
    assert keys.shape == (32, 2, 32768, 64) and resident() - before < 64 << 20
    keys[3, :, :100] = 1.0
    assert float(keys[3, :, :100].sum()) == 2 * 100 * 64 and float(keys[5, :, :1000].abs().max()) == 0
    assert resident() - before < 64 << 20
