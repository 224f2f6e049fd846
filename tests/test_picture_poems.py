"""Image → poem: the concept lexicon and colour cues, training a tagger, and a picture through the real
server to a poem about it (`POST /api/poems` with `image`, `image_url` parts on chat completions)."""

import base64
import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from atelier.images.keywords import CONCEPTS, colour_cue, concepts_of
from atelier.models import tagger
from atelier.training.tagger import TaggerTrainConfig, load_emoji, split_designs, train_tagger


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def drawn_apple() -> Image.Image:
    """A red apple as anyone would draw it: a red round body, a brown stem, a green leaf, on white."""
    im = Image.new("RGB", (200, 200), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((30, 50, 170, 185), fill=(214, 38, 48))
    d.ellipse((95, 55, 125, 70), fill=(170, 20, 30))
    d.line((100, 60, 108, 25), fill=(110, 70, 30), width=7)
    d.ellipse((110, 22, 150, 42), fill=(70, 160, 60))
    return im


def drawn_smiley() -> Image.Image:
    """A smiling face: a yellow disc, two dark eyes and a smiling mouth, on white."""
    im = Image.new("RGB", (200, 200), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((15, 15, 185, 185), fill=(252, 194, 27), outline=(230, 150, 20), width=3)
    d.ellipse((62, 60, 82, 95), fill=(64, 40, 30))
    d.ellipse((118, 60, 138, 95), fill=(64, 40, 30))
    d.chord((50, 80, 150, 160), 0, 180, fill=(64, 40, 30))
    return im


def data_url(im: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


# -- the lexicon and the colour cues ------------------------------------------------------


def keywords_of(name: str) -> set[str]:
    return {CONCEPTS[i].keyword for i in concepts_of(name)}


def test_names_call_up_concepts_by_whole_words_plurals_and_pairs():
    assert keywords_of("RED APPLE") == {"果"}
    assert keywords_of("SMILING FACE WITH OPEN MOUTH") == {"笑"}
    assert keywords_of("CRESCENT MOON") == {"月", "夜"}
    assert keywords_of("CHERRY BLOSSOM") == {"花", "春"}  # "cherry blossom" is a two-word trigger of 春
    assert keywords_of("CHERRIES") == {"果"}  # a plural
    assert keywords_of("SPARKLES") == set() and keywords_of("LATIN CAPITAL LETTER A") == set()
    assert keywords_of("CAT FACE") == {"猫"}  # "cat" is a word of the name, "catch" would not be


def test_every_keyword_is_a_character_the_shipped_poet_knows():
    from atelier.models.chargpt import from_pretrained

    _, tok = from_pretrained("atelier/assets/models/tang-poet")
    assert all(c.keyword in tok.stoi for c in CONCEPTS)
    assert len({c.keyword for c in CONCEPTS}) == len(CONCEPTS)


def test_colour_cues_name_the_dominant_hue_or_white_or_nothing():
    assert colour_cue(np.asarray(drawn_apple()))["keyword"] == "红"
    assert colour_cue(np.asarray(drawn_smiley()))["keyword"] == "黄"
    sky = np.full((20, 20, 3), (40, 110, 220), np.uint8)
    assert colour_cue(sky)["keyword"] == "碧"
    snow = np.full((20, 20, 3), 255, np.uint8)
    snow[4:16, 4:16] = (225, 228, 232)
    assert colour_cue(snow)["keyword"] == "白"
    assert colour_cue(np.full((20, 20, 3), 255, np.uint8)) is None  # blank
    grey = np.full((20, 20, 3), 90, np.uint8)
    assert colour_cue(grey) is None
    rainbow = np.zeros((6, 60, 3), np.uint8)
    for k, c in enumerate([(230, 30, 30), (240, 220, 30), (40, 200, 60), (40, 90, 230), (150, 40, 200), (230, 30, 30)]):
        rainbow[:, k * 10:(k + 1) * 10] = c
    assert colour_cue(rainbow) is None  # no hue holds most of the saturated pixels


# -- training a tagger --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_emoji(tmp_path_factory):
    """A data folder shaped like ../shared/data/images/emoji64: red discs named apples, yellow faces,
    and blue squares named as nothing the lexicon knows."""
    folder = tmp_path_factory.mktemp("emoji")
    rng = np.random.default_rng(0)
    names, images = [], []
    for k in range(60):
        kind = k % 3
        im = (drawn_apple() if kind == 0 else drawn_smiley() if kind == 1 else
              Image.new("RGB", (200, 200), (40, 90, 230)))
        im = im.rotate(float(rng.uniform(-15, 15)), fillcolor="white").resize((32, 32), Image.LANCZOS)
        images.append(np.asarray(im))
        names.append(["RED APPLE", "GRINNING FACE", "BLUE SQUARE"][kind] + f" {k}" * (kind == 2))
    np.savez_compressed(folder / "emoji32.npz", images=np.stack(images), names=np.array(names))
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "codepoints", "emoji", "name", "skin_tone_variant"])
        for i, name in enumerate(names):
            w.writerow([i, f"emoji_{i}.png", "", "", name, 0])
    return folder


def test_held_out_designs_keep_their_variants_out_of_training():
    designs = ["A", "A", "B", "C", "C", "C", "D"]
    train, held = split_designs(designs, 0.5, seed=0)
    held_designs = {designs[i] for i in held}
    assert len(held) == len(held_designs) == 2  # one base picture per held-out design
    assert not held_designs & {designs[i] for i in train}
    assert sorted(set(train.tolist()) | {i for i in range(7) if designs[i] in held_designs}) == list(range(7))


def test_a_tagger_trained_here_tags_what_it_learnt(tiny_emoji, tmp_path):
    data = load_emoji(tiny_emoji, 32)
    apple = [c.keyword for c in CONCEPTS].index("果")
    assert data.labels[0, apple] == 1 and data.labels[2].sum() == 0
    torch.set_num_threads(1)
    figures = train_tagger(tiny_emoji, tmp_path / "tagger", TaggerTrainConfig(steps=120, eval_every=60,
                                                                             val_fraction=0.0, batch_size=32))
    assert figures["step"] == 120
    model = tagger.from_pretrained(tmp_path / "tagger")
    top = lambda im: tagger.tag(model, im)[0]["keyword"]  # noqa: E731
    assert top(drawn_apple()) == "果" and top(drawn_smiley()) == "笑"
    blue = tagger.tag(model, Image.new("RGB", (64, 48), (40, 90, 230)))
    assert blue[0]["score"] < 0.5  # a picture of nothing it knows
    (tmp_path / "tagger" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(Exception):
        tagger.from_pretrained(tmp_path / "tagger")


def test_pictures_are_squared_on_white_before_resizing():
    tall = Image.new("RGBA", (10, 30), (255, 0, 0, 255))
    x = tagger.prepare(tall, 32)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 16, 0], torch.ones(3))  # white padding on the left
    assert x[0, 16, 16] > 0.9 and x[1, 16, 16] < -0.9  # red in the middle


