"""Style transfer: Gram optimisation in random features and Reinhard colour transfer, through the real server."""

import base64
import io
import zlib
import struct

import numpy as np
import openai
import pytest
from PIL import Image

from atelier.images.png import read_png_text
from atelier.images.style import RandomFeatures, FeatureConfig, list_styles, load_style, transfer
from conftest import SHARED_DATA


def png_bytes(size=(48, 40), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[: size[1] // 2] = (200, 40, 40)  # a red top half, a noisy bottom half: structure to keep
    a[size[1] // 2:] = rng.integers(0, 255, (size[1] - size[1] // 2, size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture()
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: extra threads only add synchronisation on a busy machine
    yield
    torch.set_num_threads(before)


def test_gram_transfer_reduces_style_loss_and_color_moves_statistics(one_thread):
    content = Image.open(SHARED_DATA / "styles" / "content" / "chelsea.png").convert("RGB")
    style = load_style("hokusai_great_wave")
    features = RandomFeatures(FeatureConfig(filters=8))
    r = transfer(content, style, features, method="gram", strength=0.9, steps=15, max_side=64)
    assert r.image.shape[1] == 64 and r.image.dtype == np.uint8
    assert r.style_loss < 0.7 * r.style_loss_before and r.content_loss > 0
    weak = transfer(content, style, features, method="gram", strength=0.2, steps=15, max_side=64)
    assert weak.content_loss < r.content_loss  # lower strength keeps more of the content
    c = transfer(content, style, features, method="color", strength=1.0, max_side=64)
    s = np.asarray(style.resize((64, 36))).reshape(-1, 3).mean(0)
    before = np.asarray(content.resize((64, 43))).reshape(-1, 3).mean(0)
    assert np.abs(c.image.reshape(-1, 3).mean(0) - s).sum() < np.abs(before - s).sum()
    zero = transfer(content, style, features, method="color", strength=0.0, max_side=64)
    assert zero.content_loss < 1e-3


def test_shipped_styles_have_provenance():
    styles = list_styles()
    assert len(styles) == 8 and "vangogh_starry_night" in styles
    for name, meta in styles.items():
        assert meta["artist_died"] < 1926 and meta["source_sha256"] and max(meta["size"]) <= 256
        assert max(load_style(name).size) <= 256


def nearest_patch_distance(image: np.ndarray, painting: np.ndarray, k: int = 5) -> float:
    """Mean distance from each k×k patch of `image` to its nearest patch of `painting` (0–1 pixels)."""
    import torch
    import torch.nn.functional as F

    unfold = lambda a: F.unfold(torch.from_numpy(np.array(a)).float().permute(2, 0, 1)[None] / 255, k, stride=2)[0].T  # noqa: E731
    return float(torch.cdist(unfold(image), unfold(painting)).min(1).values.mean())


def edge_correlation(a: np.ndarray, b: np.ndarray) -> float:
    grey = lambda x: x.astype(np.float64).mean(2)  # noqa: E731
    ea, eb = (np.hypot(*np.gradient(grey(x))).ravel() for x in (a, b))
    return float(np.corrcoef(ea, eb)[0, 1])


def test_patch_transfer_rebuilds_the_photo_from_the_painting_s_own_patches(one_thread):
    content = Image.open(SHARED_DATA / "styles" / "content" / "chelsea.png").convert("RGB")
    painting = load_style("vangogh_starry_night")
    features = RandomFeatures(FeatureConfig(filters=4))
    r = transfer(content, painting, features, method="patch", strength=0.8, steps=60, max_side=64)
    assert r.method == "patch" and r.steps == 12 and r.image.shape == (43, 64, 3)  # passes are capped; aspect kept
    small = np.asarray(painting.resize((64, 51), Image.LANCZOS))
    photo = np.asarray(content.resize((64, 43), Image.LANCZOS))
    # its patches are the painting's: far nearer to them than the photo's own patches are
    assert nearest_patch_distance(r.image, small) < 0.45 * nearest_patch_distance(photo, small)  # colour transfer: 0.6
    # …while the photo's edges stay where they were, more so at a lower strength
    kept = edge_correlation(r.image, photo)
    gentle = transfer(content, painting, features, method="patch", strength=0.2, steps=12, max_side=64)
    assert 0.4 < kept < edge_correlation(gentle.image, photo)
    again = transfer(content, painting, features, method="patch", strength=0.8, steps=60, max_side=64)
    assert np.array_equal(again.image, r.image)  # deterministic


def test_images_edit_with_the_sdk(image_client, image_http):
    r = image_client.images.edit(model="style-transfer", image=("cat.png", png_bytes(), "image/png"),
                                 prompt="vangogh_starry_night", response_format="b64_json",
                                 extra_body={"method": "gram", "strength": 0.9, "steps": 8})
    extra = r.model_extra
    assert extra["method"] == "gram" and extra["style"] == "vangogh_starry_night" and extra["steps"] == 8
    assert extra["losses"]["style"] < extra["losses"]["style_before"]
    img = decode(r.data[0].b64_json)
    assert img.shape == (40, 48, 3)  # small content: never upscaled
    params = read_png_text(base64.b64decode(r.data[0].b64_json))["parameters"]
    assert params.startswith("vangogh_starry_night\n") and "Model: style-transfer@1" in params
    art = image_http.get(f"/api/artifacts/{r.data[0].model_extra['artifact_id']}").json()
    assert art["params"]["method"] == "gram" and art["params"]["losses"]["style"] == extra["losses"]["style"]
    again = image_client.images.edit(model="style-transfer", image=("cat.png", png_bytes(), "image/png"),
                                     prompt="vangogh_starry_night", response_format="b64_json",
                                     extra_body={"method": "gram", "strength": 0.9, "steps": 8})
    assert again.data[0].b64_json == r.data[0].b64_json  # deterministic


def test_native_route_with_uploaded_style_and_color(image_http):
    files = {"content": ("c.png", png_bytes(), "image/png"), "style_image": ("s.png", png_bytes(seed=3), "image/png")}
    r = image_http.post("/api/style-transfer", files=files, data={"method": "color", "strength": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["style"].startswith("upload:") and body["method"] == "color" and body["steps"] == 0
    r = image_http.post("/api/style-transfer", files={"content": ("c.png", png_bytes(), "image/png")},
                        data={"style": "Hokusai Great-Wave", "steps": "3", "response_format": "url"})
    assert r.status_code == 200 and r.json()["style"] == "hokusai_great_wave" and "/content?" in r.json()["data"][0]["url"]
    assert r.json()["method"] == "patch" and r.json()["steps"] == 3  # the default method
    assert [s["id"] for s in image_http.get("/api/styles").json()["data"]][0] == "degas_dance_foyer"


def bomb_png(w=3000, h=3000) -> bytes:
    """A valid PNG header that claims w×h pixels (a tiny file that would decode to 27 MB)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (w * 3 + 1) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def big_noisy_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()  # ~120 kB > the fixture's 60 kB limit


@pytest.mark.parametrize("files, data, param, code", [
    ({"content": ("c.txt", b"hello, not an image", "text/plain")}, {"style": "vangogh_starry_night"}, "content",
     "invalid_image"),
    ({"content": ("c.png", b"", "image/png")}, {"style": "vangogh_starry_night"}, "content", "invalid_image"),
    ({"content": ("c.png", bomb_png(), "image/png")}, {"style": "vangogh_starry_night"}, "content", "image_too_large"),
    ({"content": ("c.png", big_noisy_png(), "image/png")}, {"style": "vangogh_starry_night"}, "content",
     "image_too_large"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {"style": "picasso_la_muse"}, "style", "unknown_style"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {}, "style", "missing_style"),
    ({}, {"style": "vangogh_starry_night"}, "content", "missing_image"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {"style": "turner_shipwreck", "method": "neural"}, "method",
     "invalid_value"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {"style": "turner_shipwreck", "strength": "2"}, "strength",
     "invalid_value"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {"style": "turner_shipwreck", "steps": "51"}, "steps",
     "invalid_value"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {"style": "turner_shipwreck", "steps": "many"}, "steps",
     "invalid_value"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {"style": "turner_shipwreck", "size": "100x100"}, "size",
     "unsupported_size"),
    ({"content": ("c.png", png_bytes(), "image/png")}, {"style": "turner_shipwreck", "model": "tiny-gan"}, "model",
     "model_not_supported"),
])
def test_bad_style_transfer_input(image_http, files, data, param, code):
    r = image_http.post("/api/style-transfer", files=files or {"x": ("x", b"", "text/plain")}, data=data)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code, err


def test_edit_bad_input_with_the_sdk(image_client, image_http):
    with pytest.raises(openai.BadRequestError) as e:
        image_client.images.edit(model="style-transfer", image=("c.png", png_bytes(), "image/png"), prompt="mona lisa")
    assert e.value.body["param"] == "prompt" and "vangogh_starry_night" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        image_client.images.edit(model="style-transfer", image=("c.png", png_bytes(), "image/png"),
                                 prompt="turner_shipwreck", n=2)
    assert e.value.body["param"] == "n"
    r = image_http.post("/v1/images/edits", json={"model": "style-transfer", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
