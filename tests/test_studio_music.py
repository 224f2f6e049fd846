"""The studio's Music tab in a real headless Chromium against the real server on loopback.

abcjs (atelier/studio/vendor/abcjs/, which `make test` fetches from npm) engraves the score; the
server composes, checks and renders. The page must work offline: a request to any other origin
fails the test, and so does a JavaScript exception or a Content-Security-Policy refusal.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, admin_http
from test_studio import TIMEOUT_MS, connect, wait_until

COMPOSE_TIMEOUT_MS = 90_000  # the first tune loads the model, on a CPU that may be busy
ABCJS = ROOT / "atelier" / "studio" / "vendor" / "abcjs" / "abcjs-basic-min.js"

JIG = """X:1
T:The Test Jig
M:6/8
L:1/8
K:D
A|dfa afd|gfe edc|dfa afd|gbg fed:|
|:faf gbg|aga fed|faf gbg|afd d2:|
"""
BROKEN = "X:1\nT:Broken\nM:6/8\nL:1/8\nK:D\nA|dfa afd|gQe edc|\n"  # the Q is on line 6, column 12


@pytest.fixture()
def live(server):
    """The session's server (conftest.py): its shipped folk-tunes model writes the tunes."""
    return server


@pytest.fixture()
def page(browser, live):
    """A fresh page on the studio, with the Music tab open and the admin key connected."""
    if not ABCJS.exists():
        pytest.fail(f"{ABCJS.relative_to(ROOT)} is missing: run `make test`, which fetches abcjs from npm first",
                    pytrace=False)
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=live.url, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    pg.on("request", lambda r: errors.append(f"a request left the server: {r.url}")
          if not r.url.startswith((live.url, "blob:", "data:")) else None)
    pg.goto("/studio/#music")
    connect(pg)
    yield pg
    context.close()
    assert not errors, f"errors on the page: {errors}"


def posts(page, path: str) -> list[dict]:
    """Record the JSON bodies the page POSTs to `path` (the list fills as requests go out)."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.method == "POST" and r.url.endswith(path) else None)
    return bodies


def engrave(page, abc: str) -> None:
    page.fill("#music-abc", abc)
    page.wait_for_selector("#music-paper svg .abcjs-note")


def key_signature(page) -> int:
    """How many accidentals the first staff's key signature draws."""
    return page.eval_on_selector("#music-paper svg .abcjs-key-signature", "k => k.querySelectorAll('path').length")


# -- abcjs, served by Atelier --------------------------------------------------------------------


def test_abcjs_is_served_from_the_studio_itself(live):
    with httpx.Client(base_url=live.url, timeout=10) as c:
        r = c.get("/studio/vendor/abcjs/abcjs-basic-min.js")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
        assert r.text.startswith("/*! abcjs_basic v6.7.2 ")
        index = c.get("/studio/").text
    assert '<script defer src="vendor/abcjs/abcjs-basic-min.js"></script>' in index
    assert "media-src 'self' blob:" in r.headers["content-security-policy"]  # the WAV plays from a blob: URL


def test_without_abcjs_the_tab_says_how_to_install_it(browser, live):
    context = browser.new_context(base_url=live.url)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.route("**/vendor/abcjs/abcjs-basic-min.js", lambda route: route.fulfill(status=404, body="not found"))
    pg.goto("/studio/#music")
    text = pg.inner_text("#music-paper .music-missing")
    assert "abcjs is not installed" in text and "make serve" in text
    pg.fill("#music-abc", JIG)  # editing still works: the tab is usable, without a score
    wait_until(pg, "!document.querySelector('#music-play').disabled")
    assert not errors
    context.close()


# -- the score, the check, transposition ---------------------------------------------------------


def test_abc_typed_in_is_engraved_and_a_broken_one_is_checked_with_its_line_and_column(page):
    engrave(page, JIG)
    assert page.locator("#music-paper svg .abcjs-note").count() >= 40
    assert page.locator("#music-paper svg style").count() == 0  # dropped: the CSP would refuse it
    assert "The Test Jig" in page.text_content("#music-paper svg")

    page.fill("#music-abc", BROKEN)
    page.click("#music-check")
    error = page.wait_for_selector("#music-check-out .check-error").inner_text()
    assert "line 6, column 12" in error
    assert page.locator(".banner").count() == 0  # the answer to Check, not a failure
    caret = page.evaluate("(() => { const t = document.querySelector('#music-abc'); return t.selectionStart; })()")
    assert BROKEN[caret] == "Q"

    page.fill("#music-abc", JIG)
    page.click("#music-check")
    assert "every one scans" in page.wait_for_selector("#music-check-out .check-ok.ok").inner_text()
    assert "✓ valid" in page.inner_text("#music-report .verdict")


def test_wrong_bars_are_marked_in_the_report_and_the_score(page):
    short = JIG.replace("gfe edc|", "gfe ed|")  # bar 2 is a unit short
    engrave(page, short)
    page.click("#music-check")
    page.wait_for_selector("#music-check-out .check-ok.bad")
    assert "✗ 1 bar does not scan" in page.inner_text("#music-report .verdict")
    assert "bar 2 (line 6, column 11) is short" in page.inner_text("#music-report .wrong-bars")
    assert page.locator("#music-paper svg .wrong-bar").count() >= 5  # its notes, in red


