"""ATELIER_RUNTIME=process: each text model's engine in a child process (atelier/runtime/engine_process.py),
through the real server on loopback."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from conftest import ADMIN_KEY, LiveServer, admin_http, admin_openai, leave_a_stream_early, make_settings

PROMPT = "春眠不觉晓，"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(make_settings(tmp_path_factory.mktemp("home"), runtime="process", max_tokens_limit=150)) as s:
        yield s


def engine_of(server):
    loaded = server.app.state.manager.get_loaded("tang-poet", 1)
    return loaded.engine if loaded is not None else None


def completion(server, **extra) -> httpx.Response:
    body = {"model": "tang-poet", "prompt": PROMPT, "max_tokens": 16, "seed": 5, "temperature": 0.9} | extra
    return admin_http(server).post("/v1/completions", json=body)


def test_the_engine_process_writes_what_the_local_engine_writes(server, tmp_path):
    """Texts, log-probabilities, stop sequences, finish reasons and usage cross the socket unchanged."""
    extras = [{"n": 2}, {"logprobs": 2, "max_tokens": 6}, {"stop": ["。", "，"], "max_tokens": 40, "n": 3}]
    chat = {"model": "tang-poet", "messages": [{"role": "user", "content": "春眠不觉晓，"}], "max_tokens": 10,
            "seed": 3, "logprobs": True, "top_logprobs": 2}
    with LiveServer(make_settings(tmp_path / "local", runtime="local")) as local:
        want = [completion(local, **extra).json() for extra in extras]
        want_chat = admin_http(local).post("/v1/chat/completions", json=chat).json()
        want_stream = admin_openai(local).completions.create(model="tang-poet", prompt=PROMPT, max_tokens=12, seed=9,
                                                            stream=True)
        want_text = "".join(c.choices[0].text for c in want_stream if c.choices)
    for extra, w in zip(extras, want):
        got = completion(server, **extra).json()
        assert [(c["text"], c["finish_reason"], c["logprobs"]) for c in got["choices"]] == \
            [(c["text"], c["finish_reason"], c["logprobs"]) for c in w["choices"]]
        assert got["usage"] == w["usage"] and all(c["text"] for c in got["choices"])
    got_chat = admin_http(server).post("/v1/chat/completions", json=chat).json()
    assert got_chat["choices"][0]["message"] == want_chat["choices"][0]["message"]
    assert got_chat["choices"][0]["logprobs"] == want_chat["choices"][0]["logprobs"]
    assert any(c["finish_reason"] == "stop" for c in want[2]["choices"])  # the stops did stop something
    stream = admin_openai(server).completions.create(model="tang-poet", prompt=PROMPT, max_tokens=12, seed=9,
                                                     stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want_text
    engine = engine_of(server)
    assert engine.pid != os.getpid() and engine._proc.poll() is None
    ps = admin_http(server).get("/api/ps").json()["data"]
    assert [m["runtime"] for m in ps if m["name"] == "tang-poet"] == ["process"]


def test_a_prompt_past_the_context_is_refused_before_the_process(server):
    r = completion(server, prompt="春" * 400, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "max_tokens")


def test_a_client_that_leaves_is_cancelled_in_the_process(server):
    completion(server)  # loaded
    engine = engine_of(server)
    before = engine.cancelled
    leave_a_stream_early(server, max_tokens=150)
    deadline = time.time() + 10
    while engine.cancelled == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.cancelled - before >= 1, "the engine process kept generating for a client that left"
    assert completion(server).status_code == 200


def test_a_request_running_when_its_process_dies_gets_an_error_and_the_next_one_is_served(server):
    want = completion(server).json()["choices"][0]["text"]
    engine = engine_of(server)
    first_pid = engine.pid
    body = {"model": "tang-poet", "prompt": "春", "max_tokens": 150, "temperature": 2.0, "stream": True, "seed": 2}
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and not lines:
                os.kill(first_pid, signal.SIGSTOP)  # stopped at once, then killed: it cannot finish first
                os.kill(first_pid, signal.SIGKILL)
            if line.startswith("data: "):
                lines.append(line[6:])
    errors = [json.loads(x)["error"] for x in lines if x.startswith('{"error"')]
    assert errors and errors[0]["code"] == "model_unloaded" and lines[-1] == "[DONE]"
    # The proxy starts another process; until it has loaded the model, requests get a 503 to retry.
    deadline = time.time() + 120
    while (r := completion(server)).status_code == 503 and time.time() < deadline:
        assert r.json()["error"]["code"] == "model_unloaded"
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    assert engine.pid != first_pid


def test_unloading_the_model_stops_its_process(server):
    completion(server)
    proc = engine_of(server)._proc
    assert admin_http(server).post("/api/models/tang-poet@1/unload").json()["unloaded"] is True
    proc.wait(timeout=30)
    assert engine_of(server) is None and proc.returncode is not None


def test_a_process_that_cannot_load_its_model_says_why(tmp_path):
    """The child reports its load error before it exits; the manager turns the OSError into a 503
    model_load_failed, as for a model the server itself cannot load."""
    from atelier.runtime.engine_process import ProcessTextEngine

    with pytest.raises(OSError, match="could not load the model: .*no-such-family"):
        ProcessTextEngine("no-such-family", tmp_path, max_batch=2, threads=1, step_threads=1, native=False,
                          context=8)


def test_a_float16_kv_cache_reaches_the_engine_process(server, tmp_path):
    """ATELIER_KV_CACHE_DTYPE=float16 reaches the child's engine: /api/ps says what each cache holds, and
    tang-poet's greedy completion is the float32 server's (its choices are wider apart than float16's
    rounding of the keys moves them)."""
    body = {"model": "tang-poet", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    want = admin_http(server).post("/v1/completions", json=body).json()["choices"][0]["text"]
    with LiveServer(make_settings(tmp_path / "home", runtime="process", kv_cache_dtype="float16")) as half:
        got = admin_http(half).post("/v1/completions", json=body).json()["choices"][0]["text"]
        ps = {m["name"]: m for m in admin_http(half).get("/api/ps").json()["data"]}
        assert ps["tang-poet"]["kv_cache"] == "float16" and ps["tang-poet"]["runtime"] == "process"
        assert engine_of(half).kv_dtype == "float16"
    assert {m["name"]: m["kv_cache"] for m in admin_http(server).get("/api/ps").json()["data"]}["tang-poet"] == \
        "float32"
    assert len(want) == 40 and got == want


def test_a_prefill_chunk_reaches_the_engine_process(server, tmp_path):
    """ATELIER_PREFILL_CHUNK reaches the child's engine (/api/ps says how many prompt tokens it computes an
    iteration), and a long prompt prefilled 8 tokens at a time, beside a short one, gives the seeded completion a
    whole prefill gives."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"model": "tang-poet", "prompt": prompt, "max_tokens": 30, "seed": seed, "ignore_eos": True}
              for prompt, seed in ((PROMPT * 12, 3), (PROMPT, 4))]
    text = lambda live, body: admin_http(live).post("/v1/completions", json=body).json()["choices"][0]["text"]  # noqa: E731
    want = [text(server, body) for body in bodies]
    with LiveServer(make_settings(tmp_path / "home", runtime="process", prefill_chunk=8)) as chunked:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda body: text(chunked, body), bodies))
        ps = {m["name"]: m for m in admin_http(chunked).get("/api/ps").json()["data"]}
        assert ps["tang-poet"]["prefill_chunk"] == 8 and engine_of(chunked).prefill_chunk == 8
    assert {m["name"]: m["prefill_chunk"] for m in admin_http(server).get("/api/ps").json()["data"]}["tang-poet"] \
        == 256
    assert got == want and all(len(t) == 30 for t in got)


