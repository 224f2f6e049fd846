"""chargpt: KV cache equals the full forward, HF GPT-2 export gives the same logits, save/load."""

import torch
import pytest

from atelier.common import native
from atelier.models.chargpt import CharGPT, ChargptConfig, KVCache, from_pretrained, save_pretrained
from atelier.models.tokenizer import CharTokenizer

POEM = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    tok = CharTokenizer.train([POEM])
    model = CharGPT(ChargptConfig(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    return model, tok


def test_tokenizer_round_trip_and_unknown_characters(tiny):
    _, tok = tiny
    assert tok.decode(tok.encode(POEM)) == POEM
    ids = tok.encode("春X晓")
    assert ids[1] == tok.unk_id and ids[0] != tok.unk_id
    assert tok.decode(ids) == "春晓"  # <unk> is dropped on decode


def test_cache_prefill_and_decode_match_full_forward(tiny):
    model, tok = tiny
    x = torch.tensor([tok.encode(POEM[:12])])
    full, _ = model(x)
    cache = KVCache(model.config, batch=3)
    rows = torch.tensor([2])
    a, _ = model(x[:, :5], cache=cache, rows=rows, pos=torch.arange(5)[None])
    steps = [model(x[:, t:t + 1], cache=cache, rows=rows, pos=torch.tensor([[t]]))[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([a] + steps, 1), full, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths_decode_together(tiny):
    model, tok = tiny
    p1, p2 = tok.encode("春眠不觉晓，"), tok.encode("夜来")
    cache = KVCache(model.config, batch=2)
    model(torch.tensor([p1]), cache=cache, rows=torch.tensor([0]), pos=torch.arange(len(p1))[None])
    model(torch.tensor([p2]), cache=cache, rows=torch.tensor([1]), pos=torch.arange(len(p2))[None])
    nxt = tok.encode("处风")
    batched, _ = model(torch.tensor([[nxt[0]], [nxt[1]]]), cache=cache, rows=torch.tensor([0, 1]),
                       pos=torch.tensor([[len(p1)], [len(p2)]]))
    alone1, _ = model(torch.tensor([p1 + nxt[:1]]))
    alone2, _ = model(torch.tensor([p2 + nxt[1:]]))
    torch.testing.assert_close(batched[0, -1], alone1[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, -1], alone2[0, -1], atol=1e-5, rtol=1e-5)


def test_position_past_context_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    save_pretrained(model, tok, tmp_path)
    again, tok2 = from_pretrained(tmp_path)
    x = torch.tensor([tok.encode(POEM)])
    assert torch.equal(model(x)[0], again(x)[0])
    assert tok2.chars == tok.chars


def test_transformers_gpt2_loads_the_export_with_identical_logits(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok = tiny
    save_pretrained(model, tok, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.tensor([tok.encode(POEM)])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-5, rtol=1e-5)


def test_shipped_tang_poet_exports_to_transformers():
    transformers = pytest.importorskip("transformers")
    from atelier.families.shipped import SHIPPED_DIR

    folder = SHIPPED_DIR / "tang-poet"
    model, tok = from_pretrained(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    x = torch.tensor([[tok.bos_id] + tok.encode("床前明月光，疑是地上霜。")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("native_kernels", [True, False])
def test_the_one_token_decoder_matches_the_module_path(tiny, native_kernels, request):
    """Serving decodes one token per row with chargpt.Decoder (under no_grad): the same logits as the
    module path, whether the rows are a run of slots (a view of the cache) or scattered (a gather), at
    one position or at several (masked); in C++ (atelier/common/native/) or in Python."""
    native.use(native_kernels)
    request.addfinalizer(lambda: native.use(True))
    model, tok = tiny
    prompts = [tok.encode(POEM[:n]) for n in (3, 7, 5, 9)]
    for rows in ([1, 2, 3, 4], [4, 0, 2, 1]):
        caches = [KVCache(model.config, batch=5) for _ in range(2)]
        for cache in caches:
            for r, p in zip(rows, prompts):
                model(torch.tensor([p]), cache=cache, rows=torch.tensor([r]), pos=torch.arange(len(p))[None])
        for same_position in (False, True):
            pos = torch.tensor([[8]] * 4 if same_position else [[len(p)] for p in prompts])
            nxt = torch.tensor([[tok.encode(c)[0]] for c in "处风花夜"])
            expected, _ = model(nxt, cache=caches[0], rows=torch.tensor(rows), pos=pos)  # grad on: modules
            with torch.no_grad():
                got, _ = model(nxt, cache=caches[1], rows=torch.tensor(rows), pos=pos)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(caches[1].kv, caches[0].kv, atol=1e-6, rtol=1e-6)


def test_the_decoder_follows_weights_changed_in_place(tiny):
    model, tok = tiny
    x = torch.tensor([[tok.encode("春")[0]]])
    with torch.no_grad():
        before, _ = model(x, cache=KVCache(model.config, 1), rows=torch.tensor([0]), pos=torch.tensor([[0]]))
        model.h[0].mlp.c_fc.weight.mul_(3)
        after, _ = model(x, cache=KVCache(model.config, 1), rows=torch.tensor([0]), pos=torch.tensor([[0]]))
    expected, _ = model(x, cache=KVCache(model.config, 1), rows=torch.tensor([0]), pos=torch.tensor([[0]]))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
