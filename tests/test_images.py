"""Text to image through the real server with the official openai SDK (tiny random models, fixed seeds)."""

import base64
import concurrent.futures as cf
import io
import json

import httpx
import numpy as np
from PIL import Image

from atelier.images.png import parse_a1111, read_png_text
from conftest import ADMIN_KEY

GEN = dict(model="tiny-diffusion", prompt="grinning cat face", size="32x32", response_format="b64_json")


def pngs(resp) -> list[bytes]:
    return [base64.b64decode(d.b64_json) for d in resp.data]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_generate_n_images_with_seed_steps_guidance(image_client):
    r = image_client.images.generate(**GEN, n=3, extra_body={"seed": 7, "steps": 6, "guidance": 3.0,
                                                               "negative_prompt": "red apple"})
    images = pngs(r)
    assert len(images) == 3 and all(p.startswith(b"\x89PNG") for p in images)
    assert all(pixels(p).shape == (32, 32, 3) for p in images)
    assert len({p for p in images}) == 3  # each image has its own seed
    extra = r.model_extra
    assert extra["model"] == "tiny-diffusion@1" and extra["seed"] == 7
    assert [d.model_extra["seed"] for d in r.data] == [7, 8, 9]


def test_same_request_same_seed_same_bytes(image_client):
    kw = dict(**GEN, n=2, extra_body={"seed": 123, "steps": 5, "guidance": 2.5})
    assert pngs(image_client.images.generate(**kw)) == pngs(image_client.images.generate(**kw))
    # image i of seed s is image 0 of seed s + i (documented), byte for byte
    one = image_client.images.generate(**GEN, n=1, extra_body={"seed": 124, "steps": 5, "guidance": 2.5})
    assert pngs(one)[0] == pngs(image_client.images.generate(**kw))[1]
    other = image_client.images.generate(**GEN, n=1, extra_body={"seed": 999, "steps": 5, "guidance": 2.5})
    assert pngs(other)[0] != pngs(one)[0]


def test_png_carries_a1111_parameters(image_client):
    r = image_client.images.generate(**GEN, extra_body={"seed": 7, "steps": 4, "guidance": 3.0,
                                                         "negative_prompt": "blue car"})
    text = read_png_text(pngs(r)[0])
    assert text["parameters"] == ("grinning cat face\nNegative prompt: blue car\n"
                                  "Steps: 4, Sampler: DDIM, CFG scale: 3, Seed: 7, Size: 32x32, Model: tiny-diffusion@1")
    parsed = parse_a1111(text["parameters"])
    assert parsed["prompt"] == "grinning cat face" and parsed["negative_prompt"] == "blue car"
    assert parsed["Seed"] == "7" and parsed["Steps"] == "4" and parsed["Sampler"] == "DDIM"
    meta = json.loads(text["atelier"])
    assert meta["seed"] == 7 and meta["model"] == "tiny-diffusion@1" and meta["guidance"] == 3.0


def test_upscaled_sizes_and_models_list_sizes(image_client):
    m = image_client.models.retrieve("tiny-diffusion")
    assert m.model_extra["image_sizes"] == ["32x32", "64x64", "128x128", "256x256"]
    assert m.model_extra["upscalers"] == ["learned", "nearest"]
    assert image_client.models.retrieve("tiny-gan").model_extra["upscalers"] == ["nearest"]
    small = image_client.images.generate(**{**GEN, "size": "32x32"}, extra_body={"seed": 1, "steps": 3})
    big = image_client.images.generate(**{**GEN, "size": "128x128"},
                                       extra_body={"seed": 1, "steps": 3, "upscaler": "nearest"})
    a, b = pixels(pngs(small)[0]), pixels(pngs(big)[0])
    assert b.shape == (128, 128, 3) and np.array_equal(b[::4, ::4], a)  # nearest-neighbour ×4
    assert "Hires upscale: 4, Hires upscaler: nearest" in read_png_text(pngs(big)[0])["parameters"]


