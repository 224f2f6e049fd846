"""Music through the real server: /api/music (JSON and SSE), /check, /render, stored tunes in every
format, .abc uploads and a training job, and the bad input around all of them."""

import io
import json
import wave

import pytest

from atelier.music.abc import parse
from test_jobs import upload, wait_for

# Two tunes written for these tests (a jig with a pickup and endings, a waltz).
JIG = """X:1
T:Test Jig
M:6/8
L:1/8
Q:3/8=110
K:D
A|:"D"dfe dcB|"G"BAG "A7"FGA|"D"dfe dcB|[1"A7"ABc "D"d2A:|[2"A7"ABc "D"d3||
"""
WALTZ = """X:2
T:Test Waltz
M:3/4
L:1/8
K:G
"G"G2 B2 d2|"C"e4 c2|"D7"A2 F2 D2|"G"G6|]
"""


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_tunes_parse_scan_and_repeat_by_seed(http):
    body = {"meter": "6/8", "key": "D", "seed": 3, "n": 2, "title": "Morning"}
    a = http.post("/api/music", json=body)
    assert a.status_code == 200, a.text
    a = a.json()
    assert a["model"].startswith("folk-tunes@") and [t["seed"] for t in a["tunes"]] == [3, 4]
    for tune in a["tunes"]:
        report = tune["report"]
        assert report["valid"] and report["wrong_bars"] == [] and report["bars"] == 16  # AABB: 2 × 8 bars
        assert report["meter"] == "6/8" and report["key"] == "D" and report["repeats"] >= 2
        assert report["tempo"] == 165  # no Q: the tempo a rendering plays (a dotted quarter = 110)
        assert tune["abc"].startswith("X:1\nT:Morning\nM:6/8\nL:1/8\nK:D\n")
        assert parse(tune["abc"]).ok  # our own reader agrees, from the text alone
    again = http.post("/api/music", json=body).json()
    assert [t["abc"] for t in again["tunes"]] == [t["abc"] for t in a["tunes"]]  # byte for byte
    other = http.post("/api/music", json=body | {"seed": 5}).json()
    assert other["tunes"][0]["abc"] != a["tunes"][0]["abc"]


@pytest.mark.parametrize("meter, key, bars", [("4/4", "G", 8), ("3/4", "Em", 12), ("2/4", "A", 6), ("9/8", "D", 4)])
def test_meters_keys_and_lengths(http, meter, key, bars):
    out = http.post("/api/music", json={"meter": meter, "key": key, "bars": bars, "seed": 1, "chords": False})
    assert out.status_code == 200, out.text
    tune = out.json()["tunes"][0]
    assert tune["report"]["valid"] and tune["report"]["bars"] == bars and tune["report"]["meter"] == meter
    assert '"' not in tune["abc"].split("K:", 1)[1]  # chords: false leaves no chord symbols


def test_modes_prime_and_unit(http):
    out = http.post("/api/music", json={"key": "Ador", "meter": "4/4", "bars": 8, "seed": 2, "unit": "1/16",
                                        "prime": "A2B2 c2d2|"}).json()["tunes"][0]
    assert "K:Ador" in out["abc"] and "L:1/16" in out["abc"] and out["report"]["valid"]
    music = out["abc"].split("K:Ador\n", 1)[1]
    assert music.startswith("A2B2 c2d2|")  # the prime (half a bar of sixteenths: a pickup), kept as written


