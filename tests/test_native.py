"""The native kernels (atelier/common/native/): built by make, and the same results as the Python paths."""

import os

import pytest
import torch
from conftest import engine_texts
from test_text_engine import tiny_lm

from atelier.common import native
from atelier.models.chargpt import CharGPT, ChargptConfig, KVCache
from atelier.runtime.sampling import SamplingParams, sample_rows


@pytest.fixture()
def python_paths():
    """The Python paths for the duration of a test (ATELIER_NATIVE=0)."""
    native.use(False)
    yield
    native.use(True)


def test_make_built_the_kernels_for_this_source():
    assert native.kernels() is not None, "run `make` (or python -m atelier.common.native)"
    assert native.kernels().__name__ == native.module_name()  # named after kernels.cpp's hash: never stale


def test_they_can_be_turned_off(python_paths):
    assert native.kernels() is None


def _mkl_branch(env: dict) -> int:
    """The code branch MKL picks in a fresh `import atelier, torch` (mkl_serv_cbwr_get_auto_branch: 2 is its
    compatible branch, AVX-512's are 10 and up)."""
    import subprocess
    import sys

    probe = ("import atelier, ctypes, os, torch; "
             "lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so')); "
             "print(lib.mkl_serv_cbwr_get_auto_branch())")
    return int(subprocess.run([sys.executable, "-c", probe], env=os.environ | env, capture_output=True, text=True,
                              check=True, timeout=120).stdout)


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif("AuthenticAMD" not in _cpuinfo() or " avx512f" not in _cpuinfo(),
                    reason="an AMD processor with AVX-512 (MKL answers Intel's with its AVX-512 kernels already)")
def test_mkl_runs_its_avx512_kernels_on_amd_processors_that_have_them():
    assert native.MKL_VENDOR_LIBRARY.exists(), "run `make` (or python -m atelier.common.native)"
    kept = _mkl_branch({"ATELIER_MKL_VENDOR_CHECK": "keep"})
    unlocked = _mkl_branch({})
    assert kept < 10 <= unlocked, (kept, unlocked)


def _draw(logits, params, banned, seed):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
    return [s.token for s in sample_rows(logits.clone(), params, banned=banned, prompt_ids=[[1]] * len(params),
                                         generated=[[]] * len(params), generators=generators, scratch=True)]


@pytest.mark.parametrize("temps", [[1.0], [1.0] * 6, [0.7, 1.3, 0.0, 1.0, 2.0, 0.0], [0.0] * 3])
def test_native_sampling_draws_the_tokens_the_python_path_draws(temps):
    torch.manual_seed(0)
    params = [SamplingParams(temperature=t) for t in temps]
    banned = [[0, 1, 2] if i % 2 else [0, 1, 2, 7] for i in range(len(temps))]
    for trial in range(25):
        logits = torch.randn(len(temps), 300) * 4
        logits[:, 7] = 50.0  # the most likely token, banned from every other row
        got = _draw(logits, params, banned, seed=trial * 10)
        native.use(False)
        try:
            expected = _draw(logits, params, banned, seed=trial * 10)
        finally:
            native.use(True)
        assert got == expected
        assert all(token not in ban for token, ban in zip(got, banned))
        assert all(token == int(logits[i].argmax()) for i, token in enumerate(got) if temps[i] == 0 and i % 2)


def test_native_draws_follow_the_softmax_across_a_vocabulary_of_whole_and_partial_blocks():
    """The fused draw sums 16 tokens at a time: over a vocabulary of 37 (two whole blocks and five tokens),
    20,000 draws land on each token as often as softmax(logits / t) says, within five standard errors,
    and never on a banned one."""
    torch.manual_seed(1)
    logits = torch.randn(37) * 1.5
    banned = [4, 20, 36]
    expected = torch.softmax(logits.index_fill(0, torch.tensor(banned), -float("inf")) / 0.8, -1)
    generators = [torch.Generator().manual_seed(7)]
    counts = torch.zeros(37)
    for _ in range(20_000):
        token = native.kernels().sample_plain(logits[None].clone(), [banned], [0.8], generators)[0]
        counts[token] += 1
    freq = counts / counts.sum()
    assert counts[banned].sum() == 0
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / 20_000).sqrt() + 1e-4).all()


