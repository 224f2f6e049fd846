"""The studio (atelier/studio/) in a real headless Chromium against the real server on loopback.

Debian's /usr/bin/chromium is driven by Playwright (`make test` installs it; Playwright's own
browser download is never used). One browser for the session, a fresh context per test; a
JavaScript exception on the page fails the test that caused it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from atelier.images.png import read_png_text
from atelier.jobs import store
from atelier.storage.db import Job
from conftest import ADMIN_KEY, admin_http

TIMEOUT_MS = 15_000


@pytest.fixture()
def page(browser, image_server):
    """A fresh page on the studio of the image server (tiny image models + the shipped ones)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=image_server.url)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    pg.goto("/studio/")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def wait_until(page, expression: str) -> None:
    """page.wait_for_function without its in-page eval, which the studio's CSP refuses: poll page.evaluate."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def connect(page, key: str = ADMIN_KEY) -> None:
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-status[data-state=ok]")


def options(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(f"{selector} option", "els => els.map(e => e.value)")


def banner(page) -> str:
    page.wait_for_selector(".banner")
    return page.inner_text(".banner")


# -- key, static files --------------------------------------------------------------------


def test_static_files_need_no_key_and_root_redirects(image_server):
    with httpx.Client(base_url=image_server.url, timeout=10) as c:
        root = c.get("/", follow_redirects=False)
        assert root.status_code in (302, 307) and root.headers["location"] == "/studio/"
        index = c.get("/studio/")
        assert index.status_code == 200 and "<title>Atelier studio</title>" in index.text
        js = c.get("/studio/studio.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert c.get("/v1/models").status_code == 401  # the API itself still needs a key


def test_wrong_key_shows_the_error_then_the_right_key_lists_models(page):
    page.fill("#key-input", "atl-not-a-real-key-000000")
    page.click("#key-form button[type=submit]")
    text = banner(page)
    assert "invalid or revoked API key" in text and "HTTP 401" in text
    assert page.get_attribute("#key-status", "data-state") == "bad"
    page.click(".banner .banner-close")
    assert page.locator(".banner").count() == 0

    connect(page)
    status = page.inner_text("#key-status")
    assert "admin" in status and re.search(r"Atelier \d+\.\d+", status)
    assert page.locator(".banner").count() == 0
    text_models = options(page, "#write-form [name=model]")
    image_models = options(page, "#image-model")
    assert "tang-poet" in text_models and "tiny-diffusion" not in text_models
    assert {"tiny-diffusion", "tiny-gan", "emoji-diffusion"} <= set(image_models) and "tang-poet" not in image_models
    # kept for this tab only unless "remember" is ticked; a reload reconnects by itself
    assert page.evaluate("sessionStorage.getItem('atelier.key')") == ADMIN_KEY
    assert page.evaluate("localStorage.getItem('atelier.key')") is None
    page.reload()
    page.wait_for_selector("#key-status[data-state=ok]")


def test_a_generate_key_shows_its_scopes_and_no_promote_buttons(page, image_server):
    with admin_http(image_server) as http:
        secret = http.post("/api/keys", json={"name": "studio-gen", "scopes": ["generate"]}).json()["key"]
    page.check("#key-remember")
    connect(page, secret)
    assert "generate" in page.inner_text("#key-status") and "admin" not in page.inner_text("#key-status")
    assert page.evaluate("localStorage.getItem('atelier.key')") == secret
    page.click("[data-tab=models]")
    page.wait_for_selector(".model[data-model=tang-poet]")
    assert page.locator(".model .promote").count() == 0
    page.click("[data-tab=training]")
    assert "needs a train or admin key" in page.inner_text("#jobs-list")
    assert page.locator(".banner").count() == 0  # what the key cannot do is said once, not as errors


# -- write ----------------------------------------------------------------------------------


def test_write_streams_the_same_text_as_the_api(page, image_server):
    connect(page)
    form = "#write-form"
    page.fill(f"{form} [name=prompt]", "春眠不觉晓，")
    page.fill(f"{form} [name=max_tokens]", "24")
    page.fill(f"{form} [name=seed]", "7")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#write-state[data-state=done]")
    with admin_http(image_server) as http:
        ref = http.post("/v1/completions", json={"model": "tang-poet", "prompt": "春眠不觉晓，", "max_tokens": 24,
                                                 "temperature": 0.8, "top_p": 1, "seed": 7}).json()
    assert page.inner_text("#write-out .prompt") == "春眠不觉晓，"
    assert page.inner_text("#write-out .gen") == ref["choices"][0]["text"]
    usage = page.inner_text("#write-usage")
    assert f"completion tokens\n{ref['usage']['completion_tokens']}" in usage
    assert "tang-poet@1" in usage
    page.click(f"{form} button[type=submit]")  # the same prompt again: a slot holds its keys and values
    page.wait_for_function("() => document.querySelector('#write-usage').innerText.includes('speed')")
    assert "cached prompt tokens\n6" in page.inner_text("#write-usage")  # all but its last token (<bos> + 6)


def test_write_stop_aborts_the_stream(page):
    connect(page)
    form = "#write-form"
    page.fill(f"{form} [name=max_tokens]", "100")
    page.fill(f"{form} [name=seed]", "3")
    # Press Stop as soon as the first text is on screen (from inside the page: no round trip).
    page.evaluate("""() => new MutationObserver((_, obs) => {
        if (document.querySelector('#write-out .gen')?.textContent) { obs.disconnect(); document.querySelector('#write-stop').click(); }
    }).observe(document.querySelector('#write-out'), {subtree: true, childList: true, characterData: true})""")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#write-state[data-state=stopped]")
    assert page.locator(".banner").count() == 0  # stopping is not an error
    assert "completion tokens" not in page.inner_text("#write-usage")
    assert page.is_disabled("#write-stop") and page.is_enabled(f"{form} button[type=submit]")


def test_write_api_error_is_shown_with_its_param(page):
    connect(page)
    page.fill("#write-form [name=prompt]", "   ")
    page.click("#write-form button[type=submit]")
    text = banner(page)
    assert "prompt is empty" in text and "param: prompt" in text and "HTTP 400" in text
    assert page.get_attribute("#write-state", "data-state") == "failed"


# -- poems ----------------------------------------------------------------------------------


def test_compose_a_wujue_shows_four_lines_of_five_and_the_report(page):
    connect(page)
    page.click("[data-tab=poem]")
    page.wait_for_selector("#poem-form-picker option[value='ci:浣溪沙']", state="attached")
    page.select_option("#poem-form-picker", "wujue")
    assert "五绝平起首句入韵" in options(page, "#poem-pattern")
    page.fill("#poem-form [name=acrostic]", "风花雪月")
    page.fill("#poem-form [name=seed]", "1")
    page.click("#poem-form button[type=submit]")
    poem = page.wait_for_selector("#poem-out .poem .verdict")
    lines = page.eval_on_selector_all("#poem-out .pline", "ls => ls.map(l => [...l.querySelectorAll('.ch b')].map(b => b.textContent).join(''))")
    assert [len(line) for line in lines] == [5, 5, 5, 5]
    assert "".join(line[0] for line in lines) == "风花雪月"
    assert "obeys 五绝" in poem.inner_text()
    required = page.eval_on_selector_all("#poem-out .ch i", "els => els.map(e => e.textContent)")
    assert len(required) == 20 and set(required) <= {"平", "仄", "中"}
    assert page.locator("#poem-out .ch.rhyme").count() >= 2  # lines 2 and 4 rhyme at least
    assert page.locator("#poem-out .ch.bad").count() == 0
    assert "韵" in page.inner_text("#poem-out .rhyme-tag >> nth=0")


def test_check_my_poem_marks_the_broken_rhyme_and_suggests(page):
    connect(page)
    page.click("[data-tab=poem]")
    page.fill("#check-form [name=text]", "白日依山尽，黄河入海流。欲穷千里目，更上一层天。")
    page.click("#check-form button[type=submit]")
    verdict = page.wait_for_selector("#check-out .verdict.bad")
    assert "1 violation" in verdict.inner_text()
    bad = page.locator("#check-out .ch.bad")
    assert bad.count() == 1 and bad.get_attribute("data-line") == "3" and bad.get_attribute("data-pos") == "4"
    assert bad.locator("b").inner_text() == "天"
    item = page.inner_text("#check-out .violations li")
    assert "must rhyme in 十一尤" in item and "try" in item
    assert page.locator("#check-out .suggest b").count() >= 1
    # A licensed 拗 (特拗 in 移舟泊烟渚) passes, with the licence named and its characters marked.
    page.fill("#check-form [name=text]", "移舟泊烟渚，日暮客愁新。野旷天低树，江清月近人。")
    page.click("#check-form button[type=submit]")
    page.wait_for_selector("#check-out .verdict.ok")
    assert "特拗" in page.inner_text("#check-out .notes li")
    assert page.locator("#check-out .ch.licensed").count() == 2


# -- images and the gallery ---------------------------------------------------------------


def test_image_stream_previews_then_png_then_gallery_provenance(page, image_server):
    connect(page)
    page.click("[data-tab=images]")
    page.select_option("#image-model", "tiny-diffusion")
    page.wait_for_selector("#image-size option[value='64x64']", state="attached")
    form = "#image-form"
    page.fill(f"{form} [name=prompt]", "grinning cat face")
    page.fill(f"{form} [name=n]", "2")
    page.select_option("#image-size", "32x32")
    page.fill(f"{form} [name=steps]", "6")
    page.fill(f"{form} [name=partial_images]", "2")
    page.fill(f"{form} [name=seed]", "11")
    # Record what the page shows while it streams: progress steps and every image source set.
    page.evaluate("""() => {
        window.seen = {steps: [], srcs: []};
        new MutationObserver(ms => { for (const m of ms) {
            if (m.attributeName === 'data-step') window.seen.steps.push(Number(m.target.dataset.step));
            if (m.attributeName === 'src') window.seen.srcs.push(m.target.src.slice(0, 22));
        } }).observe(document.querySelector('#tab-images'), {attributes: true, subtree: true, attributeFilter: ['src', 'data-step']});
    }""")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#image-state[data-state=done]")
    seen = page.evaluate("window.seen")
    steps = [s for s in seen["steps"] if s]
    assert steps == sorted(steps) and steps[-1] == 6 and len(steps) >= 2
    assert page.get_attribute("#image-progress", "data-total") == "6"
    previews = [s for s in seen["srcs"] if s.startswith("data:image/png")]
    assert len(previews) == 4  # 2 previews × 2 images, shown before the finals
    cards = page.locator("#image-results .result.done")
    assert cards.count() == 2
    assert [cards.nth(i).get_attribute("data-seed") for i in range(2)] == ["11", "12"]
    assert [cards.nth(i).get_attribute("data-previews") for i in range(2)] == ["2", "2"]

    # The final <img> is the real PNG: 32×32, its parameters inside.
    b64 = page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('#image-results .result.done img').src)).blob();
        const bytes = new Uint8Array(await blob.arrayBuffer());
        return btoa(String.fromCharCode(...bytes));
    }""")
    png = base64.b64decode(b64)
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    assert "Seed: 11" in read_png_text(png)["parameters"]

    page.click("#image-results .result.done >> nth=1 >> .reuse-seed")
    assert page.input_value(f"{form} [name=seed]") == "12"

    # Its artifact link opens the gallery on its provenance.
    artifact = cards.nth(0).get_attribute("data-artifact")
    page.click("#image-results .result.done >> nth=0 >> .artifact-link")
    page.wait_for_selector(f"#gallery-detail[data-id='{artifact}'] pre.a1111")
    detail = page.inner_text("#gallery-detail")
    assert "tiny-diffusion@1" in detail and "seed\n11" in detail
    assert hashlib.sha256(png).hexdigest() in detail
    with admin_http(image_server) as http:
        key_id = http.get(f"/api/artifacts/{artifact}").json()["key_id"]
    assert key_id in detail
    a1111 = page.inner_text("#gallery-detail pre.a1111")
    assert a1111.startswith("grinning cat face\n") and "Steps: 6" in a1111 and "Seed: 11" in a1111
    page.wait_for_selector(f"#gallery-grid .tile[data-id='{artifact}'] img")

    # Filters: kind=poem hides the images; the model filter keeps only tiny-diffusion's.
    page.select_option("#gallery-filters [name=kind]", "poem")
    page.wait_for_selector(f"#gallery-grid .tile[data-id='{artifact}']", state="detached")
    assert page.locator("#gallery-grid .tile:not(.kind-poem)").count() == 0
    page.select_option("#gallery-filters [name=kind]", "image")
    page.select_option("#gallery-model", "tiny-diffusion")
    # The artifact's tile is in the grid before the filter's page arrives too: wait for the page itself, a
    # grid of tiny-diffusion's tiles only (a filter that kept others times out here).
    page.wait_for_function("""() => { const bs = [...document.querySelectorAll('#gallery-grid .tile b')];
        return bs.length > 0 && bs.every(b => b.textContent === 'tiny-diffusion@1'); }""")
    page.wait_for_selector(f"#gallery-grid .tile[data-id='{artifact}']")
    models = page.eval_on_selector_all("#gallery-grid .tile b", "bs => bs.map(b => b.textContent)")
    assert models and set(models) == {"tiny-diffusion@1"}

    # "Send to Images" fills the form to re-run it.
    page.click(f"#gallery-grid .tile[data-id='{artifact}']")
    page.wait_for_selector(f"#gallery-detail[data-id='{artifact}'] .send-to-images")
    page.click("#gallery-detail .send-to-images")
    page.wait_for_selector("#tab-images:not([hidden])")
    assert page.input_value("#image-model") == "tiny-diffusion@1"
    assert page.input_value(f"{form} [name=prompt]") == "grinning cat face"
    assert page.input_value(f"{form} [name=seed]") == "11"
    assert page.input_value(f"{form} [name=steps]") == "6"
    assert page.input_value(f"{form} [name=n]") == "1"


