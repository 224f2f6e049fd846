"""The poetry engine through the real server: /api/poems, /check, /revise, and extra_body on the OpenAI routes."""

import pytest

HAN = lambda s: all("\u4e00" <= c <= "\u9fff" for c in s)  # noqa: E731


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


@pytest.mark.parametrize("form, lines, length", [("wujue", 4, 5), ("qijue", 4, 7), ("wulv", 8, 5), ("qilv", 8, 7)])
def test_compose_every_regulated_form(http, form, lines, length):
    out = http.post("/api/poems", json={"form": form, "seed": 5, "title": "秋夜"}).json()
    poem = out["poems"][0]
    assert out["model"] == "tang-poet@1" and out["seed"] == 5
    assert len(poem["lines"]) == lines and all(len(l) == length and HAN(l) for l in poem["lines"])
    assert poem["report"]["compliant"] is True and poem["report"]["violations"] == []
    assert poem["rhyme_group"]


def test_acrostic_rhyme_and_determinism(http):
    body = {"form": "qijue", "acrostic": "春夏秋冬", "rhyme": "一东", "seed": 11, "n": 2}
    a, b = http.post("/api/poems", json=body).json(), http.post("/api/poems", json=body).json()
    strip = lambda poems: [{k: v for k, v in p.items() if k != "artifact_id"} for p in poems]  # noqa: E731
    assert strip(a["poems"]) == strip(b["poems"])  # the same poems, stored twice
    for poem in a["poems"]:
        assert [l[0] for l in poem["lines"]] == list("春夏秋冬")
        assert poem["rhyme_group"] == "一东" and poem["report"]["compliant"]


def test_ci_tune_and_traditional_script(http):
    out = http.post("/api/poems", json={"form": "ci:如梦令", "seed": 2, "script": "traditional"}).json()
    poem = out["poems"][0]
    assert poem["report"]["compliant"] and poem["form"] == "ci:如梦令"
    forms = http.get("/api/poems/forms").json()["data"]
    assert len([f for f in forms if str(f.get("key", f.get("form", ""))).startswith("ci:")]) >= 10


