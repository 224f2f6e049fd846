"""The OpenAI dialect through the real server, with the official openai SDK."""

import time

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, audit_entries, raw_exchange


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert "tang-poet" in ids
    m = client.models.retrieve("tang-poet")
    assert m.id == "tang-poet" and m.owned_by == "atelier"
    extra = m.model_extra
    assert extra["aliases"]["latest"] == 1 and extra["latest"]["context_length"] == 192
    assert client.models.retrieve("tang-poet@1").model_extra["latest"]["version"] == 1


def test_completion_with_the_issue_parameters(client):
    r = client.completions.create(model="tang-poet", prompt="春眠不觉晓，", max_tokens=48, temperature=0.7, n=2,
                                  stop=["。"], seed=7)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert "。" not in c.text and 0 < len(c.text) <= 48
        assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 2 * 7  # <bos> + 6 characters, per choice
    assert r.usage.completion_tokens >= sum(len(c.text) for c in r.choices)
    assert r.model == "tang-poet@1"


def test_same_seed_same_text_and_choices_differ(client):
    kw = dict(model="tang-poet", prompt="床前明月光，", max_tokens=24, temperature=1.0, n=2, seed=123)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    other = client.completions.create(**{**kw, "seed": 124, "n": 1})
    assert other.choices[0].text == a.choices[1].text  # choice i uses seed + i (documented)


def test_greedy_is_deterministic_without_seed(client):
    kw = dict(model="tang-poet", prompt="白日依山尽，", max_tokens=20, temperature=0)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_model_by_alias_and_version(client):
    for ref in ("tang-poet:production", "tang-poet@1", "tang-poet:latest"):
        r = client.completions.create(model=ref, prompt="山", max_tokens=4, seed=1)
        assert r.model == "tang-poet@1"


def test_chat_stream_with_usage_and_done(client, server):
    stream = client.chat.completions.create(model="tang-poet", messages=[{"role": "user", "content": "春晓"}],
                                            max_tokens=30, seed=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(text)
    # The same request without streaming gives the same text.
    whole = client.chat.completions.create(model="tang-poet", messages=[{"role": "user", "content": "春晓"}],
                                           max_tokens=30, seed=5)
    assert whole.choices[0].message.content == text
    # The raw stream ends with data: [DONE].
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={"model": "tang-poet", "messages": [{"role": "user", "content": "秋"}], "max_tokens": 5,
                            "stream": True}) as resp:
        lines = [l for l in resp.iter_lines() if l]
    assert lines[-1] == "data: [DONE]" and resp.headers["content-type"].startswith("text/event-stream")


def test_completion_stream(client):
    parts = list(client.completions.create(model="tang-poet", prompt="江", max_tokens=10, seed=3, stream=True))
    text = "".join(p.choices[0].text for p in parts if p.choices)
    again = client.completions.create(model="tang-poet", prompt="江", max_tokens=10, seed=3)
    assert text == again.choices[0].text


def http_chunks(server, path: str, body: dict) -> list[bytes]:
    """The body of a POST as the server framed it: each HTTP/1.1 chunk, read off a raw socket."""
    import json

    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    raw = raw_exchange(server, head, payload, wait_s=30)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return chunks
        chunks.append(rest[:int(size, 16)])
        rest = rest[int(size, 16) + 2:]


def test_a_stream_ends_in_one_write(server):
    """The last text, the finish, the usage and [DONE] go out together: one write, one wake-up of the client,
    where each had its own (three more per request)."""
    for path, body in (("/v1/completions", {"prompt": "江"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "秋"}]})):
        chunks = http_chunks(server, path, body | {"model": "tang-poet", "max_tokens": 8, "seed": 3, "stream": True,
                                                      "ignore_eos": True, "stream_options": {"include_usage": True}})
        last = chunks[-1].decode()
        assert last.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in last and '"usage"' in last, chunks
        events = [e for c in chunks for e in c.decode().split("\n\n") if e]
        assert len(events) > 3 and all(e.startswith("data: ") for e in events)