def test_gallery_pages_through_artifacts_and_shows_texts_as_cards(page, image_server):
    from atelier.storage.artifacts import create_artifact

    with admin_http(image_server) as http:  # 16 images from the one-step GAN, 4 per request
        for seed in (100, 104, 108, 112):
            r = http.post("/v1/images/generations", json={"model": "tiny-gan", "prompt": "red apple", "n": 4,
                                                          "seed": seed})
            assert r.status_code == 200, r.text
    with image_server.app.state.sessions() as db:  # a text artifact, as a poem would be stored
        poem = create_artifact(db, image_server.app.state.blobs, kind="poem", data="床前明月光，疑是地上霜。".encode(),
                               mime="text/plain", model_ref="tang-poet@1", params={"form": "wujue", "seed": 5})
    connect(page)
    page.click("[data-tab=gallery]")
    page.select_option("#gallery-filters [name=limit]", "12")
    page.select_option("#gallery-model", "tiny-gan")
    wait_until(page, "document.querySelectorAll('#gallery-grid .tile.kind-image').length === 12")
    ids = lambda: page.eval_on_selector_all("#gallery-grid .tile", "ts => ts.map(t => t.dataset.id)")  # noqa: E731
    first = ids()
    assert page.is_disabled("#gallery-newer") and page.is_enabled("#gallery-older")
    page.click("#gallery-older")
    page.wait_for_selector("#gallery-page:text('page 2')")
    second = ids()
    assert len(second) >= 4 and not set(first) & set(second)
    page.click("#gallery-newer")
    page.wait_for_selector("#gallery-page:text('page 1')")
    assert ids() == first

    page.select_option("#gallery-model", "")
    page.select_option("#gallery-filters [name=kind]", "poem")
    card = page.wait_for_selector(f"#gallery-grid .tile[data-id='{poem.id}'] .text-thumb")
    assert "床前明月光" in card.inner_text()
    page.click(f"#gallery-grid .tile[data-id='{poem.id}']")
    page.wait_for_selector(f"#gallery-detail[data-id='{poem.id}']")
    detail = page.inner_text("#gallery-detail")
    assert "床前明月光，疑是地上霜。" in detail and "tang-poet@1" in detail and "wujue" in detail
    assert page.locator("#gallery-detail .send-to-images").count() == 0  # only images re-run