def metric(http: httpx.Client, name: str) -> float:
    """A counter's value from GET /metrics (Prometheus' text format)."""
    return next(float(line.split()[-1]) for line in http.get("/metrics").text.splitlines() if line.startswith(name + " "))


def test_a_continued_prompt_reads_what_the_last_one_left_and_only_for_its_key(server, tmp_path):
    """Prefix caching through the server and the engine process: a prompt that continues the last one (its
    prompt, its completion, more) computes only what its slot lacks, as usage.prompt_tokens_details.cached_tokens
    says, streamed too, and writes what a server without the cache writes; another key's identical request finds
    nothing of the first key's."""
    first = {"model": "tang-poet", "prompt": "白日依山尽，", "max_tokens": 16, "seed": 8, "ignore_eos": True}
    with admin_http(server) as admin:
        r1 = admin.post("/v1/completions", json=first).json()
        second = first | {"prompt": first["prompt"] + r1["choices"][0]["text"] + "黄河", "seed": 9}
        counted = lambda: metric(admin, "atelier_prompt_tokens_cached_total")  # noqa: E731
        before = counted()
        r2 = admin.post("/v1/completions", json=second).json()
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == 1 + len(first["prompt"]) + 16 - 1  # <bos>
        assert counted() - before == r2["usage"]["prompt_tokens_details"]["cached_tokens"]  # and /metrics
        r = admin.post("/api/keys", json={"name": "other", "scopes": ["generate"]})
        assert r.status_code == 201, r.text
    other = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {r.json()['key']}"}, timeout=60)
    r3 = other.post("/v1/completions", json=second).json()
    text = lambda r: r["choices"][0]["text"]  # noqa: E731
    assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and text(r3) == text(r2)
    chunks = admin_openai(server).completions.create(**{k: v for k, v in second.items() if k != "ignore_eos"},
                                                     extra_body={"ignore_eos": True}, stream=True,
                                                     stream_options={"include_usage": True})
    usage = [c.usage for c in chunks if c.usage][0]
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # all but the last token
    with LiveServer(make_settings(tmp_path / "off", runtime="process", prefix_cache=False)) as off:
        for body in (first, second):
            fresh = admin_http(off).post("/v1/completions", json=body).json()
            assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert text(fresh) == text(r2)