def test_streaming_sends_bars_then_the_tune(http):
    with http.stream("POST", "/api/music", json={"meter": "4/4", "key": "D", "bars": 8, "seed": 4,
                                                  "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [(block.split("\n")[0][7:], block.split("\n")[1][6:]) for block in text.strip().split("\n\n")
              if block.startswith("event:")]
    bars = [json.loads(d) for e, d in events if e == "bar"]
    tunes = [json.loads(d) for e, d in events if e == "tune"]
    assert len(bars) >= 8 and bars[-1]["abc"].count("|") >= bars[0]["abc"].count("|")
    assert len(tunes) == 1 and tunes[0]["report"]["valid"] and text.rstrip().endswith("data: [DONE]")
    plain = http.post("/api/music", json={"meter": "4/4", "key": "D", "bars": 8, "seed": 4}).json()
    assert plain["tunes"][0]["abc"] == tunes[0]["abc"]


def test_a_client_that_leaves_stops_its_tune(http, server):
    """A streamed tune whose client hangs up is abandoned at its next bar line: nothing is stored."""
    import time

    import httpx

    def melodies():
        return len(http.get("/api/artifacts", params={"kind": "melody", "limit": 100}).json()["data"])

    before = melodies()
    headers = {"Authorization": http.headers["Authorization"]}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c, \
            c.stream("POST", "/api/music", json={"meter": "4/4", "bars": 48, "seed": 11, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("event: bar"):
                break  # leave after the first bar
    time.sleep(3)  # the whole tune takes about a second to write; an abandoned one is never stored
    assert melodies() == before
    assert http.post("/api/music", json={"bars": 4, "seed": 1}).status_code == 200  # the model is free again


def test_stored_tune_in_every_format(http):
    tune = http.post("/api/music", json={"bars": 4, "meter": "4/4", "seed": 9}).json()["tunes"][0]
    url = f"/api/artifacts/{tune['artifact_id']}/content"
    assert tune["urls"]["mid"] == f"{url}?format=mid"
    assert http.get(url).text == tune["abc"] and http.get(url).headers["content-type"].startswith("text/vnd.abc")
    assert http.get(url, params={"format": "abc"}).text == tune["abc"]
    assert http.get(url, params={"format": "mid"}).content[:4] == b"MThd"
    wav = http.get(url, params={"format": "wav"})
    assert wav.headers["content-type"] == "audio/wav" and wav.content[:4] == b"RIFF"
    assert http.get(url, params={"format": "ogg"}).content[:4] == b"OggS"
    assert error_of(http.get(url, params={"format": "mp3"}), 400)["param"] == "format"
    art = http.get(f"/api/artifacts/{tune['artifact_id']}").json()
    assert art["kind"] == "melody" and art["params"]["seed"] == 9
    assert tune["artifact_id"] in [a["id"] for a in http.get("/api/artifacts", params={"kind": "melody"}).json()["data"]]


def test_check_reports_bars_and_errors_with_line_and_column(http):
    good = http.post("/api/music/check", json={"abc": JIG}).json()
    assert good["valid"] and good["bars"] == 5 and good["pickup"] == "1" and good["endings"] == ["1", "2"]
    assert good["title"] == "Test Jig" and good["tempo"] == 165
    short = JIG.replace('"G"BAG "A7"FGA', '"G"BAG "A7"FG')
    report = http.post("/api/music/check", json={"abc": short}).json()
    assert not report["valid"] and report["wrong_bars"] == [2]
    wrong = next(b for b in report["bar_lengths"] if not b["ok"])
    assert (wrong["line"], wrong["length"], wrong["expected"], wrong["status"]) == (7, "5", "6", "short")
    e = error_of(http.post("/api/music/check", json={"abc": JIG.replace("dcB|[1", "dc#B|[1")}), 400)
    assert e["param"] == "abc" and e["code"] == "abc_parse_error" and "line 7, column 39" in e["message"]
    e = error_of(http.post("/api/music/check", json={"abc": "X:1\nT:no key\nM:4/4\nABcd|"}), 400)
    assert "K:" in e["message"]


def test_render_formats_and_limits(http, server):
    mid = http.post("/api/music/render", json={"abc": WALTZ, "format": "mid"})
    assert mid.status_code == 200 and mid.content[:4] == b"MThd" and mid.headers["content-type"] == "audio/midi"
    wav = http.post("/api/music/render", json={"abc": WALTZ, "format": "wav", "instrument": "flute", "transpose": 2})
    with wave.open(io.BytesIO(wav.content)) as w:
        seconds = w.getnframes() / w.getframerate()
    assert 4 < seconds < 8  # four bars of 3/4 at the default waltz tempo, plus the ring-out
    assert http.post("/api/music/render", json={"abc": WALTZ, "format": "ogg"}).content[:4] == b"OggS"
    assert error_of(http.post("/api/music/render", json={"abc": WALTZ, "instrument": "kazoo"}), 400)["param"] == "instrument"
    assert error_of(http.post("/api/music/render", json={"abc": WALTZ, "transpose": 40}), 400)["param"] == "transpose"
    long = WALTZ.replace('"G"G6|]', '"G"G6|' * 400 + "]")
    e = error_of(http.post("/api/music/render", json={"abc": long, "format": "wav"}), 400)
    assert e["code"] in ("render_too_long", "tune_too_long")


@pytest.mark.parametrize("body, param", [
    ({"meter": "7/9"}, "meter"),
    ({"meter": "5/4"}, "meter"),  # a meter the model never saw
    ({"key": "H"}, "key"),
    ({"bars": 0}, "bars"),
    ({"bars": 10_000}, "bars"),
    ({"bars": 8, "form": "AABB"}, "bars"),
    ({"form": "ABAC"}, "form"),
    ({"n": 10_000}, "n"),
    ({"unit": "1/7"}, "unit"),
    ({"prime": "A2 B2 #c|"}, "prime"),
    ({"prime": "ABCDEFGAB|"}, "prime"),  # a bar too long for 6/8
    ({"temperature": 3}, "temperature"),
    ({"colour": "blue"}, "colour"),
    ({"model": "tang-poet"}, "model"),
])
def test_bad_requests_are_400_naming_the_field(http, body, param):
    e = error_of(http.post("/api/music", json=body), 400)
    assert e["param"] == param or param in e["message"], e


def test_prime_error_names_the_column(http):
    e = error_of(http.post("/api/music", json={"prime": "A2 B2 #c|"}), 400)
    assert "column 7" in e["message"]


def test_abc_upload_is_checked_and_trains_a_model(http, client):
    bad = error_of(http.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("tunes.abc", (JIG + "\n" + WALTZ.replace("G2 B2", "G2 #B2")).encode())}), 400)
    assert "tune 2" in bad["message"] and "line 14" in bad["message"]
    f = upload(client, "tunes.abc", (JIG + "\n" + WALTZ).encode())
    assert f.model_extra["format"] == "abc" and f.model_extra["records"] == 2
    job = client.fine_tuning.jobs.create(model="abc-gpt", training_file=f.id, suffix="mine",
                                         hyperparameters={"n_embd": 16, "n_layer": 1, "n_head": 2, "context": 64,
                                                          "max_steps": 4, "batch_size": 2})
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done
    made = done.fine_tuned_model
    tune = http.post("/api/music", json={"model": made, "meter": "6/8", "key": "D", "bars": 4, "seed": 1})
    assert tune.status_code == 200, tune.text
    assert tune.json()["tunes"][0]["report"]["valid"]  # an untrained model still writes tunes that scan
    assert error_of(http.post("/api/music", json={"model": made, "meter": "2/4"}), 400)["param"] == "meter"