def test_style_transfer_shows_the_result_and_its_losses(page, tmp_path):
    content = tmp_path / "content.png"
    x = [[(2 * i, 4 * j, 128) for i in range(128)] for j in range(64)]
    img = Image.new("RGB", (128, 64))
    img.putdata([p for row in x for p in row])
    img.save(content)
    connect(page)
    page.click("[data-tab=images]")
    page.wait_for_selector("#style-picker option[value=hokusai_great_wave]", state="attached")
    page.set_input_files("#style-form [name=content]", str(content))
    page.select_option("#style-picker", "hokusai_great_wave")
    page.select_option("#style-form [name=size]", "64x64")
    page.fill("#style-form [name=steps]", "5")
    page.click("#style-form button[type=submit]")
    result = page.wait_for_selector("#style-out .style-result img")
    wait_until(page, "document.querySelector('#style-out .style-result img').naturalWidth > 0")
    assert result.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 32]  # longest side 64, aspect kept
    losses = page.inner_text("#style-out .facts")
    before, after = map(float, re.search(r"style loss\s+([\d.e+-]+) → ([\d.e+-]+)", losses).groups())
    assert after < before and "content loss" in losses


def test_image_error_from_the_api_is_shown(page):
    connect(page)
    page.click("[data-tab=images]")
    page.select_option("#image-model", "tiny-diffusion")
    page.wait_for_selector("#image-size option[value='64x64']", state="attached")
    page.fill("#image-form [name=steps]", "4")
    page.fill("#image-form [name=partial_images]", "5")
    page.click("#image-form button[type=submit]")
    text = banner(page)
    assert "partial_images=5 needs more steps" in text and "param: partial_images" in text


