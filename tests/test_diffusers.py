"""The diffusers family: a user's text-to-image pipeline folder served through the real server
(a tiny random StableDiffusionPipeline built here, no downloads; fixed seeds, compared bytes)."""

import base64
import concurrent.futures as cf
import io
import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from atelier.families import FAMILIES
from atelier.families import diffusers as family_module
from atelier.images.png import parse_a1111, read_png_text
from conftest import LiveServer, admin_http, admin_openai, make_settings

GEN = dict(model="tiny-sd", prompt="a red cat face", response_format="b64_json")


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level BPE's 256 printable stand-ins for the bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + n) for n in range(len(extra))]


def tiny_tokenizer():
    """A CLIP BPE tokenizer over bytes, plus merges for a few whole words (`red`, `cat`, `face`, `apple`)."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in ("red", "cat", "face", "apple"):
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((cur, nxt))
            cur += nxt
            vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges=list(dict.fromkeys(merges)),
                         model_max_length=16)


def make_tiny_pipeline(folder):
    """A 16×16 StableDiffusionPipeline (UNet 8×8 latents, VAE ×2), saved as safetensors in `folder`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=len(tok), projection_dim=16,
                                        max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    with torch.no_grad():  # random weights, perturbed so every layer shapes the image
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def pngs(resp) -> list[bytes]:
    return [base64.b64decode(d.b64_json) for d in resp.data]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="module")
def sd_server(tmp_path_factory, pipeline_folder):
    from atelier.storage.registry import get_model, register_version

    settings = make_settings(tmp_path_factory.mktemp("sd-home"), run_worker=False, shipped_models=False,
                             max_body_bytes=200_000, max_image_n=4, max_image_steps=50, image_batch_wait_ms=300)
    with LiveServer(settings) as s:
        with s.app.state.sessions() as db:
            register_version(db, s.app.state.blobs, name="tiny-sd", family="diffusers", task="image-generation",
                             folder=pipeline_folder)
            # what an import records besides model_index.json: the native size (JSON files only, no load)
            version = get_model(db, name="tiny-sd").versions[0]
            version.config = {**version.config, **family_module.facts(pipeline_folder)}
            db.commit()
        yield s


@pytest.fixture()
def sd_client(sd_server):
    return admin_openai(sd_server)


# -- the family on its own ----------------------------------------------------------------


def test_family_recognises_describes_and_loads(pipeline_folder, tmp_path):
    fam = FAMILIES["diffusers"]
    assert fam.recognises(pipeline_folder) and not fam.recognises(tmp_path)
    config = json.loads((pipeline_folder / "model_index.json").read_text())
    files = {p.relative_to(pipeline_folder).as_posix(): "0" for p in pipeline_folder.rglob("*") if p.is_file()}
    described = fam.describe(config, files)
    assert described == {"pipeline": "StableDiffusionPipeline", "scheduler": "DDIMScheduler",
                         "upscalers": ["nearest"]}  # no size in model_index.json alone
    assert family_module.facts(pipeline_folder) == {"image_size": 16}
    assert fam.describe(config | {"image_size": 16}, files)["image_sizes"] == ["16x16", "32x32", "64x64"]
    weights = sum(p.stat().st_size for p in pipeline_folder.rglob("*.safetensors"))
    assert fam.weight_bytes(pipeline_folder) == weights > 100_000  # the components' weights, in subfolders
    model = fam.load(pipeline_folder)
    assert model.sizes == ["16x16", "32x32", "64x64"] and model.sampler == "DDIMScheduler" and model.multi_step
    steps_seen = []
    images = model.generate(["a red cat", "apple"], [5, 6], steps=3, guidance=[3.0, 1.0], negative_prompts=["", "red"],
                            on_step=lambda i, x0: steps_seen.append((i, tuple(x0.shape))))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    assert steps_seen == [(1, (2, 4, 8, 8)), (2, (2, 4, 8, 8)), (3, (2, 4, 8, 8))]  # once per batch, every image
    alone = model.generate(["apple"], [6], steps=3, guidance=[1.0], negative_prompts=["red"], on_step=None)
    assert np.array_equal(alone[0], images[1])
    import torch

    previews = model.preview(torch.zeros(2, 4, 8, 8))
    assert previews.shape == (2, 16, 16, 3) and previews.dtype == np.uint8


