"""The ABC reader, canonical tokens, transposition and the bar-keeping mask, without a server.

The mask is tried the hard way: random walks that pick any allowed token (no model to steer
them towards sense) must never reach a dead end, and every tune they finish must parse, scan,
have the bars asked for and end on the tonic.
"""

import random
from fractions import Fraction

import pytest

from atelier.families.shipped import SHIPPED_DIR
from atelier.music.abc import AbcError, parse, parse_many
from atelier.music.constraints import Plan, Vocabulary, scanner_for
from atelier.music.score import performance
from atelier.music.theory import parse_key
from atelier.music.tokens import AbcTokenizer, canonical, tokenize, transpose, write_abc

TOKENIZER = AbcTokenizer.load(SHIPPED_DIR / "folk-tunes" / "tokenizer.json")
VOCAB = Vocabulary.of(TOKENIZER.tokens, TOKENIZER.eos_id)

REEL = """X:3
T:Test Reel
M:4/4
L:1/8
K:G
|:"G"GABc dBAG|"C"E2c2 "D7"A>Bc<d|"G"(3BAG (3ABc d2G2|[1"D7"=F2A2 A4:|[2"D7"^F2A2 G4||
"""


# -- the reader ---------------------------------------------------------------------------------

def test_lengths_follow_broken_rhythm_tuplets_chords_and_the_unit():
    tune = parse(REEL)
    durations = {(t.text, str(t.duration)) for t in tune.tokens if t.kind == "note"}
    assert ("A", "3/16") in durations and ("B", "1/16") in durations  # A>B
    assert ("B", "1/12") in durations  # (3BAG
    assert tune.ok and [b.number for b in tune.bars] == [1, 2, 3, 4, 5]
    assert parse("X:1\nM:2/4\nK:C\n[CEG]2 [DF]2|").bars[0].length == 4  # no L: in 2/4 means 1/16


@pytest.mark.parametrize("abc, line, col, words", [
    ("X:1\nM:4/4\nK:C\nAB#c d4|", 4, 3, "'#' is not ABC music"),
    ("X:1\nM:4/4\nK:C\nAB\"G c4|", 4, 3, "not closed"),
    ("X:1\nM:4/4\nK:C\nA//3 B4|", 4, 2, "not a note length"),
    ("X:1\nM:4/4\nK:C\n(3AB|c4|", 4, 5, "tuplet"),
    ("X:1\nM:4/4\nK:Xq\nABCD|", 0, 0, "K:Xq"),
    ("X:1\nM:13/7\nK:C\nABCD|", 0, 0, "not a meter"),
])
def test_errors_name_line_and_column(abc, line, col, words):
    with pytest.raises(AbcError) as e:
        parse(abc)
    assert (e.value.line, e.value.col) == (line, col) and words in str(e.value)


def test_pickups_closing_bars_and_wrong_bars():
    jig = "X:1\nM:6/8\nL:1/8\nK:D\nA|dfe dcB|AFD D2:|\n"
    report = parse(jig).report()
    assert report["valid"] and report["pickup"] == "1" and report["bars"] == 2
    assert [b["status"] for b in report["bar_lengths"]] == ["pickup", "ok", "closing"]
    wrong = parse(jig.replace("dfe dcB", "dfe dc")).report()
    assert not wrong["valid"] and wrong["wrong_bars"] == [1]


def test_an_upload_names_the_tune_that_fails():
    with pytest.raises(AbcError) as e:
        parse_many(REEL + "\n" + REEL.replace("X:3", "X:4").replace("GABc", "GA&c"))
    assert e.value.tune == 2 and e.value.line == 13 and e.value.col == 8


# -- canonical tokens and transposition ------------------------------------------------------------