# -- training -------------------------------------------------------------------------------


def add_losses(db, job_id: str, steps: range) -> None:
    for step in steps:
        store.add_event(db, job_id, f"step {step}: training loss", type="metrics",
                        data={"step": step, "train_loss": 3 * math.exp(-step / 10) + 1})
        if step % 5 == 0:
            store.add_event(db, job_id, f"step {step}: validation loss", type="metrics",
                            data={"step": step, "valid_loss": 3 * math.exp(-step / 12) + 1.2})


def test_training_tab_plots_the_loss_refreshes_and_cancels(page, image_server):
    # A running job with metric events, written through the job store into the server's database
    # (this server runs no worker, so nothing else touches it).
    with image_server.app.state.sessions() as db:
        job = store.create_job(db, base_model="tang-poet", family="chargpt", suffix="plot", training_file="file-none",
                               hyperparameters={"n_epochs": 1, "batch_size": 4}, seed=1, key_id=None)
        job.status = "running"
        db.commit()
        job_id = job.id
        add_losses(db, job_id, range(1, 11))
    connect(page)
    page.click("[data-tab=training]")
    page.click(f".job-row[data-id='{job_id}']")
    page.wait_for_selector(f"#job-detail h2:text('{job_id}')")
    plot = "#job-plot svg"
    assert page.get_attribute(f"{plot} .s-train", "data-points") == "10"
    assert page.get_attribute(f"{plot} .s-valid", "data-points") == "2"
    points = page.get_attribute(f"{plot} .s-train polyline", "points").split()
    ys = [float(p.split(",")[1]) for p in points]
    assert len(points) == 10 and ys[-1] > ys[0]  # the loss falls: lower on screen means larger y

    with image_server.app.state.sessions() as db:  # the job goes on; the tab refreshes by itself
        add_losses(db, job_id, range(11, 16))
    page.wait_for_selector(f"{plot} .s-train[data-points='15']", timeout=10_000)
    assert page.get_attribute(f"{plot} .s-valid", "data-points") == "3"

    page.click("#job-cancel")
    page.wait_for_selector("#job-detail .events li:has-text('cancellation requested')")
    with image_server.app.state.sessions() as db:
        assert db.get(Job, job_id).cancel_requested is True


