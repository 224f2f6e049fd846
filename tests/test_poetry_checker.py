"""The checker on poems checked by hand: compliant ones pass, broken ones name the position."""

import pytest

from atelier.poetry import PoemError, check
from atelier.poetry import readings
from atelier.poetry.prosody import pingshui

# 王之涣《登鹳雀楼》: 五绝仄起首句不入韵, rhymes 流/楼 in 十一尤 (更 is 平/仄, 一 at a free position).
DENG_GUAN_QUE_LOU = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
# 杜甫《绝句》: 七绝仄起首句不入韵, rhymes 天/船 in 一先 (行 is 平/仄).
JUE_JU = ["两个黄鹂鸣翠柳", "一行白鹭上青天", "窗含西岭千秋雪", "门泊东吴万里船"]
# 杜甫《春望》: 五律仄起首句不入韵, rhymes 深/心/金/簪 in 十二侵.
CHUN_WANG = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
# 李白《菩萨蛮》: 仄韵 织/碧 (第十七部入), 平韵 楼/愁, 换仄 立/急, 换平 程/亭.
PU_SA_MAN = "平林漠漠烟如织，寒山一带伤心碧。暝色入高楼，有人楼上愁。玉阶空伫立，宿鸟归飞急。何处是归程？长亭连短亭。"


def test_compliant_jueju():
    r = check(DENG_GUAN_QUE_LOU)
    assert r["compliant"] and r["violations"] == []
    assert (r["form"], r["pattern"], r["rhyme_group"]) == ("wujue", "五绝仄起首句不入韵", "十一尤")
    r = check(JUE_JU)
    assert r["compliant"] and r["pattern"] == "七绝仄起首句不入韵" and r["rhyme_group"] == "一先"


def test_compliant_lvshi_and_ci():
    r = check(CHUN_WANG)
    assert r["compliant"] and r["form"] == "wulv" and r["rhyme_group"] == "十二侵"
    r = check(PU_SA_MAN)
    assert r["compliant"] and r["form"] == "ci:菩萨蛮"
    assert r["rhyme_groups"]["A"] == "第十七部入" and r["rhyme_groups"]["B"] == "第十二部平"


def test_report_per_character():
    r = check(DENG_GUAN_QUE_LOU)
    first = r["lines"][0]
    assert first["text"] == "白日依山尽"
    assert [c["required"] for c in first["chars"]] == list("中仄平平仄")
    assert first["chars"][0] == {"char": "白", "required": "中", "tones": ["仄"], "ok": True}
    assert first["rhyme"] is None
    rhyme = r["lines"][1]["rhyme"]
    assert rhyme["group"] == "十一尤" and rhyme["ok"] and "十一尤" in rhyme["char_groups"]
    gengs = r["lines"][3]["chars"][0]
    # 多音字: read as its context makes it, by how Tang poets used it (更上 gèng 仄; 三更 gēng 平)
    assert gengs["char"] == "更" and gengs["tones"] == ["仄"] and gengs["reading"] == {"tone": "仄", "by": "更上"}


def test_polyphones_count_under_the_reading_their_context_gives():
    # 相思 is 平 (to long for): at a 仄 position of 王维's 相思 it would break the form; here it is 平, as written
    r = check("红豆生南国，春来发几枝。愿君多采撷，此物最相思。")
    assert r["compliant"] and r["lines"][3]["chars"][4]["reading"] == {"tone": "平", "by": "相思"}
    # 秋思 is 仄 (autumn thoughts): the same character where a 平 is required is flagged, naming the reading
    r = check("白日依山尽，黄河入海流。秋思千里目，更上一层楼。", form="wujue")
    [v] = [v for v in r["violations"] if v["char"] == "思"]
    assert "思 reads 仄 in 秋思" in v["message"] and v["kind"] == "tone"
    # free polyphones (one meaning, either reading) fit either tone
    assert "看" in readings.table()["free"] and readings.reading("看山", 0) is None


def test_rhymes_count_only_in_the_groups_tang_poets_rhymed_them_in():
    assert [pingshui().groups[g].name for g in readings.rhyme_groups("逢")] == ["二冬"]
    assert [pingshui().groups[g].name for g in readings.rhyme_groups("居")] == ["六鱼"]
    # 中 (一东) with 逢 (二冬): neighbouring groups, which 近体 does not mix
    r = check("白日依山尽，黄河入海中。欲穷千里目，更上一层逢。", form="wujue")
    assert not r["compliant"] and [v["char"] for v in r["violations"] if v["kind"] == "rhyme"] == ["逢"]


def test_broken_rhyme_names_position():
    r = check(DENG_GUAN_QUE_LOU.replace("层楼", "层天"))
    assert not r["compliant"]
    [v] = r["violations"]
    # One rhyme each way: the first rhyme (流) sets the group, so the last line is the one flagged.
    assert (v["line"], v["position"], v["char"], v["kind"]) == (3, 4, "天", "rhyme")
    assert "十一尤" in v["message"] and "一先" in v["message"]


def test_broken_tone_names_position():
    r = check(JUE_JU[:1] + ["一行白鹭下青天"] + JUE_JU[2:])  # fine: 下 is 仄 like 上
    assert r["compliant"]
    r = check(JUE_JU[:1] + ["一行白鹭飞青天"] + JUE_JU[2:])  # 飞 is 平 where 仄 is required
    assert not r["compliant"]
    [v] = r["violations"]
    assert (v["line"], v["position"], v["char"], v["kind"]) == (1, 4, "飞", "tone")
    assert "line 2, character 5" in v["message"]


