"""The trainer: loss falls, a crashed run resumes to exactly the uninterrupted result, early stop, sgd, bf16."""

import json

import pytest
import torch
from safetensors.torch import load_file

from atelier.models.chargpt import from_pretrained
from atelier.training.corpus import load_corpus
from atelier.training.run import train_chargpt
from atelier.training.trainer import TrainConfig

POEMS = ["春晓\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
         "静夜思\n床前明月光，疑是地上霜。举头望明月，低头思故乡。",
         "登鹳雀楼\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "相思\n红豆生南国，春来发几枝。愿君多采撷，此物最相思。"] * 5
TINY = dict(n_positions=32, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture()
def corpus_file(tmp_path):
    p = tmp_path / "poems.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in POEMS), encoding="utf-8")
    return p


def cfg(**kw):
    base = dict(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=10, eval_batches=2, log_every=5)
    return TrainConfig(**(base | kw))


def test_loss_falls_and_the_result_is_a_loadable_version(corpus_file, tmp_path):
    events = []
    best = train_chargpt(corpus_file, tmp_path / "run", TINY, cfg(max_steps=60), on_event=events.append)
    evals = [e["val_loss"] for e in events if e["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.5
    record = json.loads((best / "training.json").read_text())
    assert record["metrics"]["val_loss"] == pytest.approx(min(evals))
    assert record["data"]["files"][0]["file"] == "poems.jsonl"
    model, tok = from_pretrained(best)
    assert model.config.vocab_size == len(tok)


class Crash(Exception):
    pass


def test_a_crashed_run_resumes_to_the_same_weights(corpus_file, tmp_path):
    straight = train_chargpt(corpus_file, tmp_path / "a", TINY, cfg(patience=100))

    def crash_after_step_14(e):
        if e["type"] == "train" and e["step"] >= 14:
            raise Crash()

    with pytest.raises(Crash):
        train_chargpt(corpus_file, tmp_path / "b", TINY, cfg(patience=100), on_event=crash_after_step_14)
    events = []
    resumed = train_chargpt(corpus_file, tmp_path / "b", TINY, cfg(patience=100), on_event=events.append)
    assert any(e["type"] == "resumed" and e["step"] == 10 for e in events)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_early_stopping_when_validation_stops_improving(corpus_file, tmp_path):
    events = []
    # A learning rate this high diverges, so validation never improves after the first eval.
    train_chargpt(corpus_file, tmp_path / "r", TINY, cfg(max_steps=200, lr=1.0, warmup_steps=1, patience=2,
                                                         grad_clip=0), on_event=events.append)
    stops = [e for e in events if e["type"] == "early_stop"]
    assert stops and stops[0]["step"] < 200


@pytest.mark.parametrize("options", [dict(optimizer="sgd", lr=0.5, schedule="linear"),
                                     dict(precision="bf16", schedule="constant")])
def test_other_optimisers_and_precisions_train(corpus_file, tmp_path, options):
    events = []
    train_chargpt(corpus_file, tmp_path / "r", TINY, cfg(max_steps=20, **options), on_event=events.append)
    evals = [e["val_loss"] for e in events if e["type"] == "eval"]
    assert evals[-1] < evals[0]


def test_bad_training_options_are_refused():
    with pytest.raises(ValueError, match="optimizer='lamb' is not one of adamw, sgd"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_poetry_corpus_is_simplified_split_by_poem():
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "poetry" / "tang.jsonl").exists():
        pytest.skip("../shared/data not present")
    c = load_corpus(SHARED_DATA / "poetry")
    assert len(c.train) > 70_000 and 1_000 < len(c.val) < 3_000
    assert not set(c.train[:2000]) & set(c.val)
    assert "帝京篇十首 一\n秦川雄帝宅，函谷壮皇居。" in c.train[0]  # 壯 → 壮: converted to simplified