def test_sampling_extras_via_extra_body(client):
    greedy = client.completions.create(model="tang-poet", prompt="月", max_tokens=12, temperature=0)
    top1 = client.completions.create(model="tang-poet", prompt="月", max_tokens=12, seed=9, extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    r = client.completions.create(model="tang-poet", prompt="月", max_tokens=12, seed=9,
                                  extra_body={"min_p": 0.1, "repetition_penalty": 1.3}, presence_penalty=1.0,
                                  frequency_penalty=0.5, top_p=0.9)
    assert r.choices[0].text


def test_logprobs(client):
    r = client.completions.create(model="tang-poet", prompt="春", max_tokens=6, logprobs=3, seed=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(r.choices[0].text)
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)
    c = client.chat.completions.create(model="tang-poet", messages=[{"role": "user", "content": "秋思"}],
                                       max_tokens=5, logprobs=True, top_logprobs=2, seed=2)
    content = c.choices[0].logprobs.content
    assert len(content) == len(c.choices[0].message.content) and len(content[0].top_logprobs) == 2


def test_health_ready_and_metrics(http, server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    assert httpx.get(server.url + "/metrics").status_code == 401
    text = http.get("/metrics").text
    assert "atelier_requests_total" in text and "atelier_generated_tokens_total" in text


def test_metrics_time_each_choice_to_its_first_token_and_between_its_tokens(http, client):
    """/metrics, per text model: each choice's time to its first token from the request's arrival, and the wait
    before each later token (tokens that arrive together: the first's wait, then 0), so every token but a choice's
    first is counted once (vLLM's time_to_first_token and inter_token_latency), streamed or not."""
    def counts() -> dict[str, float]:
        lines = [line for line in http.get("/metrics").text.splitlines() if 'model="tang-poet@1"' in line]
        return {f"{name}_{part}": sum(float(line.split()[-1]) for line in lines
                                      if line.startswith(f"atelier_{name}_seconds_{part}{{"))
                for name in ("time_to_first_token", "inter_token_latency") for part in ("count", "sum")}

    before = counts()
    start = time.perf_counter()
    chunks = list(client.completions.create(model="tang-poet", prompt="春眠", max_tokens=10, n=2, seed=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    client.completions.create(model="tang-poet", prompt="春眠", max_tokens=5, seed=4, extra_body={"ignore_eos": True})
    wall = time.perf_counter() - start
    after = counts()
    grew = {name: after[name] - before[name] for name in after}
    assert len(chunks) > 2
    assert grew["time_to_first_token_count"] == 3 and 0 < grew["time_to_first_token_sum"] < 3 * wall
    assert grew["inter_token_latency_count"] == 2 * 9 + 4 and 0 < grew["inter_token_latency_sum"] < 3 * wall


def test_keys_scopes_and_audit(http, server):
    made = http.post("/api/keys", json={"name": "reader", "scopes": ["read"]}).json()
    assert made["key"].startswith("atl-") and "hash" not in made
    reader = openai.OpenAI(base_url=server.url + "/v1", api_key=made["key"], max_retries=0)
    assert reader.models.list().data
    with pytest.raises(openai.PermissionDeniedError) as e:
        reader.completions.create(model="tang-poet", prompt="春", max_tokens=2)
    assert e.value.body["code"] == "insufficient_scope"
    listed = http.get("/api/keys").json()["data"]
    assert any(k["id"] == made["id"] for k in listed) and all("key" not in k for k in listed)
    assert http.delete(f"/api/keys/{made['id']}").json()["deleted"] is True
    with pytest.raises(openai.AuthenticationError):
        reader.models.list()
    actions = [e["action"] for e in audit_entries(http)]
    assert "key.create" in actions and "key.revoke" in actions
    assert http.get("/api/audit/verify").json()["ok"] is True
    # Admin routes need the admin scope.
    gen = http.post("/api/keys", json={"scopes": ["generate"]}).json()["key"]
    r = httpx.get(server.url + "/api/keys", headers={"Authorization": f"Bearer {gen}"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