def test_canonical_round_trip_and_units():
    text = canonical(parse(REEL))
    assert text.startswith("M:4/4\nK:G\n|:") and "A3/2B/2c/2d3/2" in text and "(3BAG" in text  # > and < written out
    assert canonical(parse(write_abc(text))) == text
    assert tokenize(text)[:5] == ["M:4/4", "\n", "K:G", "\n", "|:"]
    sixteenths = write_abc(text, unit=Fraction(1, 16))
    assert "L:1/16" in sixteenths and "E4c4" in sixteenths and canonical(parse(sixteenths)) == text


def test_transposition_keeps_every_pitch_moved_by_the_interval():
    text = canonical(parse(REEL))
    for semitones in (-5, -1, 2, 6):
        moved = transpose(text, semitones)
        before = [n.pitch for n in performance(parse(write_abc(text))).notes]
        after = [n.pitch for n in performance(parse(write_abc(moved))).notes]
        assert after == [p + semitones for p in before], semitones
    assert "K:A" in transpose(text, 2) and '"E7"' in transpose(text, 2)  # D7 → E7


# -- the mask -------------------------------------------------------------------------------------

PLANS = [("6/8", "D", Plan(form="AABB")), ("4/4", "G", Plan(form="AABB")), ("3/4", "Em", Plan(bars=12, form=None)),
         ("2/4", "A", Plan(bars=5, form=None)), ("9/8", "D", Plan(bars=4, form=None)), ("3/2", "F", Plan(bars=1, form=None)),
         ("2/2", "Bb", Plan(bars=24, form=None)), ("6/8", "Am", Plan(form="AABB", chords=False))]


@pytest.mark.parametrize("meter, key, plan", PLANS)
def test_random_walks_never_stick_and_always_scan(meter, key, plan):
    for seed in range(25):
        rng = random.Random(seed)
        scanner = scanner_for(VOCAB, TOKENIZER.tokens, Fraction(*map(int, meter.split("/"))), parse_key(key), plan)
        ids = []
        while True:
            allowed = [i for i, ok in enumerate(scanner.allowed()) if ok]
            assert allowed, f"dead end after {TOKENIZER.decode(ids)!r}"
            token = rng.choice(allowed)
            if token == TOKENIZER.eos_id:
                break
            scanner.feed(token)
            ids.append(token)
            assert len(ids) < 3000
        text = f"M:{meter}\nK:{key}\n" + TOKENIZER.decode(ids)
        tune = parse(write_abc(text))
        report = tune.report()
        assert report["valid"], (seed, write_abc(text), report["wrong_bars"])
        assert report["bars"] == (16 if plan.form == "AABB" else plan.bars), (seed, write_abc(text))
        assert performance(tune).notes[-1].pitch % 12 == parse_key(key).tonic_pitch_class
        if plan.form == "AABB":
            assert text.count(":|") == 2 and "[1" not in text
        if not plan.chords:
            assert '"' not in text


def test_real_tunes_pass_the_mask_token_by_token():
    for abc in (REEL, "X:1\nM:6/8\nL:1/8\nK:D\nA|:dfe dcB|AFD D2:|\n"):
        tokens = tokenize(canonical(parse(abc)))
        meter = Fraction(*map(int, tokens[0][2:].split("/")))
        scanner = scanner_for(VOCAB, TOKENIZER.tokens, meter, parse_key(tokens[2][2:]), Plan(bars=100, form=None))
        for t in tokens[4:]:
            assert scanner.allowed()[TOKENIZER.index[t]], (abc, t)
            scanner.feed(TOKENIZER.index[t])


def test_the_mask_refuses_what_would_not_scan():
    scanner = scanner_for(VOCAB, TOKENIZER.tokens, Fraction(6, 8), parse_key("D"), Plan(form="AABB"))
    for t in tokenize("dfe dcB|dfe dc"):
        scanner.feed(TOKENIZER.index[t])
    allowed = {TOKENIZER.tokens[i] for i, ok in enumerate(scanner.allowed()) if ok}
    assert "|" not in allowed and "4" not in allowed  # five eighths in bar 1: no bar line yet, no note of four
    assert "^f" not in allowed and "^F" not in allowed  # restating the key signature
    assert "^d" in allowed and "2" in allowed