def test_transpose_redraws_the_key_signature(page):
    engrave(page, JIG)
    assert key_signature(page) > 0
    d_major = page.inner_html("#music-paper svg .abcjs-key-signature")
    page.click("#music-up")  # D → E♭: two sharps become three flats
    wait_until(page, "document.querySelector('#music-paper').dataset.transpose === '1'")
    assert page.inner_text("#music-transpose") == "+1"
    assert page.inner_html("#music-paper svg .abcjs-key-signature") != d_major
    e_flat = key_signature(page)
    page.click("#music-down")
    page.click("#music-down")  # D → C♯ or D♭
    wait_until(page, "document.querySelector('#music-paper').dataset.transpose === '-1'")
    assert page.inner_text("#music-transpose") == "-1"
    page.click("#music-up")
    wait_until(page, "document.querySelector('#music-paper').dataset.transpose === '0'")
    assert page.inner_html("#music-paper svg .abcjs-key-signature") == d_major
    assert e_flat != key_signature(page)

    with page.expect_download() as download:  # the ABC text follows the view
        page.click("#music-up")
        page.click("[data-download=abc]")
    abc = Path(download.value.path()).read_text()
    assert download.value.suggested_filename == "the-test-jig+1.abc"
    assert "K:Eb" in abc and "B|egb bge|" in abc


# -- sound and downloads -------------------------------------------------------------------------


def test_play_renders_the_wav_and_the_highlight_follows(page):
    renders = posts(page, "/api/music/render")
    engrave(page, JIG)
    page.click("#music-up")
    page.click("#music-play")
    page.wait_for_selector("#music-paper svg .playing")
    page.wait_for_selector("#music-paper svg line.music-cursor", state="attached")  # a line: no area to be "visible"
    assert renders and renders[-1]["format"] == "wav" and renders[-1]["transpose"] == 1
    assert renders[-1]["abc"] == JIG and renders[-1]["instrument"] == "fiddle"
    assert renders[-1]["tempo"] == 180  # abcjs's default for 6/8 (no Q:): the sound and the highlight agree
    wait_until(page, "document.querySelector('#music-audio').currentTime > 0.3")
    assert page.get_attribute("#music-audio", "src").startswith("blob:")
    page.click("#music-stop")
    assert page.locator("#music-paper svg .playing").count() == 0
    assert page.evaluate("document.querySelector('#music-audio').paused")


def test_midi_download_is_rendered_by_the_server(page):
    renders = posts(page, "/api/music/render")
    engrave(page, JIG)
    with page.expect_download() as download:
        page.click("[data-download=mid]")
    data = Path(download.value.path()).read_bytes()
    assert data[:4] == b"MThd"
    assert download.value.suggested_filename == "the-test-jig.mid"
    assert renders[-1]["format"] == "mid" and renders[-1]["transpose"] == 0


# -- generation (needs the music model) ------------------------------------------------------------


def test_generate_a_jig_in_d_then_continue_it_and_find_it_in_the_gallery(page, live):
    generated = posts(page, "/api/music")
    form = "#music-form"
    page.select_option(f"{form} [name=meter]", "6/8")
    page.select_option(f"{form} [name=key]", "D")
    page.fill(f"{form} [name=title]", "Studio Jig")
    page.fill(f"{form} [name=seed]", "7")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#music-state[data-state=done]", timeout=COMPOSE_TIMEOUT_MS)
    page.wait_for_selector("#music-paper svg .abcjs-note")
    assert generated[-1]["model"] == "folk-tunes" and generated[-1]["form"] == "AABB"
    assert generated[-1]["meter"] == "6/8" and generated[-1]["key"] == "D" and generated[-1]["seed"] == 7
    abc = page.input_value("#music-abc")
    assert re.search(r"^M:6/8$", abc, re.MULTILINE) and re.search(r"^K:D", abc, re.MULTILINE) and "T:Studio Jig" in abc
    assert "✓ valid" in page.inner_text("#music-report .verdict")
    assert page.locator("#music-paper svg .abcjs-note").count() >= 16
    assert page.get_attribute(f"{form} [name=tempo]", "placeholder") == "auto (165)"  # the server's 6/8 tempo
    with admin_http(live) as http:  # the same request through the API: the same tune, byte for byte
        r = http.post("/api/music", json=generated[-1])
    assert r.status_code == 200, r.text
    assert r.json()["tunes"][0]["abc"] == abc
    artifact = r.json()["tunes"][0]["artifact_id"]

    with page.expect_response(lambda r: r.url.endswith("/api/music") and r.request.method == "POST",
                              timeout=COMPOSE_TIMEOUT_MS) as continued:
        page.click("#music-continue")  # a new tune that opens with this one's first bars
    assert continued.value.status == 200
    page.wait_for_selector("#music-state[data-state=done]", timeout=COMPOSE_TIMEOUT_MS)
    prime = generated[-1]["prime"]
    assert prime.count("|") >= 4 and prime in abc
    assert generated[-1]["meter"] == "6/8" and generated[-1]["key"] == "D"
    assert "✓ valid" in page.inner_text("#music-report .verdict")

    page.click("[data-tab=gallery]")
    page.select_option("#gallery-filters [name=kind]", "melody")
    tile = page.wait_for_selector(f"#gallery-grid .tile[data-id='{artifact}'] .tune-thumb")
    assert "Studio Jig" in tile.inner_text()
    page.click(f"#gallery-grid .tile[data-id='{artifact}']")
    page.wait_for_selector(f"#gallery-detail[data-id='{artifact}'] .open-in-music")
    with page.expect_download() as download:
        page.click("#gallery-detail [data-format=mid]")
    assert Path(download.value.path()).read_bytes()[:4] == b"MThd"
    page.click("#gallery-detail .open-in-music")
    page.wait_for_selector("#tab-music:not([hidden]) #music-paper svg .abcjs-note")
    assert page.input_value("#music-abc") == abc
    page.wait_for_selector("#music-check-out .check-ok.ok")  # checked again: the report is not stored
    assert "✓ valid" in page.inner_text("#music-report .verdict")