def test_upload_a_file_and_create_a_job(page, image_server):
    records = [{"text": "春晓\n春眠不觉晓，处处闻啼鸟。"}, {"text": "静夜思\n床前明月光，疑是地上霜。"}] * 2
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode()
    connect(page)
    page.click("[data-tab=training]")
    page.set_input_files("#job-form [name=upload]",
                         files=[{"name": "studio.jsonl", "mimeType": "application/jsonl", "buffer": data}])
    page.click("#job-upload")
    page.wait_for_selector("#job-upload-out:has-text('records')")
    assert "4 records" in page.inner_text("#job-upload-out")
    # the file list is refilled after the upload's answer is shown: wait for it to pick the new file
    wait_until(page, "document.querySelector('#job-file').value.startsWith('file-')")
    file_id = page.input_value("#job-file")
    assert file_id.startswith("file-")

    page.fill("#job-form [name=suffix]", "Not A Suffix")  # refused by the server, shown with its param
    page.click("#job-form button[type=submit]")
    assert "param: suffix" in banner(page)
    page.click(".banner .banner-close")

    page.fill("#job-form [name=suffix]", "studio-test")
    page.fill("#job-form [name=extra]", '{"max_steps": 3}')
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("#job-detail .badge.status")
    job_id = page.inner_text("#job-detail h2")
    with admin_http(image_server) as http:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["training_file"] == file_id and job["suffix"] == "studio-test" and job["status"] == "queued"
        assert job["hyperparameters"]["n_epochs"] == 1 and job["hyperparameters"]["max_steps"] == 3
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert page.locator(f".job-row[data-id='{job_id}']").count() == 1


