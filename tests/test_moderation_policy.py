"""ATELIER_MODERATION on the generation routes, through the real server: `block` refuses a flagged
prompt before any model runs and cuts a flagged output (streams too) with finish_reason
"content_filter"; `flag` serves and audits; every decision is audited without its text.

The operator's own list (ATELIER_HOME/moderation/harassment.txt) makes the tests independent of
the shipped lists: a made-up word, and the Chinese comma, which tang-poet writes in every line.
"""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import ADMIN_KEY, LiveServer, admin_http, make_settings

WORD = "zzforbiddenword"


def moderated_server(tmp_path, policy: str) -> LiveServer:
    home = tmp_path / policy
    (home / "moderation").mkdir(parents=True)
    (home / "moderation" / "harassment.txt").write_text(f"# test terms\n{WORD}\n，\n", encoding="utf-8")
    return LiveServer(make_settings(home, moderation=policy, run_worker=False, max_body_bytes=200_000))


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    with moderated_server(tmp_path_factory.mktemp("moderation"), "block") as s:
        yield s


def test_block_refuses_flagged_prompts_on_every_route(block):
    with admin_http(block) as http:
        cases = [("/v1/completions", {"model": "tang-poet", "prompt": f"春 {WORD}"}, "prompt"),
                 ("/v1/chat/completions", {"model": "tang-poet", "messages": [{"role": "user", "content": WORD}]},
                  "messages"),
                 ("/v1/images/generations", {"model": "emoji-gan", "prompt": f"a {WORD} cat"}, "prompt"),
                 ("/api/poems", {"form": "wujue", "title": WORD}, "title")]
        for path, body, param in cases:
            r = http.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "content_filter" and err["param"] == param and "harassment" in err["message"]
        assert http.get("/api/ps").json()["data"] == []  # refused before any model was loaded
        audit = http.get("/api/audit", params={"limit": 100}).json()["data"]
        blocks = [e for e in audit if e["action"] == "moderation.block"]
        assert len(blocks) == 4 and all(e["detail"]["categories"] == ["harassment"] for e in blocks)
        assert WORD not in json.dumps(audit, ensure_ascii=False)  # decisions, never the text


def test_block_cuts_a_flagged_output(block):
    body = {"model": "tang-poet", "prompt": "春", "max_tokens": 40, "seed": 1, "ignore_eos": True}
    with admin_http(block) as http:
        out = http.post("/v1/completions", json=body).json()
        assert out["choices"][0]["finish_reason"] == "content_filter" and out["choices"][0]["text"] == ""
        chat = http.post("/v1/chat/completions", json={"model": "tang-poet", "max_tokens": 40, "seed": 1,
                                                       "ignore_eos": True,
                                                       "messages": [{"role": "user", "content": "春"}]}).json()
        assert chat["choices"][0]["finish_reason"] == "content_filter"
    with httpx.Client(base_url=block.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c, \
            c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(ch["choices"][0]["text"] for ch in chunks)
    reasons = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"][0]["finish_reason"]]
    assert reasons == ["content_filter"] and "，" not in text and "," not in text


def test_flag_serves_and_audits_and_off_does_nothing(tmp_path):
    for policy, audited in (("flag", True), ("off", False)):
        with moderated_server(tmp_path, policy) as s, admin_http(s) as http:
            r = http.post("/v1/completions", json={"model": "tang-poet", "prompt": f"春 {WORD}", "max_tokens": 20,
                                                   "seed": 1, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            actions = [e["action"] for e in http.get("/api/audit", params={"limit": 100}).json()["data"]]
            assert ("moderation.flag" in actions) is audited, (policy, actions)


def test_an_admin_sets_a_keys_own_policy(tmp_path):
    """The server flags; one key is set to block, then back to the server's policy."""
    with moderated_server(tmp_path, "flag") as s, admin_http(s) as admin:
        made = admin.post("/api/keys", json={"name": "school", "scopes": ["generate"], "moderation": "block"}).json()
        assert made["moderation"] == "block"
        body = {"model": "tang-poet", "prompt": f"春 {WORD}", "max_tokens": 4, "seed": 1}
        with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {made['key']}"}, timeout=60) as school:
            r = school.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
            assert admin.post("/v1/completions", json=body).status_code == 200  # the admin key: flag
            assert school.patch(f"/api/keys/{made['id']}", json={"moderation": "off"}).status_code == 403
            changed = admin.patch(f"/api/keys/{made['id']}", json={"moderation": None}).json()
            assert changed["moderation"] is None and changed["limits"] == {}
            assert school.post("/v1/completions", json=body).status_code == 200
        bad = admin.patch(f"/api/keys/{made['id']}", json={"moderation": "sometimes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] in ("moderation", "body.moderation")
        audit = admin.get("/api/audit", params={"limit": 100}).json()["data"]
        assert any(e["action"] == "key.update" and e["detail"]["moderation"] is None for e in audit)