def test_frames_reach_requests_on_every_event_loop(tmp_path):
    """The child's frames are read on the first submitting loop, straight into its requests' queues (woken by an
    eventfd the child counts them on); a request of another loop (here, at the same time) gets its events
    through OUTBOX; once the first loop has closed, the next loop to submit reads them (without it, that
    request would wait forever: the 30 s bound fails it)."""
    import asyncio
    import threading

    from conftest import engine_texts

    from atelier.families import get_family
    from atelier.families.shipped import SHIPPED_DIR
    from atelier.runtime.engine_process import ProcessTextEngine
    from atelier.runtime.sampling import SamplingParams
    from atelier.runtime.text_engine import Finished, Sequence

    folder = SHIPPED_DIR / "tang-poet"
    lm = get_family("chargpt").load(folder)
    ids = lm.encode(PROMPT)
    want = {n: engine_texts(lm, [(PROMPT, n, 0)], temperature=0)[0] for n in (12, 60)}
    engine = ProcessTextEngine("chargpt", folder, max_batch=4, threads=1, step_threads=1, native=True,
                               context=lm.context)
    # The loop watches the eventfd the child counts its frames on, and the child's pidfd for its end; not the
    # socket, whose wake-ups would queue the loop on the engine's core.
    assert {os.readlink(f"/proc/self/fd/{fd}") for fd in engine._channel.watched} == \
        {"anon_inode:[eventfd]", "anon_inode:[pidfd]"}

    async def generate(n: int) -> tuple[str, int]:
        events = asyncio.Queue()
        engine.submit(Sequence(index=0, prompt_ids=ids, params=SamplingParams(temperature=0, ignore_eos=True),
                               max_tokens=n, stop=[], seed=0, loop=asyncio.get_running_loop(), events=events))
        text = ""
        while not isinstance(event := (await asyncio.wait_for(events.get(), 30))[1], Finished):
            text += event.text
        return text, event.completion_tokens

    try:
        first = asyncio.new_event_loop()
        thread = threading.Thread(target=first.run_forever, daemon=True)
        thread.start()
        long_one = asyncio.run_coroutine_threadsafe(generate(60), first)  # its loop reads the frames
        while engine._home is not first:
            time.sleep(0.01)
        assert asyncio.run(generate(12)) == (want[12], 12)  # meanwhile, on another loop
        assert long_one.result(timeout=60) == (want[60], 60)
        first.call_soon_threadsafe(first.stop)
        thread.join(timeout=10)
        first.close()
        assert asyncio.run(generate(12)) == (want[12], 12)  # the first loop is gone: this one reads
    finally:
        engine.close()
    assert engine._proc.returncode is not None


def test_an_engine_process_leaves_when_its_server_is_killed():
    """A server killed outright (kill -9) closes its end of the socket; the child, waiting for the server's next
    frame, reads the end and exits instead of holding its model's memory. (A child that waited on an eventfd of
    the server's, tried and not kept, would have waited forever.)"""
    import subprocess
    import sys

    code = ("import time\n"
            "from atelier.families.shipped import SHIPPED_DIR\n"
            "from atelier.runtime.engine_process import ProcessTextEngine\n"
            "e = ProcessTextEngine('chargpt', SHIPPED_DIR / 'tang-poet', max_batch=2, threads=1, step_threads=1,"
            " native=True, context=8)\n"
            "print(e.pid, flush=True)\n"
            "time.sleep(120)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(server.stdout.readline())
    os.kill(server.pid, signal.SIGKILL)
    server.wait()

    def running() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while running() and time.time() < deadline:
        time.sleep(0.05)
    assert not running()