# -- models ---------------------------------------------------------------------------------


def test_models_tab_promotes_and_shows_a_refused_rollback(page):
    connect(page)
    page.click("[data-tab=models]")
    card = page.locator(".model[data-model=tiny-gan]")
    card.wait_for()
    assert "dcgan" in card.inner_text() and "image-generation" in card.inner_text()
    assert card.locator("tr[data-version='1']").count() == 1
    card.locator(".alias-input").fill("studio")
    card.locator(".promote").click()
    page.wait_for_selector(".model[data-model=tiny-gan] tr[data-version='1'] .badge.alias:text('studio')")
    card.locator(".rollback").click()
    assert "no older version to roll back to" in banner(page)
    assert "val_loss" in page.inner_text(".model[data-model=tang-poet] .metrics")  # the model card's metrics


def test_models_tab_loads_and_unloads_a_model(page, image_server):
    with admin_http(image_server) as http:  # start with nothing loaded: other tests share this server
        for m in http.get("/api/ps").json()["data"]:
            assert http.post(f"/api/models/{m['model']}/unload").status_code == 200
    connect(page)
    page.click("[data-tab=models]")
    page.wait_for_selector("#ps-table tr.empty")
    assert re.search(r"^0 of \d+ loaded · 0 B of weights \((limit .+|no limit)\)$", page.inner_text("#ps-summary"))

    page.select_option("#keep-alive", "30m")
    page.click(".model[data-model=tiny-gan] .load")
    row = page.wait_for_selector("#ps-table tr[data-model='tiny-gan@1']")
    cells = row.eval_on_selector_all("td", "tds => tds.map(t => t.textContent)")
    assert cells[:3] == ["tiny-gan@1", "dcgan", "image-generation"]
    assert re.fullmatch(r"[\d.]+ [kM]?B", cells[3]) and cells[4] == "0" and cells[5] == "unloads in 30 min"
    assert cells[6] == ""  # decoding: said of text models only
    assert page.inner_text("#ps-summary").startswith("1 of ")
    with admin_http(image_server) as http:
        loaded = http.get("/api/ps").json()["data"]
    assert [m["model"] for m in loaded] == ["tiny-gan@1"] and loaded[0]["expires_at"] is not None
    assert cells[3] != "—" and loaded[0]["size_bytes"] > 0

    page.select_option("#keep-alive", "-1")  # loading it again with "keep" keeps it until evicted
    page.click(".model[data-model=tiny-gan] .load")
    page.wait_for_selector("#ps-table tr[data-model='tiny-gan@1'] td:text('stays loaded')")

    page.click("#ps-table tr[data-model='tiny-gan@1'] .unload")
    page.wait_for_selector("#ps-table tr.empty")
    assert page.inner_text("#ps-summary").startswith("0 of ")

    page.click(".model[data-model=tang-poet] .load")  # a text model says how it decodes
    row = page.wait_for_selector("#ps-table tr[data-model='tang-poet@1']")
    assert row.eval_on_selector_all("td", "tds => tds.map(t => t.textContent)")[6] == "native"
    page.click("#ps-table tr[data-model='tang-poet@1'] .unload")
    page.wait_for_selector("#ps-table tr.empty")
    assert page.locator(".banner").count() == 0
    with admin_http(image_server) as http:
        assert http.get("/api/ps").json()["data"] == []


