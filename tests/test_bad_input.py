"""Every bad input gets a 4xx in OpenAI's error shape naming the field, and the server keeps serving."""

import json
import time

import httpx
import openai
import pytest

from conftest import leave_a_stream_early


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def post(http, path, body):
    return http.post(path, json=body)


def completion(**kw):
    return {"model": "tang-poet", "prompt": "春眠不觉晓，", "max_tokens": 8} | kw


@pytest.mark.parametrize("body, param, status", [
    (completion(model="no-such-model"), "model", 404),
    (completion(model="tang-poet@99"), "model", 404),
    (completion(model="tang-poet:staging"), "model", 404),
    (completion(model="tang-poet@x"), "model", 400),
    (completion(max_tokens=101), "max_tokens", 400),          # over ATELIER_MAX_TOKENS_LIMIT (100 in tests)
    (completion(max_tokens=0), "max_tokens", 400),
    (completion(temperature=-0.5), "temperature", 400),
    (completion(temperature=9), "temperature", 400),
    (completion(top_p=0), "top_p", 400),
    (completion(top_p=1.5), "top_p", 400),
    (completion(n=0), "n", 400),
    (completion(n=5), "n", 400),                              # over ATELIER_MAX_N (4 in tests)
    (completion(n=10**9), "n", 400),
    (completion(prompt=""), "prompt", 400),
    (completion(prompt="   "), "prompt", 400),
    (completion(prompt="春" * 151), "prompt", 400),           # over ATELIER_MAX_PROMPT_CHARS (150 in tests)
    (completion(stop=["a", "b", "c", "d", "e"]), "stop", 400),
    (completion(stop=[""]), "stop", 400),
    (completion(presence_penalty=3), "presence_penalty", 400),
    (completion(logprobs=9), "logprobs", 400),
    (completion(seed=-1), "seed", 400),
    (completion(logit_bias={"5": 10}), "logit_bias", 400),
    (completion(extra_field_ok=1, top_k=-1), "top_k", 400),
    (completion(repetition_penalty=0), "repetition_penalty", 400),
    ({"prompt": "春"}, "model", 400),
])
def test_bad_completion_requests(http, body, param, status):
    err = error_of(post(http, "/v1/completions", body), status)
    assert err["param"] == param
    assert err["message"]


def test_prompt_longer_than_the_context(http):
    # 150 characters fit the character limit, and 100 more tokens do not fit a 192 context.
    err = error_of(post(http, "/v1/completions", completion(prompt="春" * 150, max_tokens=100)), 400)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert "between 1 and 41" in err["message"]


def test_unknown_characters_do_not_crash(http):
    r = post(http, "/v1/completions", completion(prompt="🙂 hello ✨ 春", seed=1))
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_malformed_json_and_wrong_types(http):
    r = http.post("/v1/completions", content=b'{"model": "tang-poet", "prompt": ', headers={"content-type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"
    assert error_of(post(http, "/v1/completions", completion(max_tokens="many")), 400)["param"] == "max_tokens"
    assert error_of(post(http, "/v1/chat/completions", {"model": "tang-poet", "messages": []}), 400)["param"] == "messages"
    bad_role = {"model": "tang-poet", "messages": [{"role": "wizard", "content": "x"}]}
    assert error_of(post(http, "/v1/chat/completions", bad_role), 400)["param"].startswith("messages")
    only_system = {"model": "tang-poet", "messages": [{"role": "system", "content": "be a poet"}]}
    assert error_of(post(http, "/v1/chat/completions", only_system), 400)["param"] == "messages"


def test_body_over_the_size_limit(http):
    r = http.post("/v1/completions", content=json.dumps(completion(prompt="春" * 30_000)).encode(),
                  headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b'{"model": "tang-poet", "prompt": "'
        for _ in range(30):
            yield "春".encode() * 1000
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer wrong-key-000000000000"}, "invalid_api_key"),
    ({"Authorization": "Basic abc"}, "invalid_api_key"),
])
def test_missing_and_invalid_keys(server, headers, code):
    r = httpx.post(server.url + "/v1/completions", json=completion(), headers=headers)
    err = error_of(r, 401)
    assert err["code"] == code and err["type"] == "authentication_error"


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="春", max_tokens=2)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tang-poet", messages=[{"role": "user", "content": "春"}], max_tokens=1000)
    assert e.value.body["param"] == "max_tokens"


def test_unknown_route_and_method(http):
    assert error_of(http.get("/v1/nothing"), 404)["type"] == "not_found_error"
    assert error_of(http.delete("/v1/completions"), 405)["code"] == "method_not_allowed"


def test_last_admin_key_cannot_be_revoked(http):
    admin = next(k for k in http.get("/api/keys").json()["data"] if k["name"] == "admin")
    assert error_of(http.delete(f"/api/keys/{admin['id']}"), 409)["code"] == "last_admin_key"
    assert error_of(http.delete("/api/keys/key_nope"), 404)["param"] == "key_id"
    assert error_of(http.post("/api/keys", json={"scopes": ["root"]}), 400)["param"] == "scopes"


def test_server_still_serves_after_all_that(client):
    assert client.completions.create(model="tang-poet", prompt="春", max_tokens=3, seed=1).choices[0].text


def test_client_disconnect_stops_generation(server):
    engine = server.app.state.manager.get_loaded("tang-poet", 1).engine
    before = engine.cancelled
    leave_a_stream_early(server)
    deadline = time.time() + 10
    while any(engine.slots) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(engine.slots), "the engine kept generating for a client that left"
    assert engine.cancelled - before >= 1


def test_query_parameters_are_named_plainly(http):
    err = error_of(http.get("/api/audit", params={"limit": 0}), 400)
    assert err["param"] == "limit"