def test_pickle_weights_and_broken_folders_are_refused(pipeline_folder, tmp_path):
    fam = FAMILIES["diffusers"]
    bad = shutil.copytree(pipeline_folder, tmp_path / "pickled")
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model\.bin.*safe_serialization=True"):
        fam.load(bad)
    missing = shutil.copytree(pipeline_folder, tmp_path / "missing")
    shutil.rmtree(missing / "vae")
    with pytest.raises(ValueError, match=r"component 'vae'.*no vae/"):
        fam.load(missing)
    broken = shutil.copytree(pipeline_folder, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not load the StableDiffusionPipeline") as e:
        fam.load(broken)
    assert str(broken) not in str(e.value)  # no server paths in the message
    foreign = shutil.copytree(pipeline_folder, tmp_path / "foreign")
    index = json.loads((foreign / "model_index.json").read_text())
    (foreign / "model_index.json").write_text(json.dumps(index | {"unet": ["my_package", "MyUNet"]}))
    with pytest.raises(ValueError, match="'my_package'"):
        fam.load(foreign)
    # a diffusers pipeline module as the library (SD 1.x's safety checker) is diffusers' own: accepted, then checked
    (foreign / "model_index.json").write_text(json.dumps(index | {"safety_checker": ["stable_diffusion",
                                                                                      "StableDiffusionSafetyChecker"]}))
    with pytest.raises(ValueError, match=r"component 'safety_checker'.*no safety_checker/"):
        fam.load(foreign)


# -- through the server, with the openai SDK ----------------------------------------------


def test_same_seed_same_bytes_and_seed_plus_i(sd_client):
    kw = dict(**GEN, n=2, extra_body={"seed": 5, "steps": 3})
    first, again = pngs(sd_client.images.generate(**kw)), pngs(sd_client.images.generate(**kw))
    assert first == again and len(set(first)) == 2
    assert pixels(first[0]).shape == (16, 16, 3)
    one = sd_client.images.generate(**GEN, n=1, extra_body={"seed": 6, "steps": 3})
    assert pngs(one)[0] == first[1]  # image i of seed s is image 0 of seed s + i


def test_alone_equals_inside_a_micro_batch(sd_client, sd_server):
    kw = dict(**GEN, n=1)
    seeds = [31, 32, 33]
    alone = [pngs(sd_client.images.generate(**kw, extra_body={"seed": s, "steps": 3, "guidance": 2.0}))[0]
             for s in seeds]
    engine = sd_server.app.state.manager.get_loaded("tiny-sd", 1).engine
    before = len(engine.batch_sizes)
    with cf.ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(lambda s: pngs(sd_client.images.generate(
            **kw, extra_body={"seed": s, "steps": 3, "guidance": 2.0}))[0], seeds))
    assert together == alone
    sizes = engine.batch_sizes[before:]
    assert max(sizes) > 1 and sum(sizes) == len(seeds)  # the requests did share a batch


def test_png_parameters_and_artifact_provenance(sd_client, sd_server):
    r = sd_client.images.generate(**GEN, extra_body={"seed": 9, "steps": 3, "guidance": 2.5,
                                                      "negative_prompt": "apple"})
    png = pngs(r)[0]
    parsed = parse_a1111(read_png_text(png)["parameters"])
    assert parsed["prompt"] == "a red cat face" and parsed["negative_prompt"] == "apple"
    assert parsed["Seed"] == "9" and parsed["Steps"] == "3" and parsed["Model"] == "tiny-sd@1"
    assert parsed["Sampler"] == "DDIMScheduler" and parsed["Size"] == "16x16"
    with admin_http(sd_server) as http:
        art = http.get(f"/api/artifacts/{r.data[0].model_extra['artifact_id']}").json()
        assert art["model"] == "tiny-sd@1" and art["params"]["seed"] == 9 and art["params"]["steps"] == 3
        assert http.get(f"/api/artifacts/{art['id']}/content").content == png