# -- through the real server --------------------------------------------------------------


def test_the_shipped_tagger_sees_a_drawn_apple_and_a_smiling_face(http):
    model = http.get("/v1/models/emoji-tagger").json()
    assert model["task"] == "image-tagging" and "果" in model["labels"]
    out = http.post("/api/poems", json={"form": "wujue", "image": data_url(drawn_apple()), "seed": 3}).json()
    found = [k["keyword"] for k in out["picture"]["keywords"]]
    assert "果" in found and "红" in found, out["picture"]
    poem = out["poems"][0]
    assert poem["report"]["compliant"] and "果" in poem["text"] and "红" in poem["text"]
    assert out["picture"]["model"] == "emoji-tagger@1"
    art = http.get(f"/api/artifacts/{poem['artifact_id']}").json()
    assert art["params"]["image_keywords"] == found and len(art["params"]["image_sha256"]) == 64
    assert "image" not in art["params"]

    # the tagger alone, through the predict route
    pred = http.post("/api/models/emoji-tagger/predict",
                     json={"images": [data_url(drawn_apple()).split(",", 1)[1]]}).json()
    assert [k["keyword"] for k in pred["predictions"][0]["keywords"]] == found and len(pred["predictions"][0]["tags"]) == 5
    e = error_of(http.post("/api/models/emoji-tagger/predict", json={"rows": [{"x": 1}]}), 400)
    assert "takes images" in e["message"]

    out = http.post("/api/poems", json={"form": "qijue", "image": data_url(drawn_smiley(), "JPEG"), "seed": 1,
                                        "keywords": "春"}).json()
    found = [k["keyword"] for k in out["picture"]["keywords"]]
    assert "笑" in found
    assert all(k in out["poems"][0]["text"] for k in ["春", "笑"])