def test_learned_upscaler_is_the_default_and_reproducible(image_client):
    from atelier.models import upscaler

    kw = dict(**{**GEN, "size": "64x64"}, extra_body={"seed": 2, "steps": 3})
    learned, again = pngs(image_client.images.generate(**kw))[0], pngs(image_client.images.generate(**kw))[0]
    assert learned == again  # same seed, same bytes, through the upscaler too
    native = pixels(pngs(image_client.images.generate(**{**GEN, "size": "32x32"},
                                                      extra_body={"seed": 2, "steps": 3}))[0])
    big = pixels(learned)
    assert big.shape == (64, 64, 3) and not np.array_equal(big[::2, ::2], native)  # not a pixel repeat
    assert np.abs(big.astype(int) - upscaler.bilinear(native).astype(int)).mean() < 40  # an upscale of the same image
    text = read_png_text(learned)
    assert "Hires upscale: 2, Hires upscaler: learned" in text["parameters"]
    assert json.loads(text["atelier"])["upscaler"] == "learned"


def test_upscaler_the_model_lacks_is_a_400(image_http):
    r = image_http.post("/v1/images/generations", json={"model": "tiny-gan", "prompt": "red apple", "size": "64x64",
                                                        "upscaler": "learned"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "upscaler" and "nearest" in err["message"]
    r = image_http.post("/v1/images/generations", json={"model": "tiny-diffusion", "prompt": "red apple",
                                                        "upscaler": "lanczos"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "upscaler"


def test_gan_family(image_client):
    kw = dict(model="tiny-gan", prompt="red apple", n=3, size="32x32", response_format="b64_json",
              extra_body={"seed": 5})
    a, b = pngs(image_client.images.generate(**kw)), pngs(image_client.images.generate(**kw))
    assert a == b and len(set(a)) == 3
    assert "Sampler: DCGAN" in read_png_text(a[0])["parameters"]
    single = image_client.images.generate(**{**kw, "n": 1, "extra_body": {"seed": 6}})
    assert pngs(single)[0] == a[1]


def test_url_response_is_signed_expiring_and_served(image_client, image_server):
    r = image_client.images.generate(**{**GEN, "response_format": "url"}, extra_body={"seed": 3, "steps": 3})
    url = r.data[0].url
    assert url.startswith(image_server.url + "/api/artifacts/") and "expires=" in url and "sig=" in url
    got = httpx.get(url)  # no key: the signature is the authorisation
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert "parameters" in read_png_text(got.content)
    tampered = url.replace("sig=", "sig=0")
    assert httpx.get(tampered).status_code == 403
    expired = httpx.get(url.split("?")[0], params={"expires": 1, "sig": "0" * 64})
    assert expired.status_code == 403 and expired.json()["error"]["code"] == "url_expired"
    assert httpx.get(url.split("?")[0]).status_code == 401  # no signature, no key


def test_every_image_is_an_artifact_with_provenance(image_client, image_http):
    r = image_client.images.generate(**GEN, n=2, extra_body={"seed": 11, "steps": 3, "guidance": 1.5})
    ids = [d.model_extra["artifact_id"] for d in r.data]
    a = image_http.get(f"/api/artifacts/{ids[1]}").json()
    assert a["kind"] == "image" and a["model"] == "tiny-diffusion@1" and a["mime"] == "image/png"
    assert a["params"]["seed"] == 12 and a["params"]["request_seed"] == 11 and a["params"]["index"] == 1
    assert a["params"]["steps"] == 3 and a["params"]["guidance"] == 1.5 and a["key_id"]
    content = image_http.get(f"/api/artifacts/{ids[1]}/content").content
    assert content == pngs(r)[1]
    import hashlib
    assert hashlib.sha256(content).hexdigest() == a["sha256"] and a["size"] == len(content)
    # store=false: nothing stored, no artifact id
    before = image_http.get("/api/artifacts", params={"limit": 100}).json()["data"]
    r2 = image_client.images.generate(**GEN, extra_body={"seed": 11, "steps": 3, "store": False})
    assert "artifact_id" not in r2.data[0].model_extra
    after = image_http.get("/api/artifacts", params={"limit": 100}).json()["data"]
    assert len(after) == len(before)


def test_gallery_filters_and_pages(image_client, image_http, image_server):
    image_client.images.generate(model="tiny-gan", prompt="blue car", n=3, response_format="b64_json",
                                 extra_body={"seed": 1})
    page1 = image_http.get("/api/artifacts", params={"kind": "image", "model": "tiny-gan", "limit": 2}).json()
    assert len(page1["data"]) == 2 and page1["has_more"] is True
    assert all(a["model"].startswith("tiny-gan@") for a in page1["data"])
    page2 = image_http.get("/api/artifacts", params={"model": "tiny-gan", "limit": 2, "after": page1["last_id"]}).json()
    assert page2["data"] and not {a["id"] for a in page2["data"]} & {a["id"] for a in page1["data"]}
    assert image_http.get("/api/artifacts", params={"model": "tiny-gan@1"}).json()["data"]
    poems = image_http.get("/api/artifacts", params={"kind": "poem"}).json()["data"]
    assert all(a["kind"] == "poem" for a in poems)  # the kind filter: no image among them
    # another key sees only its own artifacts
    other = image_http.post("/api/keys", json={"scopes": ["generate"]}).json()["key"]
    h = {"Authorization": f"Bearer {other}"}
    assert httpx.get(image_server.url + "/api/artifacts", headers=h).json()["data"] == []
    aid = page1["data"][0]["id"]
    assert httpx.get(image_server.url + f"/api/artifacts/{aid}", headers=h).status_code == 404
    assert httpx.get(image_server.url + "/api/artifacts", headers=h,
                     params={"key_id": page1["data"][0]["key_id"]}).status_code == 403


def test_stream_progress_previews_then_completed(image_client):
    events = list(image_client.images.generate(**GEN, stream=True, partial_images=2,
                                               extra_body={"seed": 7, "steps": 6}))
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed"
    progress = [e for e in events if e.type == "image_generation.progress"]
    assert [e.model_extra["step"] for e in progress] == list(range(1, 7))
    assert all(e.model_extra["total_steps"] == 6 for e in progress)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert [e.partial_image_index for e in partial] == [0, 1]
    assert all(pixels(base64.b64decode(e.b64_json)).shape == (32, 32, 3) for e in partial)
    # previews come while denoising: before the completed event
    assert kinds.index("image_generation.partial_image") < kinds.index("image_generation.completed")
    final = base64.b64decode(events[-1].b64_json)
    whole = image_client.images.generate(**GEN, extra_body={"seed": 7, "steps": 6})
    assert final == pngs(whole)[0]


def test_stream_raw_sse_shape(image_server):
    with httpx.stream("POST", image_server.url + "/v1/images/generations",
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={**GEN, "n": 2, "stream": True, "partial_images": 1, "seed": 1, "steps": 4}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    names = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    completed = [json.loads(line[6:]) for line in lines if line.startswith("data: {") and 'image_generation.completed"' in line]
    assert names.count("image_generation.completed") == 2 and sorted(c["image_index"] for c in completed) == [0, 1]


def test_client_disconnect_cancels_the_work(image_client, image_server):
    import time

    image_client.images.generate(**GEN, extra_body={"seed": 1, "steps": 2})  # the model is loaded
    engine = image_server.app.state.manager.get_loaded("tiny-diffusion", 1).engine
    cancelled = engine.cancelled_jobs
    with httpx.stream("POST", image_server.url + "/v1/images/generations",
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={**GEN, "stream": True, "seed": 1, "steps": 50}) as resp:
        for line in resp.iter_lines():
            if '"step": 2,' in line:
                break  # leave after two of fifty steps
    deadline = time.time() + 10
    while time.time() < deadline and engine.cancelled_jobs == cancelled:
        time.sleep(0.05)
    assert engine.cancelled_jobs == cancelled + 1 and not engine.busy
    # the server keeps serving
    assert image_client.images.generate(**GEN, extra_body={"seed": 1, "steps": 2}).data


def test_micro_batching_gives_the_same_images(image_client, image_server):
    seeds = [21, 22, 23, 24, 25, 26]
    kw = dict(GEN, n=1)
    alone = [pngs(image_client.images.generate(**kw, extra_body={"seed": s, "steps": 5, "guidance": 2.0}))[0]
             for s in seeds]
    engine = image_server.app.state.manager.get_loaded("tiny-diffusion", 1).engine
    before = len(engine.batch_sizes)
    with cf.ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(lambda s: pngs(image_client.images.generate(
            **kw, extra_body={"seed": s, "steps": 5, "guidance": 2.0}))[0], seeds))
    assert together == alone
    sizes = engine.batch_sizes[before:]
    assert max(sizes) > 1 and sum(sizes) == len(seeds)  # some requests shared a forward
    # a batch also mixes prompts, guidance and negative prompts per request
    mixed = [("red apple", 1.0, ""), ("blue car", 4.0, "red apple"), ("grinning cat face", 0.0, "")]
    with cf.ThreadPoolExecutor(3) as pool:
        res = list(pool.map(lambda m: pngs(image_client.images.generate(
            **{**kw, "prompt": m[0]}, extra_body={"seed": 5, "steps": 5, "guidance": m[1],
                                                  "negative_prompt": m[2]}))[0], mixed))
    for (p, g, neg), got in zip(mixed, res):
        solo = image_client.images.generate(**{**kw, "prompt": p},
                                            extra_body={"seed": 5, "steps": 5, "guidance": g, "negative_prompt": neg})
        assert pngs(solo)[0] == got


def test_a_batch_of_many_images_shares_threads_and_gives_the_same_images(image_client, image_server):
    """Three requests of 4 images at once are one batch of 12 on two threads (one for every 4 images); each
    request alone is a batch of 4 on one. The images are the same bytes."""
    kw = dict(GEN, n=4)
    seeds = [41, 51, 61]
    alone = [pngs(image_client.images.generate(**kw, extra_body={"seed": s, "steps": 4})) for s in seeds]
    engine = image_server.app.state.manager.get_loaded("tiny-diffusion", 1).engine
    assert engine.batch_threads[-3:] == [1, 1, 1]
    before = len(engine.batch_sizes)
    with cf.ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(lambda s: pngs(image_client.images.generate(**kw, extra_body={"seed": s, "steps": 4})),
                                 seeds))
    assert together == alone
    ran = list(zip(engine.batch_sizes[before:], engine.batch_threads[before:]))
    assert (12, 2) in ran or (8, 2) in ran, ran  # the requests shared a batch, split between two threads


def test_cli_image_saves_a_png_with_its_parameters(image_server, image_client, tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"ATELIER_URL": image_server.url, "ATELIER_API_KEY": ADMIN_KEY, "COLUMNS": "200"}
    out = tmp_path / "out.png"
    r = subprocess.run([sys.executable, "-m", "atelier.cli", "image", "grinning cat face", "-o", str(out),
                        "--model", "tiny-diffusion", "--seed", "7", "--steps", "4"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    same = image_client.images.generate(**GEN, extra_body={"seed": 7, "steps": 4})
    assert out.read_bytes() == pngs(same)[0]
    r = subprocess.run([sys.executable, "-m", "atelier.cli", "image", "cat", "-o", str(out), "--model",
                        "tiny-diffusion", "--size", "7x7"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "size" in r.stderr
    r = subprocess.run([sys.executable, "-m", "atelier.cli", "image", "grinning cat face", "-o", str(out), "--model",
                        "tiny-diffusion", "--seed", "7", "--steps", "4", "--size", "64x64", "--upscaler", "nearest"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "Hires upscaler: nearest" in read_png_text(out.read_bytes())["parameters"]


def test_shipped_image_models(image_client):
    d = image_client.models.retrieve("emoji-diffusion").model_extra
    assert d["family"] == "ddpm" and d["task"] == "image-generation" and d["image_sizes"][0] == "32x32"
    assert d["latest"]["metrics"]["val_loss"] > 0 and d["latest"]["files"]["vocab.json"]
    g = image_client.models.retrieve("emoji-gan").model_extra
    assert g["family"] == "dcgan" and g["image_sizes"][0] == "32x32"
    assert image_client.models.retrieve("style-transfer").model_extra["task"] == "style-transfer"
    for model, extra in (("emoji-diffusion", {"seed": 7, "steps": 3}), ("emoji-gan", {"seed": 7})):
        r = image_client.images.generate(model=model, prompt="smiling cat face", n=2, size="32x32",
                                         response_format="b64_json", extra_body=extra)
        assert [pixels(p).shape for p in pngs(r)] == [(32, 32, 3)] * 2


def test_the_prompt_helper_names_the_words_a_model_ignores_and_what_it_knows_instead(image_http):
    r = image_http.post("/api/images/prompt", json={"model": "tiny-diffusion", "prompt": "a smiling kat with an aple"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["known"] == ["smiling"] and out["ignored"] == ["kat", "aple"]
    instead = {w["word"]: w["instead"] for w in out["words"]}
    assert instead["kat"][0] == "cat" and instead["aple"][0] == "apple" and instead["smiling"] == []
    gan = image_http.post("/api/images/prompt", json={"model": "tiny-gan", "prompt": "blue car"}).json()
    assert gan["ignored"] == [] and gan["known"] == ["blue", "car"]
    for body, param in (({"model": "tiny-diffusion"}, "prompt"), ({"model": "tiny-diffusion", "prompt": "x", "n": 2}, "n"),
                        ({"model": "tang-poet", "prompt": "cat"}, "model")):
        bad = image_http.post("/api/images/prompt", json=body)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, bad.text


def test_a_batch_gathers_while_requests_keep_arriving(tmp_path):
    """Requests that reach the engine a little apart (a burst, spread by the event loop's work on each) share one
    batch: it waits max_wait_ms after each arrival, not only after the first (atelier/runtime/image_engine.py)."""
    import asyncio
    import time

    from atelier.families import get_family
    from atelier.runtime.image_engine import GATHER_WAITS, ImageDone, ImageEngine, ImageJob
    from conftest import make_tiny_image_models

    model = get_family("ddpm").load(make_tiny_image_models(tmp_path)["tiny-diffusion"])
    engine = ImageEngine(model, max_batch=16, max_wait_ms=200)
    assert GATHER_WAITS * 200 > 4 * 60 + 200  # the four arrivals below fit in the longest gathering

    async def burst():
        loop, jobs = asyncio.get_running_loop(), []
        for i in range(5):
            if i:
                await asyncio.sleep(0.06)  # 240 ms from the first to the last: more than one 200 ms wait
            jobs.append(engine.submit(ImageJob(["grinning cat face"], [i], loop, asyncio.Queue(), steps=2)))
        done = []
        for job in jobs:
            while not isinstance(event := await asyncio.wait_for(job.events.get(), 60), ImageDone):
                assert not isinstance(event, Exception), event
            done.append(event)
        return done

    try:
        started = time.monotonic()
        assert len(asyncio.run(burst())) == 5
        assert engine.batch_sizes == [5], engine.batch_sizes
        assert time.monotonic() - started < 60
    finally:
        engine.close()


def test_a_request_joins_a_batch_already_running_at_its_next_step(tmp_path):
    """A ddpm batch runs a step at a time (atelier/runtime/image_engine.py): a request arriving mid-way joins at
    the next step with its own schedule, shares the forwards that follow, and ends when its own steps do; every
    image is the bytes it is alone."""
    import asyncio

    from atelier.families import get_family
    from atelier.runtime.image_engine import ImageDone, ImageEngine, ImageJob, Progress
    from conftest import make_tiny_image_models

    model = get_family("ddpm").load(make_tiny_image_models(tmp_path)["tiny-diffusion"])
    alone = {seed: model.generate(["grinning cat face"], [seed], steps=steps, guidance=[2.5], negative_prompts=[""],
                                  on_step=None)[0] for seed, steps in ((1, 30), (2, 4))}
    engine = ImageEngine(model, max_batch=16, max_wait_ms=0)

    async def run():
        loop = asyncio.get_running_loop()
        long = engine.submit(ImageJob(["grinning cat face"], [1], loop, asyncio.Queue(), steps=30, guidance=2.5))
        while not isinstance(event := await asyncio.wait_for(long.events.get(), 60), Progress) or event.step < 3:
            pass
        short = engine.submit(ImageJob(["grinning cat face"], [2], loop, asyncio.Queue(), steps=4, guidance=2.5))
        order, images = [], {}

        async def finish(job, seed):
            while not isinstance(event := await asyncio.wait_for(job.events.get(), 60), ImageDone):
                assert not isinstance(event, Exception), event
            order.append(seed)
            images[seed] = event.image

        await asyncio.gather(finish(long, 1), finish(short, 2))
        return order, images

    try:
        order, images = asyncio.run(run())
    finally:
        engine.close()
    assert order == [2, 1]  # the short request did not wait for the long one's 30 steps
    assert engine.batch_sizes == [1, 1] and engine.batches_run == 30  # its 4 steps rode the long one's forwards
    assert all(np.array_equal(images[seed], alone[seed]) for seed in (1, 2))