def test_check_reports_violations_with_suggestions(http):
    good = http.post("/api/poems/check", json={"text": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"}).json()
    assert good["compliant"] is True
    bad = http.post("/api/poems/check", json={"lines": ["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层天"],
                                              "form": "wujue"}).json()
    assert bad["compliant"] is False
    v = next(v for v in bad["violations"] if v["line"] == 3 and v["position"] == 4)
    assert v["char"] == "天" and v["suggestions"]


def test_revise_keeps_lines(http):
    first = http.post("/api/poems", json={"form": "wujue", "seed": 3}).json()["poems"][0]
    out = http.post("/api/poems/revise", json={"lines": first["lines"], "keep": [0, 1], "form": "wujue",
                                                "seed": 9}).json()["poems"][0]
    assert out["lines"][:2] == first["lines"][:2] and out["report"]["compliant"]


def test_poem_constraints_through_the_openai_sdk(client):
    r = client.chat.completions.create(model="tang-poet", messages=[{"role": "user", "content": "春雨"}], seed=4,
                                       extra_body={"poem": {"form": "qijue", "acrostic": "春夏秋冬"}})
    text = r.choices[0].message.content
    assert [line[0] for line in text.replace("\n", "").replace("。", "，").split("，") if line] == list("春夏秋冬")
    poems = r.model_extra["poems"]
    assert poems[0]["report"]["compliant"] and poems[0]["title"] == "春雨"
    c = client.completions.create(model="tang-poet", prompt="秋", max_tokens=40, seed=1, n=2,
                                  extra_body={"poem": {"form": "wujue"}})
    assert len(c.choices) == 2 and all(ch.text for ch in c.choices)
    chunks = list(client.chat.completions.create(model="tang-poet", messages=[{"role": "user", "content": "月"}],
                                                 stream=True, extra_body={"poem": {"form": "wujue"}}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


@pytest.mark.parametrize("body, param", [
    ({"form": "wujue", "acrostic": "春夏"}, "acrostic"),
    ({"form": "wujue", "acrostic": "abcd"}, "acrostic"),
    ({"form": "sonnet"}, "form"),
    ({"form": "ci:不存在的词牌"}, "form"),
    ({"form": "wujue", "rhyme": "九十九"}, "rhyme"),
    ({"form": "wujue", "n": 50}, "n"),
    ({"form": "wujue", "script": "latin"}, "script"),
    ({"form": "wujue", "temperature": 5}, "temperature"),
    ({"form": "wujue", "surprise": 1}, "surprise"),
])
def test_bad_poem_requests(http, body, param):
    err = error_of(http.post("/api/poems", json=body), 400)
    assert err["param"] == param and err["message"]


@pytest.mark.parametrize("body, param", [
    ({"text": ""}, "text"),
    ({"text": "hello world, not a poem"}, "text"),
    ({"text": "春" * 200}, "text"),
    ({"text": "白日依山尽", "lines": ["白日依山尽"]}, "text"),
])
def test_bad_check_requests(http, body, param):
    err = error_of(http.post("/api/poems/check", json=body), 400)
    assert err["param"] == param


def test_bad_poem_extra_body(http):
    body = {"model": "tang-poet", "messages": [{"role": "user", "content": "春"}], "poem": {"acrostic": "春"}}
    assert error_of(http.post("/v1/chat/completions", json=body), 400)["param"].startswith("poem")
    body["poem"] = {"form": "wujue", "bogus": 1}
    assert error_of(http.post("/v1/chat/completions", json=body), 400)["param"].startswith("poem")


def test_cli_poem_and_check(server):
    import os
    import subprocess
    import sys

    from conftest import ADMIN_KEY

    env = os.environ | {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY, "COLUMNS": "200",
                        "PYTHONIOENCODING": "utf-8"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "atelier.cli", "poem", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120, env=env)
    r = run("--form", "wujue", "--acrostic", "风花雪月", "--seed", "1")
    assert r.returncode == 0 and "compliant" in r.stdout, r.stderr
    r = run("--check", "白日依山尽，黄河入海流。欲穷千里目，更上一层天。")
    assert r.returncode == 1 and "violation" in r.stdout and "天" in r.stdout
    r = run("--form", "wujue", "--url", "http://127.0.0.1:9")
    assert r.returncode == 1 and "cannot reach the server" in r.stderr
    r = run("--form", "wujue", "--next", "白日依山尽", "--seed", "1")  # co-writing from the terminal
    assert r.returncode == 0 and r.stdout.count("line 2 ·") == 3 and "in: 白日依山尽，" in r.stdout, r.stderr


def test_next_line_suggestions_each_continue_into_a_compliant_poem(http):
    r = http.post("/api/poems/suggest", json={"form": "wujue", "lines": ["白日依山尽"], "n": 3, "seed": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    suggestions = out["suggestions"]
    assert 1 <= len(suggestions) <= 3 and len({s["line"] for s in suggestions}) == len(suggestions)
    assert [s["logprob"] for s in suggestions] == sorted((s["logprob"] for s in suggestions), reverse=True)
    for s in suggestions:
        assert s["index"] == 1 and len(s["line"]) == 5 and HAN(s["line"])
        assert s["lines"][0] == "白日依山尽" and s["lines"][1] == s["line"]
        assert [c["char"] for c in s["report"]["chars"]] == list(s["line"])  # tones per character
        checked = http.post("/api/poems/check", json={"lines": s["lines"], "form": "wujue", "suggestions": False})
        assert checked.json()["compliant"], checked.json()  # accepting it never leads into a dead end
    again = http.post("/api/poems/suggest", json={"form": "wujue", "lines": ["白日依山尽"], "n": 3, "seed": 1}).json()
    assert again["suggestions"] == suggestions


def test_a_line_of_an_unfinished_poem_can_be_rewritten(http):
    out = http.post("/api/poems/suggest", json={"form": "wujue", "lines": ["白日依山尽", "黄河入海流"],
                                                "mask": [[True] * 5, [False] * 5], "n": 2, "seed": 4}).json()
    assert out["suggestions"] and all(s["index"] == 1 and s["lines"][0] == "白日依山尽" for s in out["suggestions"])


def test_a_mask_asks_for_replacements_of_one_character(http):
    poem = ["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]
    mask = [[True] * 5, [True] * 5, [True] * 5, [True, True, False, True, True]]
    out = http.post("/api/poems/suggest", json={"form": "wujue", "lines": poem, "mask": mask, "n": 2, "seed": 3}).json()
    assert out["suggestions"]
    for s in out["suggestions"]:
        assert s["index"] == 3 and s["lines"][:3] == poem[:3]
        assert s["line"][:2] == "更上" and s["line"][3:] == "层楼" and s["line"] != "更上一层楼"  # a real alternative


@pytest.mark.parametrize("body, param", [
    ({"form": "wujue", "lines": ["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]}, "lines"),  # complete
    ({"form": "wujue", "lines": ["白日依山尽尽"]}, "lines"),  # a 6-character line in a 五绝
    ({"form": "wujue", "lines": ["白日依山尽"] * 4, "mask": [[True] * 5] * 3}, "mask"),  # a mask per line written
    ({"form": "wujue", "lines": ["白日依山尽"] * 4, "mask": [[True] * 5] * 4}, "mask"),  # nothing to replace
    ({"form": "wujue", "lines": [], "n": 99}, "n"),
    ({"form": "no-such-form", "lines": []}, "form"),
    ({"form": "wujue", "lines": [], "hint": "x"}, "hint"),
])
def test_bad_suggest_requests(http, body, param):
    assert error_of(http.post("/api/poems/suggest", json=body), 400)["param"] == param


def test_poems_go_to_the_gallery_with_their_provenance_unless_store_is_false(http):
    out = http.post("/api/poems", json={"form": "wujue", "seed": 21, "title": "江雪"}).json()
    poem = out["poems"][0]
    art = http.get(f"/api/artifacts/{poem['artifact_id']}").json()
    assert art["kind"] == "poem" and art["model"] == "tang-poet@1"
    assert art["params"]["seed"] == 21 and art["params"]["form"] == "wujue" and art["params"]["title"] == "江雪"
    content = http.get(f"/api/artifacts/{poem['artifact_id']}/content")
    assert content.text == f"{poem['title']}\n{poem['text']}\n"
    listed = http.get("/api/artifacts", params={"kind": "poem"}).json()["data"]
    assert poem["artifact_id"] in [a["id"] for a in listed]
    unstored = http.post("/api/poems", json={"form": "wujue", "seed": 21, "store": False}).json()["poems"][0]
    assert "artifact_id" not in unstored