def test_repeated_rhyme():
    r = check("白日依山尽，黄河入海流。欲穷千里目，更上一层流。")
    kinds = {(v["line"], v["position"], v["kind"]) for v in r["violations"]}
    assert (3, 4, "repeated_rhyme") in kinds


def test_unknown_character_at_a_tone_position():
    r = check("白日依山尽，黄河入海流。欲穷千里目，更上这层楼。")  # 这: not in 平水韵
    [v] = r["violations"]
    assert (v["line"], v["position"], v["char"], v["kind"]) == (3, 2, "这", "unknown")


def test_traditional_title_and_list_input():
    r = check("登鸛雀樓\n白日依山盡，黃河入海流。欲窮千里目，更上一層樓。")
    assert r["compliant"] and r["title"] == "登鸛雀樓"
    assert r["lines"][0]["text"] == "白日依山盡"  # reported as written


def test_explicit_form_and_pattern():
    r = check(DENG_GUAN_QUE_LOU, form="wujue", pattern="五绝仄起首句入韵")
    assert r["pattern"] == "五绝仄起首句入韵" and not r["compliant"]
    r = check(DENG_GUAN_QUE_LOU, form="qijue")
    assert [v["kind"] for v in r["violations"]] == ["length"] and not r["compliant"]


def test_ci_recut_by_character_count():
    # The same 菩萨蛮 punctuated differently still lines up by its 44 characters.
    r = check(PU_SA_MAN.replace("，", "").replace("。", "").replace("？", ""), form="ci:菩萨蛮")
    assert r["compliant"]


@pytest.mark.parametrize("text", ["", "   ", "hello world", "白日依山尽 hello", 123, "明" * 3000])
def test_bad_input(text):
    with pytest.raises(PoemError) as e:
        check(text)
    assert e.value.param == "text" and e.value.status == 400


def test_undetectable_form():
    with pytest.raises(PoemError) as e:
        check("明月松间照，清泉石上流。")
    assert e.value.param == "form" and "wujue" in str(e.value)


def test_xinyun():
    pytest.importorskip("pypinyin")
    # 平水韵 compliant, and also in 中华新韵: 流/楼 in 七尤; 白 is bái (平) at a free position.
    r = check(DENG_GUAN_QUE_LOU, rhyme_scheme="xinyun")
    assert r["rhyme_scheme"] == "xinyun" and r["rhyme_group"] == "七尤平"
    # 深/心 are shen/xin: 九文 in 中华新韵 (they were 十二侵 in 平水韵).
    r = check("国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。", rhyme_scheme="xinyun")
    assert r["rhyme_group"] == "九文平"


def test_pattern_names_its_form():
    r = check(DENG_GUAN_QUE_LOU, pattern="五绝仄起首句不入韵")
    assert r["form"] == "wujue" and r["compliant"]
    with pytest.raises(PoemError) as e:
        check(DENG_GUAN_QUE_LOU, pattern="五绝无此格")
    assert e.value.param == "pattern"
    with pytest.raises(PoemError) as e:
        check(DENG_GUAN_QUE_LOU, top_k=0)
    assert e.value.param == "top_k"


def test_aojiu_the_licensed_departures_are_accepted_and_named():
    # 孟浩然《宿建德江》: 移舟泊烟渚 is 平平仄平仄 for 平平平仄仄 — 特拗.
    r = check("移舟泊烟渚，日暮客愁新。野旷天低树，江清月近人。")
    assert r["compliant"] and [n["kind"] for n in r["notes"]] == ["特拗"]
    # 李商隐《登乐游原》: 向晚意不适 breaks 仄仄平平仄 at 3 and 4; 驱车登古原 rescues it (对句救).
    r = check("向晚意不适，驱车登古原。夕阳无限好，只是近黄昏。")
    assert r["compliant"] and "对句救" in [n["kind"] for n in r["notes"]]
    assert all(c["ok"] for c in r["lines"][0]["chars"]) and r["lines"][0]["chars"][2].get("licensed")
    # 平平仄仄平 with a 仄 first character is 孤平 — unless the third turns 平 (孤平自救).
    rescued = check("白日依山尽，大河天海流。欲穷千里目，更上一层楼。")
    assert rescued["compliant"] and [n["kind"] for n in rescued["notes"]] == ["孤平自救"]
    lonely = check("白日依山尽，大河入海流。欲穷千里目，更上一层楼。")
    assert not lonely["compliant"] and not lonely["notes"]
    [v] = lonely["violations"]
    assert (v["line"], v["position"], v["char"]) == (1, 0, "大")
    # 拗 with no rescue in the next line stays a violation.
    unrescued = check("向晚意不适，驱车入古原。夕阳无限好，只是近黄昏。", form="wujue", pattern="五绝仄起首句不入韵")
    assert not unrescued["compliant"] and (0, 2) in {(v["line"], v["position"]) for v in unrescued["violations"]}


def test_a_lushi_reports_whether_its_middle_couplets_are_parallel():
    chunwang = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
    r = check(chunwang)
    assert [c["name"] for c in r["couplets"]] == ["颔联", "颈联"]
    assert all(c["parallel"] and not c["shared"] for c in r["couplets"]), r["couplets"]
    # the same middle couplet as 低头 / 举头: a character in both lines is never 对仗
    broken = chunwang.replace("感时花溅泪，恨别鸟惊心", "举头望明月，低头思故乡")
    first = check(broken, form="wulv")["couplets"][0]
    assert not first["parallel"] and first["shared"] == ["头"]
    assert check("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")["couplets"] == []  # a 绝句 has none