def test_import_an_onnx_model_through_the_form(page, image_server, tmp_path):
    import torch

    path = tmp_path / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2).eval(), (torch.zeros(1, 3),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    connect(page)
    page.click("[data-tab=models]")
    page.set_input_files("#import-form [name=file]", str(path))
    page.fill("#import-form [name=name]", "tiny-linear")
    page.click("#import-form button[type=submit]")
    page.wait_for_selector("#import-out:has-text('imported')")
    page.wait_for_selector(".model[data-model=tiny-linear]")  # the models list is refreshed
    assert page.locator(".banner").count() == 0
    with admin_http(image_server) as http:
        model = http.get("/v1/models/tiny-linear").json()
    assert model["family"] == "onnx"
    assert page.inner_text("#import-out") == f"imported {model['latest']['ref']} (onnx, {model['task']})"


def test_a_bad_import_shows_the_api_error_and_registers_nothing(page, image_server):
    connect(page)
    page.click("[data-tab=models]")
    page.set_input_files("#import-form [name=file]",
                         files=[{"name": "notes.zip", "mimeType": "application/zip", "buffer": b"just some notes\n"}])
    page.fill("#import-form [name=name]", "not-a-model")
    page.click("#import-form button[type=submit]")
    text = banner(page)
    assert "notes.zip is neither a .zip of a model folder nor an .onnx file" in text
    assert "HTTP 400" in text and "param: file" in text
    assert page.inner_text("#import-out") == ""
    with admin_http(image_server) as http:
        assert http.get("/v1/models/not-a-model").status_code == 404
        assert "not-a-model" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert page.locator(".model[data-model=not-a-model]").count() == 0


def open_poem_form(page, form: str) -> None:
    """Connected, on the Poem tab, with `form` picked in the Compose card."""
    connect(page)
    page.click("[data-tab=poem]")
    page.wait_for_selector(f"#poem-form-picker option[value={form}]", state="attached")
    page.select_option("#poem-form-picker", form)


def compose_with_seed(page, seed: int) -> None:
    page.fill("#poem-form [name=seed]", str(seed))
    page.click("#poem-form button[type=submit]")
    page.wait_for_selector("#poem-out .poem .verdict, .banner")
    assert not page.query_selector(".banner"), banner(page)


def test_a_lushi_shows_its_couplets_parallel(page):
    open_poem_form(page, "wulv")
    compose_with_seed(page, 0)
    couplets = page.eval_on_selector_all("#poem-out .couplet", "cs => cs.map(c => [c.textContent, c.dataset.parallel])")
    assert couplets == [["颔联 对仗 ✓ ", "true"], ["颈联 对仗 ✓ ", "true"]]


def test_a_dropped_picture_becomes_the_poem_s_keywords(page):
    """Image → poem in the studio: a picture chosen in the Poem tab's drop zone, its keywords as chips,
    a poem that holds them; removing the picture composes without it again."""
    open_poem_form(page, "wujue")
    page.set_input_files("#poem-picture-file", str(Path(__file__).resolve().parents[1] / "docs" / "apple.png"))
    page.wait_for_selector("#poem-picture-preview:not([hidden])", state="attached")
    compose_with_seed(page, 3)
    chips = page.eval_on_selector_all("#poem-picture-keywords .chip", "cs => cs.map(c => c.dataset.keyword)")
    assert chips[:2] == ["果", "红"]
    lines = page.eval_on_selector_all("#poem-out .pline", "ls => ls.map(l => [...l.querySelectorAll('.ch b')].map(b => b.textContent).join(''))")
    assert "果" in "".join(lines) and "红" in "".join(lines)
    page.click("#poem-picture-clear")
    assert page.is_hidden("#poem-picture-keywords") and page.is_hidden("#poem-picture-preview")


def test_write_together_shows_tones_as_you_type_then_accepts_a_suggested_line(page):
    """The co-writing editor: pending positions show the tone they need, a suggested next line is accepted
    into the poem, and 'Rewrite this line' offers replacements for the line the cursor is on."""
    connect(page)
    page.click("button[data-tab=poem]")
    page.wait_for_selector("#cowrite-form-picker option[value=wujue]", state="attached")
    page.select_option("#cowrite-form-picker", "wujue")
    page.fill("#cowrite-lines", "白日依山尽")
    wait_until(page, "document.querySelectorAll('#cowrite-tones .ch.pending').length === 15")
    assert page.eval_on_selector_all("#cowrite-tones .ch", "els => els.length") == 20
    first = page.eval_on_selector_all("#cowrite-tones .pline:first-child .ch b", "els => els.map(e => e.textContent)")
    assert "".join(first) == "白日依山尽"
    page.click("#cowrite-next")
    wait_until(page, "document.querySelector('#cowrite-suggestions .suggestion') || document.querySelector('.banner')")
    assert not page.query_selector(".banner"), banner(page)
    line = page.inner_text("#cowrite-suggestions .suggestion:first-child .suggested-line")
    page.click("#cowrite-suggestions .suggestion:first-child .accept")
    assert page.input_value("#cowrite-lines") == f"白日依山尽\n{line}"
    wait_until(page, "document.querySelectorAll('#cowrite-tones .ch.pending').length === 10")
    assert page.eval_on_selector_all("#cowrite-tones .ch.bad", "els => els.length") == 0
    # rewrite line 1: the cursor at the start of the text
    page.focus("#cowrite-lines")
    page.evaluate("() => document.querySelector('#cowrite-lines').setSelectionRange(0, 0)")
    page.click("#cowrite-rewrite")
    wait_until(page, "document.querySelector('#cowrite-suggestions .suggestion') || document.querySelector('.banner')")
    assert not page.query_selector(".banner"), banner(page)
    assert "line 1" in page.inner_text("#cowrite-suggestions .suggestion:first-child")


def test_the_prompt_helper_fixes_an_unknown_word_and_variations_use_the_next_seeds(page):
    connect(page)
    page.click("[data-tab=images]")
    page.select_option("#image-model", "tiny-diffusion")
    page.wait_for_selector("#image-size option[value='64x64']", state="attached")
    form = "#image-form"
    page.fill(f"{form} [name=prompt]", "red aple")
    page.wait_for_selector("#image-prompt-words .word.ignored")
    assert page.inner_text("#image-prompt-words .word.known") == "red"
    page.click("#image-prompt-words .instead")  # → apple
    assert page.input_value(f"{form} [name=prompt]") == "red apple"
    wait_until(page, "document.querySelectorAll('#image-prompt-words .word.known').length === 2")
    assert not page.query_selector("#image-prompt-words .word.ignored")
    page.select_option("#image-size", "32x32")
    page.fill(f"{form} [name=steps]", "3")
    page.fill(f"{form} [name=partial_images]", "0")
    page.fill(f"{form} [name=n]", "1")
    page.fill(f"{form} [name=seed]", "40")
    page.click(f"{form} button[type=submit]")
    wait_until(page, "document.querySelector('#image-state').dataset.state === 'done' || !!document.querySelector('.banner')")
    assert not page.query_selector(".banner"), banner(page)
    page.click("#image-results .result.done .variations")
    wait_until(page, "document.querySelectorAll('#image-results .result.done').length === 4")
    seeds = page.eval_on_selector_all("#image-results .result.done", "els => els.map(e => Number(e.dataset.seed))")
    assert sorted(seeds) == [41, 42, 43, 44]
