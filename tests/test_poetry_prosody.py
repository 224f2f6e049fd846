"""Prosody tables and form specs: spot checks against the textbook facts."""

import pytest

from atelier.poetry import FORMS, PoemError
from atelier.poetry.corpus import default_index
from atelier.poetry.forms import get_form
from atelier.poetry.prosody import cilin, pingshui, tables


def names(table, ch):
    return {table.groups[i].name for i in table.groups_of(ch)}


def test_pingshui_spot_checks():
    p = pingshui()
    assert len(p.groups) == 106
    assert names(p, "空") == {"一东", "一董", "一送"}
    assert names(p, "看") == {"十四寒", "十五翰"}
    assert names(p, "思") == {"四支", "四寘"}
    assert names(p, "长") == {"七阳", "二十二养", "二十三漾"}
    assert p.tones("看") == {"平", "仄"} and p.tones("思") == {"平", "仄"}
    assert p.tones("东") == {"平"} and p.tones("月") == {"仄"}
    assert names(p, "東") == {"一东"}  # traditional characters are in the same index


def test_unknown_is_not_ze():
    p = pingshui()
    assert p.tones("这") == frozenset()  # a modern character: unknown, not 仄
    assert p.tones("A") == frozenset()


def test_supplement_fills_common_gaps():
    p = pingshui()
    assert names(p, "溪") == {"八齐"}  # the table spells it 谿
    assert names(p, "啼") == {"八齐"} and names(p, "沉") == {"十二侵"}


def test_find_rhyme_group_by_any_name():
    p = pingshui()
    assert p.find("一东").name == p.find("一東").name == p.find("东").name == "一东"
    with pytest.raises(PoemError) as e:
        p.find("一冻")
    assert e.value.param == "rhyme" and "一东" in str(e.value)


def test_cilin_parts():
    c = cilin()
    assert len(c.groups) == 33
    assert names(c, "东") == {"第一部平"}
    assert c.find("第七部", tone="仄").name == "第七部仄"
    assert c.find("第十五部").label == "入"


def test_xinyun_readings():
    pytest.importorskip("pypinyin")
    tones, rhymes = tables("xinyun", "shi")
    assert names(rhymes, "东") == {"十一庚平"}
    assert names(rhymes, "诗") == {"十三支平"}  # shi: the apical -i
    assert names(rhymes, "绿") >= {"十二齐仄"}  # lü
    assert tones.tones("月") == {"仄"} and tones.tones("花") == {"平"}


def test_unknown_scheme():
    with pytest.raises(PoemError) as e:
        tables("pinyin", "shi")
    assert e.value.param == "rhyme_scheme"


def test_jinti_forms():
    for key, title in [("wujue", "五绝"), ("qijue", "七绝"), ("wulv", "五律"), ("qilv", "七律")]:
        f = FORMS[key]
        assert len(f.patterns) == 4 and f.title == title
        n = 4 if key.endswith("jue") else 8
        size = 5 if key.startswith("wu") else 7
        assert all(p.lengths == (size,) * n for p in f.patterns)
    p = FORMS["qijue"].pattern("七绝仄起首句入韵")
    assert [l.tones for l in p.lines] == ["中仄平平仄仄平", "中平中仄仄平平", "中平中仄平平仄", "中仄平平仄仄平"]
    assert [l.rhyme for l in p.lines] == ["A", "A", None, "A"]
    assert [l.end for l in p.lines] == ["，", "。", "，", "。"]


def test_ci_forms():
    ci = [f for f in FORMS.values() if f.kind == "ci"]
    assert len(ci) >= 10
    pusa = FORMS["ci:菩萨蛮"].patterns[0]
    assert pusa.keys == {"A": "仄", "B": "平", "C": "仄", "D": "平"}  # 换韵 four times
    xijiang = FORMS["ci:西江月"].patterns[0]
    assert [l.ye for l in xijiang.lines].count(True) == 2  # 叶韵 at the end of each stanza
    assert xijiang.rhyme_tone(3) == "仄" and xijiang.keys["A"] == "平"
    rumeng = FORMS["ci:如梦令"].patterns[0]
    assert rumeng.lengths == (6, 6, 5, 6, 2, 2, 6)
    assert rumeng.lines[5].repeat == ((0, (4, 0)), (1, (4, 1)))  # 如梦，如梦
    changxiang = FORMS["ci:长相思"].patterns[0]
    assert changxiang.lines[1].repeat == ((2, (0, 2)),)  # 汴水流，泗水流: only the rhyme repeats


def test_get_form_errors():
    assert get_form("七绝").key == "qijue"
    with pytest.raises(PoemError) as e:
        get_form("sonnet")
    assert e.value.param == "form" and e.value.status == 400 and "ci:浣溪沙" in str(e.value)
    with pytest.raises(PoemError) as e:
        get_form("浣溪沙")
    assert "ci:浣溪沙" in str(e.value)


def test_corpus_index():
    index = default_index()
    assert len(index) > 500_000
    assert "白日依山尽" in index and "春眠不觉晓，处处闻啼鸟。" in index
    assert "云梯上碧霄汉" not in index
