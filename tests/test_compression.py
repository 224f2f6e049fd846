"""Compression as lifecycle operations: int8 quantization makes a new, smaller version that serves
nearly the same text; pruning drops whole MLP channels for real; bad requests are 4xx naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from atelier.families.shipped import SHIPPED_DIR
from atelier.models import int8
from atelier.models.chargpt import from_pretrained
from atelier.training.compress import prune_mlp
from conftest import ADMIN_KEY, LiveServer, admin_http, make_settings
from test_jobs import POEMS, all_events


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of its own: quantizing adds versions to tang-poet, which other modules count."""
    with LiveServer(make_settings(tmp_path_factory.mktemp("compress-home"))) as s:
        yield s


def wait_for_http(http, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in ("succeeded", "failed",
                                                                                      "cancelled"):
        assert time.time() < deadline, f"{job_id} did not finish"
        time.sleep(0.3)
    return job


def test_int8_round_trip_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different scales
    q = int8.quantize({"w": w, "b": torch.randn(64)})
    assert q["w"].dtype == torch.int8 and q["b"].dtype == torch.float32  # vectors stay as they were
    back = int8.dequantize(q)
    assert set(back) == {"w", "b"}
    step = q["w" + int8.SCALE]
    assert ((back["w"] - w).abs() <= step[:, None] / 2 + 1e-6).all()


def test_quantizing_tang_poet_makes_a_quarter_size_version_that_serves(own_server):
    with admin_http(own_server) as http:
        r = http.post("/api/models/tang-poet@1/quantize", json={"method": "int8"})
        assert r.status_code == 200, r.text
        made = r.json()
        assert made["quantized_from"] == "tang-poet@1" and made["alias"] == "int8"
        assert made["size_bytes"] < 0.4 * made["source_size_bytes"]
        model = http.get("/v1/models/tang-poet").json()
        assert model["aliases"]["int8"] == int(made["id"].split("@")[1])
        assert model["aliases"]["production"] == 1  # the source's aliases do not move
        poem = {"prompt": "春眠不觉晓，", "max_tokens": 20, "seed": 4, "temperature": 0.01}
        fp32 = http.post("/v1/completions", json=poem | {"model": "tang-poet@1"}).json()["choices"][0]["text"]
        q8 = http.post("/v1/completions", json=poem | {"model": "tang-poet:int8"})
        assert q8.status_code == 200, q8.text
        text = q8.json()["choices"][0]["text"]
        agree = sum(a == b for a, b in zip(fp32, text)) / max(len(fp32), 1)
        assert len(text) > 0 and agree >= 0.5, (fp32, text)  # greedy text mostly survives int8
        again = http.post(f"/api/models/{made['id']}/quantize", json={})
        assert again.status_code == 400 and again.json()["error"]["code"] == "already_quantized"
        audit = http.get("/api/audit", params={"limit": 50}).json()["data"]
        assert any(e["action"] == "model.quantize" and e["target"] == made["id"] for e in audit)


def test_quantize_refuses_what_it_cannot_do(own_server):
    with admin_http(own_server) as http:
        cases = [("/api/models/tang-poet@1/quantize", {"method": "int4"}, "method"),
                 ("/api/models/tang-poet@1/quantize", {"bits": 8}, "bits"),
                 ("/api/models/emoji-gan@1/quantize", {}, "model"),
                 ("/api/models/no-such-model@1/quantize", {}, "model")]
        for path, body, param in cases:
            r = http.post(path, json=body)
            assert 400 <= r.status_code < 500, (path, body, r.text)
            assert r.json()["error"]["param"] == param, r.json()


def test_atelier_models_quantize_from_the_command_line(own_server):
    r = subprocess.run([sys.executable, "-m", "atelier.cli", "models", "quantize", "tang-poet@1", "--alias", "small"],
                       capture_output=True, text=True, timeout=120,
                       env=os.environ | {"ATELIER_URL": own_server.url, "ATELIER_API_KEY": ADMIN_KEY})
    assert r.returncode == 0, r.stderr
    assert "(tang-poet:small): int8 from tang-poet@1" in r.stdout and "MB" in r.stdout


def test_pruning_drops_whole_mlp_channels_and_keeps_the_most_important():
    model, tok = from_pretrained(SHIPPED_DIR / "tang-poet")
    sample = torch.tensor([tok.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。")])
    held_out = torch.tensor([tok.encode("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")])
    pruned = prune_mlp(model, 0.5, [sample])
    assert pruned.config.n_inner == model.config.inner // 2
    assert sum(p.numel() for p in pruned.parameters()) == pruned.config.n_params < model.config.n_params

    def loss(m):
        with torch.no_grad():
            return m(held_out[:, :-1], held_out[:, 1:])[1].item()

    g = torch.Generator().manual_seed(0)
    arbitrary = [loss(prune_mlp(model, 0.5, [], scores=[torch.rand(model.config.inner, generator=g)
                                                         for _ in model.h])) for _ in range(3)]
    assert loss(pruned) < min(arbitrary)  # importance beats any of three arbitrary halves


@pytest.mark.parametrize("method, hyper", [
    ("distill", {"n_embd": 32, "n_layer": 1, "n_head": 2, "max_steps": 12, "eval_every": 6, "batch_size": 4,
                 "temperature": 2.0, "alpha": 0.8}),
    ("prune", {"keep": 0.5, "max_steps": 6, "eval_every": 3, "batch_size": 2}),
])
def test_distill_and_prune_jobs_make_smaller_models_with_lineage(own_server, method, hyper):
    with admin_http(own_server) as http:
        data = "\n\n".join(POEMS * 4).encode()
        file_id = http.post("/v1/files", files={"file": ("poems.txt", data)}, data={"purpose": "fine-tune"}).json()["id"]
        r = http.post("/v1/fine_tuning/jobs", json={"model": "tang-poet@1", "training_file": file_id,
                                                    "suffix": f"poet-{method}",
                                                    "method": {"type": method, method: {"hyperparameters": hyper}}})
        assert r.status_code == 200, r.text
        job = wait_for_http(http, r.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["fine_tuned_model"] == f"poet-{method}@1"
        events = [e["message"] for e in all_events(http, job["id"])]
        assert any(m.startswith(f"building the model: {method} tang-poet@1") for m in events), events
        made = http.get(f"/v1/models/poet-{method}").json()
        teacher = http.get("/v1/models/tang-poet").json()
        size = {m["id"]: m["versions"][0]["size_bytes"] for m in (made, teacher)}
        assert size[f"poet-{method}"] < size["tang-poet"]
        poem = http.post("/v1/completions", json={"model": f"poet-{method}", "prompt": "春", "max_tokens": 8, "seed": 1})
        assert poem.status_code == 200 and poem.json()["choices"][0]["text"]


def test_compression_jobs_refuse_what_does_not_fit(own_server):
    with admin_http(own_server) as http:
        file_id = http.post("/v1/files", files={"file": ("p.txt", "\n\n".join(POEMS).encode())},
                            data={"purpose": "fine-tune"}).json()["id"]
        cases = [
            ({"model": "chargpt", "suffix": "x", "method": {"type": "distill"}}, "model"),  # nothing to distil
            ({"model": "tang-poet@1", "method": {"type": "prune"}}, "suffix"),  # the new model needs a name
            ({"model": "tang-poet@1", "suffix": "x", "method": {"type": "quantize"}}, "method.type"),
            ({"model": "tang-poet@1", "suffix": "x", "method": {"type": "distill", "distill": {
                "hyperparameters": {"keep": 0.5}}}}, "hyperparameters.keep"),  # keep is prune's
            ({"model": "tang-poet@1", "suffix": "x", "method": {"type": "prune", "prune": {
                "hyperparameters": {"keep": 2}}}}, "hyperparameters.keep"),
        ]
        for body, param in cases:
            r = http.post("/v1/fine_tuning/jobs", json={"training_file": file_id, **body})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.json())
