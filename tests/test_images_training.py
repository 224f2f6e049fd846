"""Training the image families: tiny configs, resume equals an uninterrupted run, safetensors + JSON only."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atelier.models import dcgan, ddpm
from atelier.models.ddim import DDIMScheduler
from atelier.models.text_encoder import WordVocab, words
from atelier.training.image_data import load_emoji
from atelier.training.image_trainer import ImageTrainConfig, train_images
from conftest import SHARED_DATA

DATA = SHARED_DATA / "images" / "emoji64"
TINY_DDPM = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[], text_dim=16)
TINY_GAN = dict(g_channels=8, d_channels=8, z_dim=8, text_dim=16)


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_emoji_split_is_by_base_design():
    train, val, prov = load_emoji(DATA)
    assert len(train) + len(val) == 1688 and prov["skin_tone_variants_dropped"] == 3583 - 1688
    assert not set(train.indices) & set(val.indices) and 100 < len(val) < 200
    assert train.images.shape[1:] == (32, 32, 3)


def test_vocab_and_words():
    v = WordVocab.build(["GRINNING CAT FACE WITH SMILING EYES", "CAT"])
    assert words("A Smiling cat-face, please!") == ["smiling", "cat", "face", "please"]
    assert v.known("smiling cats") == ["smiling", "cats"] and v.encode("zebra") == []
    assert v.itos[2] == "cat"  # most frequent first


def test_scheduler_recovers_x0_with_an_oracle():
    for prediction in ("v_prediction", "epsilon"):
        s = DDIMScheduler(1000, "cosine", prediction_type=prediction)
        s.set_timesteps(10)
        x0 = torch.rand(2, 3, 4, 4) * 2 - 1
        x = torch.randn(2, 3, 4, 4)
        for t in s.timesteps:
            a = s.alphas_cumprod[int(t)].float()
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            out = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
            x = s.step(out, t, x).prev_sample
        assert torch.allclose(x, x0, atol=1e-4)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)


def test_ddpm_trains_resumes_and_saves_safetensors(tmp_path, one_thread):
    cfg = dict(family="ddpm", batch_size=4, eval_every=3, log_every=1, warmup_steps=1)
    events = []
    half = train_images(ImageTrainConfig(max_steps=3, **cfg), tmp_path / "a", data=DATA, model_cfg=TINY_DDPM,
                        on_event=events.append)
    resumed = train_images(ImageTrainConfig(max_steps=6, **cfg), tmp_path / "a", data=DATA, model_cfg=TINY_DDPM,
                           on_event=events.append)
    train_images(ImageTrainConfig(max_steps=6, **cfg), tmp_path / "b", data=DATA, model_cfg=TINY_DDPM)
    assert half == resumed and "resumed" in [e["type"] for e in events]
    a = load_file(tmp_path / "a" / "checkpoint-6" / "ema.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-6" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # a resumed run is the uninterrupted run
    record = json.loads((resumed / "training.json").read_text())
    assert record["data"]["base_designs"] == 1688 and record["metrics"]["steps"] == 6
    assert sorted(p.name for p in resumed.iterdir()) == ["config.json", "model.safetensors", "training.json",
                                                         "vocab.json"]
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.bin"))
    model, vocab = ddpm.from_pretrained(resumed)
    img = ddpm.generate(model, vocab, ["cat face"], [1], steps=3)
    assert img.shape == (1, 32, 32, 3) and img.dtype == torch.uint8


def test_dcgan_trains_with_the_diffusion_text_encoder(tmp_path, one_thread):
    d = train_images(ImageTrainConfig(family="ddpm", max_steps=1, batch_size=4, eval_every=1), tmp_path / "d",
                     data=DATA, model_cfg=TINY_DDPM)
    g = train_images(ImageTrainConfig(family="dcgan", max_steps=3, batch_size=4, eval_every=3), tmp_path / "g",
                     data=DATA, model_cfg=TINY_GAN, text_from=d)
    gan, vocab = dcgan.from_pretrained(g)
    diff, _ = ddpm.from_pretrained(d)
    assert torch.equal(gan.text.embed.weight, diff.text.embed.weight)  # the same, frozen text embedding
    assert not any(k.startswith("discriminator.") for k in load_file(g / "model.safetensors"))
    out = dcgan.generate(gan, vocab, ["red apple", "car", "tree"], [1, 2, 3]).numpy()
    assert out.shape == (3, 32, 32, 3) and np.array_equal(out[1], dcgan.generate(gan, vocab, ["car"], [2]).numpy()[0])


def test_bad_training_config():
    with pytest.raises(ValueError, match="family"):
        ImageTrainConfig(family="vae")
    with pytest.raises(ValueError, match="lr"):
        ImageTrainConfig(lr=0)


def test_upscaler_beats_bilinear_and_resumes(tmp_path, one_thread):
    from atelier.models import upscaler
    from atelier.training.upscaler_trainer import UpscalerTrainConfig, train_upscaler

    cfg = dict(batch_size=16, eval_every=20, log_every=5, lr=2e-3, decay_steps=40)
    tiny = dict(channels=8, num_blocks=1)
    events = []
    train_upscaler(UpscalerTrainConfig(max_steps=20, **cfg), tmp_path / "a", data=DATA, model_cfg=tiny)
    best = train_upscaler(UpscalerTrainConfig(max_steps=40, **cfg), tmp_path / "a", data=DATA, model_cfg=tiny,
                          on_event=events.append)
    train_upscaler(UpscalerTrainConfig(max_steps=40, **cfg), tmp_path / "b", data=DATA, model_cfg=tiny)
    assert events[0]["type"] == "resumed" and events[0]["step"] == 20
    a = load_file(tmp_path / "a" / "checkpoint-40" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-40" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # a resumed run is the uninterrupted run
    metrics = json.loads((best / "upscaler-training.json").read_text())["metrics"]
    assert metrics["val_psnr"] > metrics["bilinear_psnr"] + 0.1  # it learned something interpolation lacks
    net = upscaler.from_pretrained(best)
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    out = upscaler.upscale(net, image)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