def test_a_chat_image_url_part_gets_a_poem_about_the_picture(client):
    """The openai SDK's own content parts, with the form through extra_body."""
    resp = client.chat.completions.create(
        model="tang-poet", seed=2,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "为这幅画写一首诗"},
            {"type": "image_url", "image_url": {"url": data_url(drawn_smiley())}}]}],
        extra_body={"poem": {"form": "qijue"}})
    text = resp.choices[0].message.content
    picture = resp.model_extra["picture"]
    assert "笑" in [k["keyword"] for k in picture["keywords"]] and "笑" in text
    assert resp.model_extra["poems"][0]["report"]["compliant"] and len(resp.model_extra["poems"][0]["lines"]) == 4
    # without extra_body: a 五绝
    resp = client.chat.completions.create(model="tang-poet", seed=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(drawn_apple()), "detail": "low"}}]}])
    assert [len(line) for line in resp.model_extra["poems"][0]["lines"]] == [5, 5, 5, 5]


def test_bad_pictures_get_clear_errors(http):
    apple = data_url(drawn_apple())
    chat = lambda *parts, model="tang-poet": http.post("/v1/chat/completions", json={  # noqa: E731
        "model": model, "messages": [{"role": "user", "content": list(parts)}]})
    part = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    e = error_of(chat(part("https://example.com/apple.png")), 400)
    assert e["code"] == "remote_image_refused" and e["param"] == "messages[0].content[0].image_url.url"
    assert "data URL" in e["message"]
    e = error_of(chat({"type": "text", "text": "看"}, part(apple), part(apple)), 400)
    assert e["code"] == "too_many_images" and e["param"] == "messages[0].content[2].image_url.url"
    e = error_of(chat(part("data:text/plain;base64,aGVsbG8=")), 400)
    assert e["code"] == "invalid_image"
    e = error_of(chat({"type": "image_url", "image_url": {"url": apple, "colour": "red"}}), 400)
    assert "colour" in e["message"]
    e = error_of(chat(part(apple), model="emoji-diffusion"), 400)
    assert e["param"] == "model"
    e = error_of(http.post("/api/poems", json={"form": "wujue", "image": "not base64!"}), 400)
    assert e["param"] == "image" and e["code"] == "invalid_image"
    e = error_of(http.post("/api/poems", json={"form": "wujue", "image": base64.b64encode(b"GIF89a....").decode()}), 400)
    assert e["param"] == "image" and e["code"] == "invalid_image"
    huge = Image.new("1", (2100, 2100), 1)
    buf = io.BytesIO()
    huge.save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < 4_000  # a small file that decodes to 4.4 M pixels
    e = error_of(http.post("/api/poems", json={"form": "wujue", "image": base64.b64encode(buf.getvalue()).decode()}),
                 400)
    assert e["code"] == "image_too_large" and "ATELIER_MAX_IMAGE_UPLOAD_PIXELS" in e["message"]
    e = error_of(http.post("/api/poems", json={"form": "wujue", "image": data_url(Image.new("RGB", (64, 64), "white"))}),
                 422)
    assert e["code"] == "image_not_recognised" and e["param"] == "image"
    e = error_of(http.post("/api/poems", json={"form": "wujue", "image": apple, "tagger": "tang-poet"}), 400)
    assert e["param"] == "tagger"
    e = error_of(http.post("/api/poems", json={"form": "wujue", "image": "data:image/png;base64," + "A" * 1_400_000}),
                 413)
    assert "ATELIER_MAX_BODY_BYTES" in e["message"]