def test_stream_progress_partial_and_completed(sd_client):
    events = list(sd_client.images.generate(**GEN, stream=True, partial_images=1, extra_body={"seed": 4, "steps": 4}))
    kinds = [e.type for e in events]
    progress = [e.model_extra["step"] for e in events if e.type == "image_generation.progress"]
    assert progress == [1, 2, 3, 4] and kinds[-1] == "image_generation.completed"
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert len(partial) == 1 and pixels(base64.b64decode(partial[0].b64_json)).shape == (16, 16, 3)
    final = base64.b64decode(events[-1].b64_json)
    assert final == pngs(sd_client.images.generate(**GEN, extra_body={"seed": 4, "steps": 4}))[0]


def test_models_entry_sizes_upscale_and_bad_size(sd_client, sd_server):
    m = sd_client.models.retrieve("tiny-sd")
    extra = m.model_extra
    assert extra["family"] == "diffusers" and extra["task"] == "image-generation"
    assert extra["image_sizes"] == ["16x16", "32x32", "64x64"] and extra["scheduler"] == "DDIMScheduler"
    small = pixels(pngs(sd_client.images.generate(**GEN, size="16x16", extra_body={"seed": 1, "steps": 2}))[0])
    big = pixels(pngs(sd_client.images.generate(**GEN, size="64x64", extra_body={"seed": 1, "steps": 2}))[0])
    assert big.shape == (64, 64, 3) and np.array_equal(big[::4, ::4], small)
    with admin_http(sd_server) as http:
        r = http.post("/v1/images/generations", json={**GEN, "size": "512x512"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "size" and "16x16" in r.json()["error"]["message"]


def test_pickled_version_is_a_503_naming_the_conversion(sd_server, pipeline_folder, tmp_path):
    from atelier.storage.registry import register_version

    bad = shutil.copytree(pipeline_folder, tmp_path / "pickled")
    (bad / "text_encoder" / "pytorch_model.bin").write_bytes(b"not loaded")
    with sd_server.app.state.sessions() as db:
        register_version(db, sd_server.app.state.blobs, name="pickled-sd", family="diffusers",
                         task="image-generation", folder=bad)
    with admin_http(sd_server) as http:
        r = http.post("/v1/images/generations", json={**GEN, "model": "pickled-sd"})
    err = r.json()["error"]
    assert r.status_code == 503 and err["code"] == "model_load_failed"
    assert "text_encoder/pytorch_model.bin" in err["message"] and "safe_serialization=True" in err["message"]


def test_import_endpoint_when_present(sd_server, pipeline_folder):
    """POST /api/models/import with a zip of the folder (relative paths); skipped while the route is absent."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(pipeline_folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(pipeline_folder).as_posix())
    with admin_http(sd_server) as http:
        r = http.post("/api/models/import", files={"file": ("pipeline.zip", buf.getvalue(), "application/zip")},
                      data={"name": "imported-sd"})
        assert r.status_code == 200, r.text
    client = admin_openai(sd_server)
    imported = client.models.retrieve("imported-sd").model_extra
    assert imported["family"] == "diffusers" and imported["image_sizes"][0] == "16x16"  # read at import
    got = pngs(client.images.generate(**{**GEN, "model": "imported-sd"}, extra_body={"seed": 5, "steps": 3}))[0]
    ref = pngs(client.images.generate(**GEN, extra_body={"seed": 5, "steps": 3}))[0]
    assert pixels(got).tobytes() == pixels(ref).tobytes()  # same pipeline, same seed, same pixels
