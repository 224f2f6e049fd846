"""Redaction of personal data and lexicon moderation: the pure modules, then /api/redact and /v1/moderations
through a real server and the openai SDK."""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
import pytest

from atelier.api.routes import moderations, privacy
from atelier.safety import moderation as moderation_module, redact as redact_module
from atelier.safety.moderation import CATEGORIES, Moderator
from atelier.safety.redact import luhn_ok, redact, redact_obj, valid_resident_id

from conftest import LiveServer, admin_http, admin_openai, make_settings

VALID_ID = "11010519491231002X"  # the standard sample: region 110105, born 1949-12-31, check character X


def with_check(first17: str) -> str:
    """An ID number with a correct ISO 7064 MOD 11-2 check character."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first17 + "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights)) % 11]


# -- redaction: unit ---------------------------------------------------------------------------


def test_resident_id_needs_checksum_and_birth_date():
    assert valid_resident_id(VALID_ID) and valid_resident_id(VALID_ID.lower())
    assert redact(f"身份证号{VALID_ID}。").text == "身份证号[ID]。"
    assert redact("110105 19491231 002X").text == "[ID]"  # grouped 6-8-4
    changed = VALID_ID[:16] + "3X"  # one digit changed: the check character no longer holds
    assert not valid_resident_id(changed)
    assert redact(f"编号 {changed}").text == f"编号 {changed}"
    bad_month = with_check("11010519491331002")  # checksum right, 13th month
    assert not valid_resident_id(bad_month) and redact(bad_month).spans == []
    future = with_check("11010521991231002")  # checksum right, born in 2199
    assert not valid_resident_id(future)
    assert valid_resident_id(with_check("44030420000229123"))  # 29 February of a leap year


def test_card_numbers_need_luhn():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    for card in ("4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111", "3782 822463 10005",
                 "5555555555554444"):
        r = redact(f"pay with {card} today")
        assert r.text == "pay with [CARD] today", card
        assert r.spans == [{"type": "card", "start": 9, "end": 9 + len(card)}]
    for number in ("4111111111111112", "4111 1111 1111 1112", "1700000000000", "1234567890123456"):
        assert redact(f"order {number}").text == f"order {number}", number  # Luhn fails, or no card prefix


@pytest.mark.parametrize("phone", ["13812345678", "138 1234 5678", "138-1234-5678", "+86 138 1234 5678",
                                   "+86-13812345678", "+8613812345678", "0086 13812345678", "+1 (555) 010-0199",
                                   "+44 20 7946 0958", "+33 1 23 45 67 89"])
def test_phone_spellings(phone):
    r = redact(f"电话：{phone}，谢谢")
    assert r.text == "电话：[PHONE]，谢谢"
    assert r.spans == [{"type": "phone", "start": 3, "end": 3 + len(phone)}]


def test_email_and_ip_addresses():
    text = "Write to li.lei+poems@mail.example.cn from 192.168.1.20 or 2001:db8::8a2e:370:7334."
    r = redact(text)
    assert r.text == "Write to [EMAIL] from [IP] or [IP]."
    assert [text[s["start"]:s["end"]] for s in r.spans] == ["li.lei+poems@mail.example.cn", "192.168.1.20",
                                                            "2001:db8::8a2e:370:7334"]
    assert [s["type"] for s in r.spans] == ["email", "ip", "ip"]
    assert redact("fe80::1ff:fe23:4567:890a").text == "[IP]"
    assert redact("[::ffff:192.0.2.128]:8080").text == "[[IP]]:8080"


def test_log_records_are_redacted_and_keep_the_shape_their_formatter_needs():
    """uvicorn's access formatter unpacks five arguments; a filter that collapsed them made every request
    on loopback print a logging traceback (and cost milliseconds)."""
    import logging

    from uvicorn.logging import AccessFormatter

    from atelier.safety.redact import RedactingFilter

    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("203.0.113.7:54321", "POST", "/v1/completions?email=a@b.cn", "1.1", 200), None)
    assert RedactingFilter().filter(access)
    line = AccessFormatter("%(client_addr)s - \"%(request_line)s\" %(status_code)s", use_colors=False).format(access)
    assert "203.0.113.7" not in line and "a@b.cn" not in line and "POST /v1/completions" in line and "200" in line
    # an argument that is not text still cannot carry personal data into the line
    plain = logging.LogRecord("atelier", logging.INFO, __file__, 1, "call %s", (13800138000,), None)
    RedactingFilter().filter(plain)
    assert "13800138000" not in plain.getMessage()


def test_ordinary_numbers_are_kept():
    kept = ["version 1.2.3 of atelier, python 3.11.4", "256.1.1.1 is not an address, nor is 1.2.3.4.5",
            "In 2024 the price was ¥1,299.00 for 3 cats and 12 dogs", "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
            "meet at 12:30:45 on 2024-01-15", "std::vector<int> and a::b", "ISBN 978-3-16-148410-0",
            "12345678901 is not a mobile (it starts 12)", "timestamp 1700000000000", "+1 is a reaction"]
    for text in kept:
        assert redact(text).text == text, text
        assert redact(text).spans == []


def test_spans_index_the_original_text_and_redact_obj_walks_json():
    text = f"a@b.io {VALID_ID} 4111111111111111 13812345678 10.0.0.1"
    r = redact(text)
    assert r.text == "[EMAIL] [ID] [CARD] [PHONE] [IP]"
    assert [(s["type"], text[s["start"]:s["end"]]) for s in r.spans] == [
        ("email", "a@b.io"), ("id", VALID_ID), ("card", "4111111111111111"), ("phone", "13812345678"),
        ("ip", "10.0.0.1")]
    params = {"prompt": "mail a@b.io", "n": 2, "temperature": 0.5, "stop": ["10.0.0.1", None],
              "poem": {"title": "给13812345678"}, "seed": 4111111111111111}
    assert redact_obj(params) == {"prompt": "mail [EMAIL]", "n": 2, "temperature": 0.5, "stop": ["[IP]", None],
                                  "poem": {"title": "给[PHONE]"}, "seed": 4111111111111111}
    assert params["prompt"] == "mail a@b.io"  # a copy: the original is untouched


# -- moderation: unit --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moderator():
    return Moderator.load(None)


def flagged(result) -> set[str]:
    return {c for c, v in result.categories.items() if v}


def test_english_hits_case_insensitive_on_word_boundaries(moderator):
    r = moderator.check("You absolute IDIOTS. Watch  your\nback.")
    assert r.flagged and flagged(r) == {"harassment", "harassment/threatening"}
    assert set(r.categories) == set(r.category_scores) == set(CATEGORIES)
    assert r.category_scores["harassment"] == 1.0 and r.category_scores["hate"] == 0.0
    assert [(m.category, m.term) for m in r.matches] == [("harassment", "idiot*"),
                                                         ("harassment/threatening", "watch your back")]
    assert "You absolute IDIOTS. Watch  your\nback."[r.matches[1].start:r.matches[1].end] == "Watch  your\nback"
    assert not moderator.check("a skilled gunsmith; the stabbedness of an oxymoron").flagged  # no word boundary


def test_regex_threats_and_full_width(moderator):
    assert flagged(moderator.check("I will hurt you")) == {"harassment", "harassment/threatening"}
    assert flagged(moderator.check("I’m gonna hurt you!")) == {"harassment", "harassment/threatening"}
    assert not moderator.check("I will hurt your feelings, sorry").flagged
    assert moderator.check("ＷＡＴＣＨ ＹＯＵＲ ＢＡＣＫ").flagged  # full-width → half-width
    assert flagged(moderator.check("I am going to kill myself")) == {"self-harm", "self-harm/intent"}


def test_chinese_hits_as_substrings(moderator):
    text = "他说：你这个白痴，你给我等着！"
    r = moderator.check(text)
    assert flagged(r) == {"harassment", "harassment/threatening"}
    assert [text[m.start:m.end] for m in r.matches] == ["白痴", "你给我等着"]
    assert flagged(moderator.check("我不想活了")) == {"self-harm", "self-harm/intent"}
    assert flagged(moderator.check("出售枪支，办假证")) == {"illicit", "illicit/violent"}


GROWING = ["You absolute IDIOTS. Watch  your\nback.", "I will hurt your feelings, sorry", "I will hurt you",
           "他说：你这个白痴，你给我等着！", "ＷＡＴＣＨ ＹＯＵＲ ＢＡＣＫ", "a skilled gunsmith;  the  oxymoron",
           "床前明月光，疑是地上霜。举头望明月，低头思故乡。", "I am going to   kill myself", "出售枪支，办假证"]


@pytest.mark.parametrize("seed", range(6))
def test_a_growing_text_is_flagged_when_a_whole_check_of_it_would_be(moderator, seed):
    """Checking each part as it arrives (a stream) flags a text at the same part as checking all of it
    each time, and a text given whole has the same hits as `check`."""
    import random

    rng = random.Random(seed)
    for text in GROWING:
        growing, cuts = moderator.growing(), sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 9))))
        seen_whole = seen_growing = False
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            seen_growing |= growing.extend(text[a:b]).flagged
            seen_whole |= moderator.check(text[:b]).flagged
            assert seen_growing == seen_whole, (text, text[:b])
        assert moderator.growing().extend(text).matches == moderator.check(text).matches


@pytest.mark.parametrize("text", ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "Shall I compare thee to a summer's day?",
                                  "The skilled gardener pruned the roses.", "", "   ", "我想吃火锅"])
def test_clean_texts(moderator, text):
    r = moderator.check(text)
    assert not r.flagged and r.matches == [] and set(r.category_scores.values()) == {0.0}


def test_operator_lists_add_and_remove(tmp_path):
    folder = tmp_path / "moderation"
    (folder / "violence").mkdir(parents=True)
    (folder / "harassment.txt").write_text("# ours\nfrobnicator\n-idiot*\n-not-in-the-list\n", encoding="utf-8")
    (folder / "violence" / "graphic.txt").write_text("流血不止\nre:\\bsplatter(?:ed)?\\b\n", encoding="utf-8")
    custom = Moderator.load(tmp_path)
    assert flagged(custom.check("what a Frobnicator")) == {"harassment"}
    assert not custom.check("idiot").flagged  # removed from the shipped list
    assert custom.check("moron").flagged  # the rest of the shipped list stays
    assert flagged(custom.check("他流血不止")) == {"violence", "violence/graphic"}
    assert custom.check("splattered").flagged
    assert Moderator.load(None).check("idiot").flagged  # shipped lists untouched


def test_operator_list_errors_name_the_file(tmp_path):
    folder = tmp_path / "moderation"
    folder.mkdir()
    (folder / "harrassment.txt").write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"moderation/harrassment.txt.*not a moderation category"):
        Moderator.load(tmp_path)
    (folder / "harrassment.txt").unlink()
    (folder / "hate.txt").write_text("ok\nre:(unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"moderation/hate.txt:2: invalid regular expression"):
        Moderator.load(tmp_path)


def test_safety_modules_are_pure():
    """safety/ is the bottom layer: these two modules import nothing from the rest of Atelier."""
    for module in (moderation_module, redact_module):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.startswith("atelier")}, module.__name__


# -- API through a real server -------------------------------------------------------------------


class SafetyServer(LiveServer):
    """A LiveServer with the moderation and privacy routers, whether or not app.py includes them yet."""

    def __init__(self, settings):
        super().__init__(settings)
        paths = {getattr(r, "path", None) for r in self.app.routes}
        for router in (moderations.router, privacy.router):
            if not {r.path for r in router.routes} <= paths:
                self.app.include_router(router)


@pytest.fixture(scope="module")
def safety_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("safety-home")
    (home / "moderation").mkdir()
    (home / "moderation" / "harassment.txt").write_text("frobnicator\n-loser\n", encoding="utf-8")
    with SafetyServer(make_settings(home, shipped_models=False, run_worker=False)) as s:
        yield s


@pytest.fixture()
def api(safety_server):
    with admin_http(safety_server) as c:
        yield c


def test_moderations_through_the_sdk(safety_server):
    client = admin_openai(safety_server)
    res = client.moderations.create(input=["You idiot, I will hurt you", "床前明月光，疑是地上霜。", "我不想活了",
                                           "a frobnicator", "what a loser"])
    assert res.id.startswith("modr-") and res.model == "atelier-lexicon-1" and len(res.results) == 5
    first, clean, sad, ours, removed = res.results
    assert first.flagged and first.categories.harassment and first.categories.harassment_threatening
    assert not first.categories.hate and first.category_scores.harassment == 1.0
    assert first.category_scores.hate == 0.0 and first.category_applied_input_types.harassment == ["text"]
    assert not clean.flagged and not any(clean.categories.model_dump().values())
    assert sad.flagged and sad.categories.self_harm_intent and sad.categories.self_harm
    assert ours.flagged and ours.categories.harassment  # the operator's list in ATELIER_HOME/moderation
    assert not removed.flagged  # and its '-loser' removed a shipped term
    one = client.moderations.create(input="Watch your back", model="omni-moderation-latest")
    assert len(one.results) == 1 and one.results[0].categories.harassment_threatening
    parts = client.moderations.create(input=[{"type": "text", "text": "ghost"}, {"type": "text", "text": "gun"}])
    assert len(parts.results) == 1 and parts.results[0].categories.illicit_violent  # parts read as one text
    assert isinstance(safety_server.app.state.moderator, Moderator)  # built once, kept on the app


def test_moderations_response_shape(api):
    r = api.post("/v1/moderations", json={"input": "白痴"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "model", "results"} and len(body["results"]) == 1
    result = body["results"][0]
    assert set(result) == {"flagged", "categories", "category_scores", "category_applied_input_types"}
    assert list(result["categories"]) == list(CATEGORIES) == list(result["category_scores"])
    assert result["categories"]["harassment"] is True and result["category_scores"]["sexual"] == 0.0


@pytest.mark.parametrize("body,param", [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok"] * 33}, "input"),
    ({"input": "x" * 151}, "input"),
    ({"input": ["ok", "x" * 151]}, "input"),
    ({"input": ["ok", 3]}, "input"),
    ({"input": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}, "input"),
    ({"input": [{"type": "text", "text": "hi"}, {"type": "text"}]}, "input"),
    ({"input": "hi", "model": "gpt-4o"}, "model"),
    ({"input": "hi", "temperature": 1}, "temperature"),
])
def test_moderations_bad_input(api, body, param):
    r = api.post("/v1/moderations", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_moderations_image_part_says_why(api):
    r = api.post("/v1/moderations", json={"input": [{"type": "image_url", "image_url": {"url": "data:,"}}]})
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"]


def test_redact_api(api):
    text = f"我的邮箱 li@example.com，手机 +86 138-1234-5678，身份证 {VALID_ID}"
    r = api.post("/api/redact", json={"text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "我的邮箱 [EMAIL]，手机 [PHONE]，身份证 [ID]"
    assert [(s["type"], text[s["start"]:s["end"]]) for s in body["spans"]] == [
        ("email", "li@example.com"), ("phone", "+86 138-1234-5678"), ("id", VALID_ID)]
    assert api.post("/api/redact", json={"text": "版本 1.2.3，2024 年"}).json() == {"text": "版本 1.2.3，2024 年",
                                                                                   "spans": []}


@pytest.mark.parametrize("body,param", [({}, "text"), ({"text": 12}, "text"), ({"text": "x" * 151}, "text"),
                                        ({"text": "hi", "mode": "mask"}, "mode")])
def test_redact_bad_input(api, body, param):
    r = api.post("/api/redact", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_routes_need_a_generate_key(safety_server, api):
    secret = api.post("/api/keys", json={"name": "reader", "scopes": ["read"]}).json()["key"]
    with httpx.Client(base_url=safety_server.url, headers={"Authorization": f"Bearer {secret}"}) as reader:
        assert reader.post("/v1/moderations", json={"input": "hi"}).status_code == 403
        assert reader.post("/api/redact", json={"text": "hi"}).status_code == 403
    with httpx.Client(base_url=safety_server.url) as anonymous:
        assert anonymous.post("/api/redact", json={"text": "hi"}).status_code == 401