@pytest.mark.parametrize("n,threads", [(3, 1), (12, 3)])
def test_a_step_draws_its_rows_tokens_as_sample_plain_would(n, threads, request):
    """draw_next (the text engine's rows that ask for nothing but a temperature): the next native step draws each
    row's token itself (each thread of a split step its own rows'), the tokens sample_plain draws from the same
    logits with the same generators; drawn() returns them once. Draws no step took (the module path ran) are
    dropped: None, and the next step draws nothing. Draws for another number of rows are refused."""
    native.use(True, threads)
    request.addfinalizer(lambda: native.use(True, os.cpu_count() or 1))
    torch.manual_seed(3)
    model = CharGPT(ChargptConfig(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(6)  # (the head is tied to it) logits neither uniform nor one-hot
    kernels = native.kernels()
    assert native.step_parts(n) == threads
    ids, pos, rows = torch.arange(3, 3 + 2 * n, 2)[:, None], torch.arange(n)[:, None] % 5 * 2, torch.randperm(n)
    last = torch.zeros(n, dtype=torch.long)
    temps = [(1.0, 0.0, 0.7)[i % 3] for i in range(n)]
    banned = [([0, 1], [0], [0, 1, 2])[i % 3] for i in range(n)]

    def generators(seed):
        return [torch.Generator().manual_seed(seed + i) for i in range(n)]

    def step():
        with torch.no_grad():
            return model(ids, cache=KVCache(model.config, n), rows=rows, pos=pos, last=last)[0]

    seen = set()
    for trial in range(20):
        expected = kernels.sample_plain(step().clone(), banned, temps, generators(10 * trial))
        kernels.draw_next(banned, temps, generators(10 * trial))
        step()
        assert kernels.drawn() == expected
        assert kernels.drawn() is None  # once
        seen.add(tuple(expected))
    assert len(seen) > 5  # the draws vary with the seeds
    kernels.draw_next(banned, temps, generators(0))
    native.use(False)
    try:
        step()
    finally:
        native.use(True)
    assert kernels.drawn() is None
    step()
    assert kernels.drawn() is None
    kernels.draw_next(banned[:-1], temps[:-1], generators(0)[:-1])
    with pytest.raises(RuntimeError, match="one banned list, temperature and generator per row"):
        step()
    assert kernels.drawn() is None


def test_rows_that_ask_for_more_than_a_temperature_take_the_python_path():
    """top_k, penalties and log-probabilities are the Python path's: the native draw is skipped, and the
    answer carries what was asked for."""
    logits = torch.randn(2, 50)
    params = [SamplingParams(logprobs=2), SamplingParams(top_k=3)]
    out = sample_rows(logits, params, banned=[[], []], prompt_ids=[[1], [1]], generated=[[], []],
                      generators=[torch.Generator().manual_seed(i) for i in range(2)])
    assert len(out[0].top) == 2 and out[0].logprob < 0
    assert out[1].token in torch.topk(logits[1], 3).indices.tolist()


def test_the_native_step_refuses_a_position_past_the_context():
    model = CharGPT(ChargptConfig(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="past the context of 8"):
        model(torch.tensor([[3]]), cache=KVCache(model.config, 1), rows=torch.tensor([0]), pos=torch.tensor([[8]]))


def test_the_engine_writes_the_same_text_either_way():
    lm = tiny_lm()
    requests = [("春眠", 12, 1), ("夜来风雨", 9, 2), ("花", 15, 3)]
    fast = engine_texts(lm, requests, max_batch=2, temperature=0.9)
    native.use(False)
    try:
        slow = engine_texts(lm, requests, max_batch=2, temperature=0.9)
    finally:
        native.use(True)
    assert fast == slow and all(fast)


T = 21  # prompt tokens: the AVX-512 attention takes 16 positions at a time, so a whole run and a part


def prefill_case(n_embd: int, n_head: int):
    """A random two-layer model, and two prompts of T tokens for cache rows 3 and 1."""
    torch.manual_seed(0)
    model = CharGPT(ChargptConfig(vocab_size=40, n_positions=32, n_embd=n_embd, n_layer=2, n_head=n_head)).eval()
    return model, torch.randint(0, 40, (2, T)), torch.tensor([3, 1]), torch.arange(T).expand(2, T)


@pytest.mark.parametrize("n_embd, n_head", [(32, 4), (64, 4), (64, 2), (48, 1), (128, 2), (192, 1)])
def test_a_native_prefill_matches_the_module_path(n_embd, n_head):
    """Prompts prefilled in one native call (rows of different lengths, right-padded as the engine pads them)
    leave the logits and the cache the module path leaves. Heads of 8 take the attention's plain loops; heads
    of 16, 32, 48, 64 and 192 its AVX-512 ones (every multiple of 16 up to 256 has one), where the CPU has them
    (-march=native)."""
    model, ids, rows, pos = prefill_case(n_embd, n_head)
    caches = [KVCache(model.config, batch=4) for _ in range(2)]
    expected, _ = model(ids, cache=caches[0], rows=rows, pos=pos)  # grad on: the modules
    with torch.no_grad():
        got, _ = model(ids, cache=caches[1], rows=rows, pos=pos)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1].kv, caches[0].kv, atol=1e-6, rtol=1e-6)
        nxt = torch.tensor([[5], [9]])
        a, _ = model(nxt, cache=caches[1], rows=rows, pos=torch.tensor([[T], [T]]))
    b, _ = model(nxt, cache=caches[0], rows=rows, pos=torch.tensor([[T], [T]]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_embd, n_head", [(32, 4), (64, 4), (192, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_prompt_continuing_what_its_rows_hold_attends_as_the_module_path(n_embd, n_head, dtype):
    """16 or more tokens of one row at consecutive positions (a prompt, or what of it a slot's cache lacked)
    attend as products: blocks of 32 tokens against every key the block's last one sees. Here 70 tokens (two
    whole blocks and a part) continue rows 3 and 1 from positions 40 and 10: the logits and the cache are the
    module path's, over a float32 cache and a float16 one."""
    torch.manual_seed(0)
    model = CharGPT(ChargptConfig(vocab_size=40, n_positions=128, n_embd=n_embd, n_layer=2, n_head=n_head)).eval()
    rows, start = torch.tensor([3, 1]), torch.tensor([40, 10])
    caches = [KVCache(model.config, batch=4, dtype=dtype) for _ in range(2)]
    held = torch.randint(0, 40, (2, 40))
    for cache in caches:  # what the rows hold, the same in both: the modules' prefill
        model(held, cache=cache, rows=rows, pos=torch.arange(40).expand(2, 40))
    ids, pos = torch.randint(0, 40, (2, 70)), start[:, None] + torch.arange(70)
    expected, _ = model(ids, cache=caches[0], rows=rows, pos=pos)  # grad on: the modules
    with torch.no_grad():
        assert model.decoder().native(caches[1]) is not None
        got, _ = model(ids, cache=caches[1], rows=rows, pos=pos)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(caches[1].kv.float(), caches[0].kv.float(), atol=1e-3 if dtype == torch.float16
                               else 1e-6, rtol=1e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("n_embd, n_head", [(32, 4), (48, 1), (192, 1)])
def test_a_float16_cache_is_written_and_read_as_the_module_path_does(n_embd, n_head):
    """ATELIER_KV_CACHE_DTYPE=float16: the native step writes keys and values rounded to float16 (as the module
    path's .to(float16)) and attends over those floats, in the plain loops (heads of 8) and the AVX-512 ones.
    The two paths compute a key a float's rounding apart, which float16's rounding can put an ulp apart: so the
    logits agree to 5e-5 here, where float32 caches agree to 1e-5."""
    model, ids, rows, pos = prefill_case(n_embd, n_head)
    modules, native_16, python_16 = (KVCache(model.config, batch=4, dtype=torch.float16) for _ in range(3))
    full = KVCache(model.config, batch=4)
    assert model.decoder().native(native_16) is not None  # the kernels take a float16 cache
    expected, _ = model(ids, cache=modules, rows=rows, pos=pos)  # grad on: the modules
    with torch.no_grad():
        got, _ = model(ids, cache=native_16, rows=rows, pos=pos)
        model(ids, cache=full, rows=rows, pos=pos)
        model(ids, cache=python_16, rows=rows, pos=pos)
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)
    assert native_16.kv.dtype == torch.float16
    torch.testing.assert_close(native_16.kv.float(), full.kv.half().float(), atol=1e-3, rtol=1e-3)  # rounded
    assert not torch.equal(native_16.kv.float(), full.kv)  # and not kept whole
    nxt, at = torch.tensor([[5], [9]]), torch.tensor([[T], [T]])
    with torch.no_grad():
        a, _ = model(nxt, cache=native_16, rows=rows, pos=at)
        native.use(False)
        try:
            c, _ = model(nxt, cache=python_16, rows=rows, pos=at)  # the Python decoder's step
        finally:
            native.use(True)
    b, _ = model(nxt, cache=modules, rows=rows, pos=at)
    torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(c, b, atol=5e-5, rtol=1e-4)


def test_a_prefill_can_ask_for_its_prompts_last_logits_only():
    """`last` (the text engine's prefill): each row's logits at its own last token, (B, vocab), as the whole
    (B, T, vocab) would have them, natively and on the module path. The native step computes each row's tokens
    up to its last only: the cache holds what the whole prefill writes there, and nothing past it."""
    torch.manual_seed(0)
    model = CharGPT(ChargptConfig(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=1)).eval()
    ids, rows, pos = torch.randint(0, 40, (3, 5)), torch.tensor([2, 0, 1]), torch.arange(5).expand(3, 5)
    last = torch.tensor([4, 1, 2])
    caches = [KVCache(model.config, batch=3) for _ in range(3)]
    with torch.no_grad():
        everything, _ = model(ids, cache=caches[0], rows=rows, pos=pos)
        native_last, _ = model(ids, cache=caches[1], rows=rows, pos=pos, last=last)
    modules_last, _ = model(ids, cache=caches[2], rows=rows, pos=pos, last=last)  # grad on: the modules
    assert native_last.shape == modules_last.shape == (3, 40)
    torch.testing.assert_close(native_last, everything[torch.arange(3), last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(modules_last, everything[torch.arange(3), last], atol=1e-5, rtol=1e-5)
    for row, end in zip(rows.tolist(), (last + 1).tolist()):
        torch.testing.assert_close(caches[1].kv[:, :, row, :, :end], caches[0].kv[:, :, row, :, :end])
        assert caches[1].kv[:, :, row, :, end:].abs().sum() == 0
        assert end == 5 or caches[0].kv[:, :, row, :, end:5].abs().sum() > 0  # the whole prefill's padding
    with torch.no_grad(), pytest.raises(RuntimeError, match="ascending"):
        model.decoder().step(ids.reshape(-1), caches[1], rows.repeat_interleave(5), pos.reshape(-1),
                             torch.tensor([4, 1]))


def test_the_server_says_how_it_decodes_and_native_off_writes_the_same_completion(tmp_path):
    """GET /api/ps names each text model's decoding ("native" here, where make built the kernels);
    ATELIER_NATIVE=false serves the Python paths, and the same seeded completion."""
    from conftest import LiveServer, admin_http, admin_openai, make_settings

    texts = {}
    try:
        for native_on in (True, False):
            with LiveServer(make_settings(tmp_path / f"home-{native_on}", native=native_on)) as server:
                out = admin_openai(server).completions.create(model="tang-poet", prompt="春眠不觉晓，", max_tokens=24,
                                                              seed=11, extra_body={"ignore_eos": True})
                texts[native_on] = out.choices[0].text
                ps = admin_http(server).get("/api/ps").json()["data"]
                assert [m["decoding"] for m in ps] == ["native" if native_on else "python"]
    finally:
        native.use(True)  # the server in this process turned them off for everyone
    assert len(texts[True]) == 24 and texts[True] == texts[False]


def test_an_int8_version_decodes_a_few_rows_with_its_int8_matrices(tmp_path):
    """A quantized version (atelier/models/int8.py) steps up to INT8_ROWS rows with the int8 matrices
    themselves and more rows with the dequantized copies; both give the Python path's logits on the
    dequantized weights. Once its weights change in place the int8 matrices are stale and unused."""
    from atelier.models.chargpt import INT8_ROWS, from_pretrained, save_pretrained
    from atelier.models.tokenizer import CharTokenizer
    from atelier.training.compress import quantize_folder

    torch.manual_seed(0)
    tok = CharTokenizer.train(["春眠不觉晓，处处闻啼鸟。"])
    # vocab 100 × 64: the embedding (and tied head) is int8 too; the position table is too small to be
    model = CharGPT(ChargptConfig(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4)).eval()
    save_pretrained(model, tok, tmp_path / "fp32")
    quantize_folder(tmp_path / "fp32", tmp_path / "int8")
    q, _ = from_pretrained(tmp_path / "int8")
    assert q.decoder().native_int8_args is not None
    for B in (1, INT8_ROWS, INT8_ROWS + 2):
        caches = [KVCache(q.config, 8) for _ in range(2)]
        rows = torch.arange(B)
        with torch.no_grad():
            for p in range(6):
                ids = torch.randint(0, 100, (B, 1))
                got, _ = q(ids, cache=caches[0], rows=rows, pos=torch.full((B, 1), p))
                native.use(False)
                try:
                    expected, _ = q(ids, cache=caches[1], rows=rows, pos=torch.full((B, 1), p))
                finally:
                    native.use(True)
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        q.h[0].mlp.c_fc.weight.mul_(2)
    assert q.decoder().native_int8_args is None


def test_without_a_build_the_python_paths_run_and_the_log_says_why(tmp_path, monkeypatch, caplog):
    """No compiler, or a read-only install: nothing under build/ for this source. kernels() is None (the
    decoders and the sampler take their Python paths) and the log names the missing file and the fix."""
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path)
    native._load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="atelier.common.native"):
            assert native.kernels() is None
        assert "not built" in caplog.text and str(tmp_path) in caplog.text and "make" in caplog.text
        model = CharGPT(ChargptConfig(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)).eval()
        with torch.no_grad():
            logits, _ = model(torch.tensor([[3]]), cache=KVCache(model.config, 1), rows=torch.tensor([0]),
                              pos=torch.tensor([[0]]))
        assert logits.shape == (1, 1, 20)
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    assert native.kernels() is not None


@pytest.fixture()
def step_threads(request):
    """native.use(True, n) for the duration of a test: a step may share n threads."""
    yield lambda n: native.use(True, n)
    native.use(True, os.cpu_count() or 1)  # the module's own default


def test_a_step_split_between_threads_computes_what_the_whole_step_does(step_threads):
    """A step of many rows splits them between the kernels' threads (one per ROWS_PER_THREAD), whole rows to
    each: prompts prefilled together (a row's tokens attend to keys written in the same layer) and a decoding
    step give the logits and the cache of one thread. Rows not grouped (a row on both sides of a split) keep
    the step whole."""
    torch.manual_seed(2)
    model = CharGPT(ChargptConfig(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    decoder = model.decoder()
    lengths = [5, 1, 7, 3, 6, 2, 4, 8]
    rows = torch.cat([torch.full((n,), r) for r, n in zip([7, 0, 3, 5, 1, 6, 2, 4], lengths)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    ids = torch.randint(0, 40, rows.shape)
    last = torch.tensor(lengths).cumsum(0) - 1
    # two rows' tokens, later positions first: split in two, this thread would attend to keys the other had
    # still to write
    interleaved = (torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]), torch.tensor([2, 2, 3, 3, 0, 0, 1, 1]))
    results = []
    for threads in (1, 3):
        step_threads(threads)
        cache, apart = KVCache(model.config, 8), KVCache(model.config, 2)
        with torch.no_grad():
            prefill = decoder.step(ids, cache, rows, pos, wanted=last)
            nxt = decoder.step(torch.randint(0, 40, (8,), generator=torch.Generator().manual_seed(3)), cache,
                               torch.arange(8), torch.tensor(lengths))
            mixed = decoder.step(ids[:8], apart, *interleaved)
        results.append((prefill, nxt, mixed, cache.kv, apart.kv))
    assert native.step_parts(len(ids)) == 3 and native.step_parts(8) == 2
    for whole, split in zip(*results):
        torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)
    assert results[0][0].shape == (8, 40) and results[0][0].abs().max() > 0.1
