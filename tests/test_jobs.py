"""Training as a service through the real server and the official SDK: files, jobs, events, versions."""

import base64
import io
import json
import os
import signal
import time
import zipfile

import httpx
import numpy as np
import openai
import pytest

from atelier.images.png import read_png_text

POEMS = ["春晓\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
         "静夜思\n床前明月光，疑是地上霜。举头望明月，低头思故乡。",
         "登鹳雀楼\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "相思\n红豆生南国，春来发几枝。愿君多采撷，此物最相思。"]
TINY = {"n_embd": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}


def jsonl(records) -> bytes:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode("utf-8")


def upload(client, name: str, data: bytes):
    return client.files.create(file=(name, data), purpose="fine-tune")


def wait_for(client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def all_events(http, job_id):
    return http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 1000}).json()["data"]


def test_files_upload_list_retrieve_content_delete(client):
    data = jsonl({"text": p} for p in POEMS)
    f = upload(client, "poems.jsonl", data)
    assert f.purpose == "fine-tune" and f.bytes == len(data) and f.model_extra["records"] == 4
    assert f.model_extra["format"] == "jsonl-text"
    again = upload(client, "same.jsonl", data)
    assert again.id == f.id and again.model_extra["duplicate"] is True  # recognised by content hash
    assert f.id in [x.id for x in client.files.list().data]
    assert client.files.retrieve(f.id).filename == "poems.jsonl"
    assert client.files.content(f.id).read() == data
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_fine_tune_then_call_the_new_version(client, http):
    f = upload(client, "my_poems.jsonl", jsonl({"prompt": p.split("\n")[0] + "\n", "completion": p.split("\n")[1]}
                                               for p in POEMS * 3))
    job = client.fine_tuning.jobs.create(model="tang-poet", training_file=f.id, suffix="my-style", seed=3,
                                         hyperparameters={"n_epochs": 1, "batch_size": 4,
                                                          "learning_rate_multiplier": 2.0})
    assert job.status == "queued"
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "tang-poet:ft-my-style"
    messages = [e["message"] for e in all_events(http, job.id)]
    for stage in ("validating files", "preparing data", "building the model: fine-tuning tang-poet@1",
                  "training:", "registering", "new version"):
        assert any(m.startswith(stage) for m in messages), (stage, messages)
    metrics = [e for e in all_events(http, job.id) if e["type"] == "metrics"]
    assert {"step", "train_loss", "lr", "tokens_per_s"} <= set(metrics[0]["data"])
    assert any("valid_loss" in e["data"] for e in metrics)
    sdk_events = client.fine_tuning.jobs.list_events(job.id, limit=5)
    assert len(sdk_events.data) == 5 and sdk_events.data[0].message.startswith("new version")  # newest first
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number >= 1
    # Immediately callable, with lineage on the version.
    r = client.completions.create(model="tang-poet:ft-my-style", prompt="春晓\n", max_tokens=10, seed=1)
    assert r.model.startswith("tang-poet@") and r.model != "tang-poet@1"
    version = client.models.retrieve("tang-poet:ft-my-style").model_extra["latest"]
    assert version["version"] >= 2
    assert client.models.retrieve("tang-poet").model_extra["aliases"]["latest"] == 1  # base untouched
    listed = {m.id: m for m in client.models.list()}  # what a caller can put in `model`
    assert "tang-poet:ft-my-style" in listed and listed["tang-poet:ft-my-style"].model_extra["parent"] == "tang-poet"
    assert listed["tang-poet:ft-my-style"].model_extra["latest"]["version"] == version["version"]
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50).data]


def test_train_from_scratch_registers_a_new_model(client):
    f = upload(client, "tiny.txt", "\n\n".join(POEMS * 3).encode("utf-8"))
    job = client.fine_tuning.jobs.create(model="chargpt", training_file=f.id, suffix="mini-poet",
                                         hyperparameters=TINY | {"max_steps": 12, "eval_every": 6,
                                                                 "optimizer": "sgd", "learning_rate_multiplier": 5})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "mini-poet@1"
    assert client.completions.create(model="mini-poet", prompt="春", max_tokens=5, seed=0).choices[0].text is not None


def test_cancel_a_running_job(client, http):
    f = upload(client, "cancel.jsonl", jsonl({"text": p + str(i)} for i, p in enumerate(POEMS * 3)))
    job = client.fine_tuning.jobs.create(model="chargpt", training_file=f.id, suffix="never",
                                         hyperparameters=TINY | {"max_steps": 5000, "eval_every": 50})
    deadline = time.time() + 120
    while not any(e["type"] == "metrics" for e in all_events(http, job.id)):
        assert time.time() < deadline
        time.sleep(0.2)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    job = wait_for(client, job.id, states=("cancelled",), timeout=60)
    assert job.fine_tuned_model is None
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("never")
    with pytest.raises(openai.APIStatusError) as e:
        client.fine_tuning.jobs.cancel(job.id)
    assert e.value.status_code == 409 and e.value.body["code"] == "job_not_cancellable"


def test_kill_9_of_the_worker_resumes_from_the_checkpoint(client, http, server):
    f = upload(client, "crash.jsonl", jsonl({"text": p + "!"} for p in POEMS * 3))
    job = client.fine_tuning.jobs.create(model="chargpt", training_file=f.id, suffix="survivor",
                                         hyperparameters=TINY | {"max_steps": 500, "eval_every": 20})
    deadline = time.time() + 180
    # 500 steps (the fixture's limit) of about a millisecond: the job must still be running when its checkpoint is
    # seen (polled every 0.2 s) and the worker killed; with 300 it could come close to finishing first.
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.2)
    worker = http.get("/readyz").json()["worker"]
    os.kill(worker["pid"], signal.SIGKILL)
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    resumed = [e for e in all_events(http, job.id) if e["message"].startswith("resumed from the checkpoint")]
    assert resumed and resumed[0]["data"]["step"] >= 20
    new_worker = http.get("/readyz").json()["worker"]
    assert new_worker["pid"] != worker["pid"] and new_worker["alive"] and new_worker["restarts"] >= 1
    assert client.models.retrieve("survivor").model_extra["latest"]["metrics"]["steps"] == 500


# -- bad input -------------------------------------------------------------------------


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def post_file(http, name, data, purpose="fine-tune"):
    return http.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})


def npz_with_pickle() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=np.array([{"x": 1}], dtype=object))
    return buf.getvalue()


def zip_with(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, b"\x89PNG....")
    return buf.getvalue()


@pytest.mark.parametrize("name, data, purpose, param, needle", [
    ("a.jsonl", b'{"text": "x"}', "assistants", "purpose", "purpose 'assistants' is not supported"),
    ("a.txt", "春眠".encode("gbk"), "fine-tune", "file", "not UTF-8"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"txt": 5}', "fine-tune", "file", "line 3"),
    ("a.jsonl", b'{"text": "ok"}\n{not json', "fine-tune", "file", "line 2: not valid JSON"),
    ("a.jsonl", b'{"messages": [{"role": "wizard", "content": "x"}]}', "fine-tune", "file", "line 1"),
    ("a.txt", b"", "fine-tune", "file", "empty"),
    ("a.exe", b"MZ", "fine-tune", "file", "accepted types"),
    ("a.zip", zip_with("../../etc/passwd.png"), "fine-tune", "file", "unsafe path"),
    ("a.zip", zip_with("model.pkl"), "fine-tune", "file", "only images"),
    ("a.npz", npz_with_pickle(), "fine-tune", "file", "without pickles"),
    ("a.csv", b"a,b\n1,2\n3", "fine-tune", "file", "line 3"),
])
def test_bad_uploads(http, name, data, purpose, param, needle):
    err = error_of(post_file(http, name, data, purpose), 400)
    assert err["param"] == param and needle in err["message"]


def test_upload_over_the_limit_leaves_nothing(tmp_path):
    from conftest import ADMIN_KEY, LiveServer, make_settings

    settings = make_settings(tmp_path, max_upload_bytes=200_000, run_worker=False, shipped_models=False)
    with LiveServer(settings) as small, httpx.Client(base_url=small.url, timeout=30,
                                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        big = b'{"text": "' + b"a" * (settings.max_upload_bytes + 10) + b'"}'
        r = post_file(http, "big.jsonl", big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
        assert "ATELIER_MAX_UPLOAD_BYTES" in r.json()["error"]["message"]
        r = post_file(http, "huge.jsonl", big * 2)  # past the multipart allowance: refused while streaming
        assert r.status_code == 413
        stored = [p for p in settings.blobs_dir.rglob("*") if p.is_file() and p.name != "key-check"]
        assert not stored  # nothing stored, no temp files (key-check is the data key's canary)
        assert post_file(http, "ok.jsonl", b'{"text": "fits"}').status_code == 200


def test_bad_jobs(http, client):
    f = upload(client, "ok.jsonl", jsonl({"text": p + "?"} for p in POEMS))
    table = upload(client, "t.csv", b"x,y\n1,2\n2,4\n")

    def create(**kw):
        return http.post("/v1/fine_tuning/jobs", json={"model": "tang-poet", "training_file": f.id} | kw)

    assert error_of(create(model="nope"), 404)["param"] == "model"
    assert error_of(create(training_file="file-missing"), 404)["param"] == "training_file"
    assert error_of(create(validation_file="file-missing"), 404)["param"] == "validation_file"
    assert error_of(create(training_file=table.id), 400)["param"] == "training_file"
    assert error_of(create(hyperparameters={"n_epochs": 0}), 400)["param"] == "hyperparameters.n_epochs"
    assert error_of(create(hyperparameters={"n_epochs": 1000}), 400)["param"] == "hyperparameters.n_epochs"
    assert error_of(create(hyperparameters={"learning_rate_multiplier": -1}), 400)["param"] == \
        "hyperparameters.learning_rate_multiplier"
    assert error_of(create(hyperparameters={"optimizer": "lamb"}), 400)["param"] == "hyperparameters.optimizer"
    assert error_of(create(hyperparameters={"warp": 9}), 400)["param"] == "hyperparameters"
    assert error_of(create(suffix="Bad Suffix!"), 400)["param"] == "suffix"
    assert error_of(create(model="chargpt"), 400)["param"] == "suffix"
    assert error_of(create(method={"type": "dpo"}), 400)["param"] == "method.type"
    assert error_of(http.get("/v1/fine_tuning/jobs/ftjob-nope"), 404)["param"] == "fine_tuning_job_id"
    # A file used by a queued or running job cannot be deleted.
    job = create(model="chargpt", suffix="busy", hyperparameters=TINY | {"max_steps": 3000}).json()
    assert error_of(http.delete(f"/v1/files/{f.id}"), 409)["code"] == "file_in_use"
    client.fine_tuning.jobs.cancel(job["id"])
    wait_for(client, job["id"], states=("cancelled",))


def test_base_model_that_cannot_be_fine_tuned(http, server, tmp_path):
    from atelier.storage.registry import register_version

    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with server.app.state.sessions() as db:
        register_version(db, server.app.state.blobs, name="painter", family="gram", task="style-transfer",
                         folder=folder)
    f = http.post("/v1/files", files={"file": ("p.txt", "春眠不觉晓".encode())}, data={"purpose": "fine-tune"}).json()
    err = error_of(http.post("/v1/fine_tuning/jobs", json={"model": "painter", "training_file": f["id"]}), 400)
    assert err["param"] == "model" and "does not support fine-tuning" in err["message"]


def houses_csv(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    lines = ["size,rooms,city,price"]
    for _ in range(n):
        size, rooms, city = rng.uniform(30, 200), int(rng.integers(1, 6)), ["paris", "lyon"][int(rng.integers(0, 2))]
        price = 3 * size + 10 * rooms + (50 if city == "paris" else 0) + rng.normal(0, 2)
        lines.append(f"{size:.2f},{rooms},{city},{price:.2f}")
    return "\n".join(lines).encode()


def test_sklearn_train_search_predict_and_fuse(client, http):
    f = upload(client, "houses.csv", houses_csv(120, 0))
    jobs = []
    for estimator, extra in (("ridge", {"search": {"method": "grid", "space": {"alpha": [0.1, 1.0, 10.0]}}}),
                             ("random_forest", {"params": {"n_estimators": 20}})):
        job = client.fine_tuning.jobs.create(model="sklearn", training_file=f.id, suffix="house-prices", seed=1,
                                             hyperparameters={"target": "price", "estimator": estimator, "cv": 3}
                                             | extra)
        jobs.append(wait_for(client, job.id))
    assert [j.status for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    assert [j.fine_tuned_model for j in jobs] == ["house-prices@1", "house-prices@2"]
    messages = [e["message"] for e in all_events(http, jobs[0].id)]
    assert sum("alpha" in m for m in messages) >= 3  # every search candidate is reported
    rows = [{"size": 100.0, "rooms": 3, "city": "paris"}, {"size": 50.0, "rooms": 1, "city": "lyon"}]
    pred = http.post("/api/models/house-prices@1/predict", json={"rows": rows}).json()["predictions"]
    assert abs(pred[0] - 380) < 15 and abs(pred[1] - 160) < 15
    fresh = upload(client, "houses-2.csv", houses_csv(60, 1))
    fused = client.fine_tuning.jobs.create(model="sklearn", training_file=fresh.id, suffix="house-fused",
                                           hyperparameters={"target": "price", "cv": 3, "fuse": {
                                               "method": "voting", "members": ["house-prices@1", "house-prices@2"]}})
    fused = wait_for(client, fused.id)
    assert fused.status == "succeeded", fused.error
    pred = http.post("/api/models/house-fused/predict", json={"rows": rows}).json()["predictions"]
    assert abs(pred[0] - 380) < 25
    bad = client.fine_tuning.jobs.create(model="sklearn", training_file=f.id, suffix="house-bad",
                                         hyperparameters={"target": "no_such_column"})
    bad = wait_for(client, bad.id)
    assert bad.status == "failed" and bad.error.param == "hyperparameters.target"


def test_kill_9_of_the_server_resumes_the_job_on_restart(tmp_path):

    from conftest import ADMIN_KEY, free_port, serve_process

    port = free_port()
    env = os.environ | {"ATELIER_HOME": str(tmp_path), "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": ADMIN_KEY}

    def start():
        return serve_process(env, port, ready=lambda readyz: readyz["worker"]["alive"])

    server = start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=ADMIN_KEY, max_retries=0)
        f = upload(client, "crash.txt", "\n\n".join(POEMS * 3).encode())
        job = client.fine_tuning.jobs.create(model="chargpt", training_file=f.id, suffix="phoenix",
                                             hyperparameters=TINY | {"max_steps": 2000, "eval_every": 20})
        deadline = time.time() + 120
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
            assert time.time() < deadline, "no checkpoint"
            time.sleep(0.2)
        worker_pid = httpx.get(f"http://127.0.0.1:{port}/readyz",
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["worker"]["pid"]
        server.kill()  # SIGKILL: no shutdown hooks run
        server.wait()
        deadline = time.time() + 60  # the orphaned worker notices and leaves
        while os.path.exists(f"/proc/{worker_pid}") and time.time() < deadline:
            time.sleep(0.2)
        server = start()
        job = wait_for(client, job.id)
        assert job.status == "succeeded" and job.fine_tuned_model == "phoenix@1", job.error
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as h:
            resumed = [e for e in all_events(h, job.id) if e["message"].startswith("resumed from the checkpoint")]
        assert resumed and resumed[0]["data"]["step"] >= 20
    finally:
        server.terminate()
        server.wait(timeout=30)


def squares_npz(extra_word: str = "") -> bytes:
    """12 images of a red or blue square on white, captioned by colour."""
    rng = np.random.default_rng(0)
    images = np.full((12, 32, 32, 3), 255, dtype=np.uint8)
    names = []
    for i in range(12):
        color = [(220, 30, 30), (30, 30, 220)][i % 2]
        y, x = rng.integers(4, 16, size=2)
        images[i, y:y + 12, x:x + 12] = color
        names.append(["red square", "blue square"][i % 2] + extra_word)
    buf = io.BytesIO()
    np.savez(buf, images=images, names=np.array(names))
    return buf.getvalue()


def test_image_model_from_scratch_as_a_job(client):
    f = upload(client, "squares.npz", squares_npz())
    assert f.model_extra["format"] == "npz" and f.model_extra["records"] == 12
    for family in ("ddpm", "dcgan"):
        job = client.fine_tuning.jobs.create(model=family, training_file=f.id, suffix=f"squares-{family}",
                                             hyperparameters={"max_steps": 4, "batch_size": 4, "eval_every": 2})
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"squares-{family}@1"
        r = client.images.generate(model=f"squares-{family}", prompt="red square", n=1, size="32x32",
                                   response_format="b64_json",
                                   extra_body={"seed": 1} | ({"steps": 4} if family == "ddpm" else {}))
        assert r.data[0].b64_json
    text = upload(client, "t.txt", "春眠不觉晓".encode())
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="ddpm", training_file=text.id, suffix="nope")
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="ddpm", training_file=f.id, suffix="nope", hyperparameters={"n_embd": 8})
    assert e.value.body["param"] == "hyperparameters"


def test_fine_tune_the_shipped_image_models(client, http):
    f = upload(client, "my-squares.npz", squares_npz(" zorblax"))
    for base in ("emoji-diffusion", "emoji-gan"):
        before = client.models.retrieve(base).model_extra
        job = client.fine_tuning.jobs.create(model=base, training_file=f.id, suffix="squares",
                                             hyperparameters={"max_steps": 2, "batch_size": 4, "eval_every": 2})
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"{base}:ft-squares"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any("fine-tuning " + base in m for m in messages)
        assert any("cannot read, ignored: zorblax" in m for m in messages)
        after = client.models.retrieve(base).model_extra
        assert after["aliases"]["production"] == before["aliases"]["production"]  # production does not move
        tuned = client.models.retrieve(f"{base}:ft-squares").model_extra["latest"]
        assert tuned["files"]["upscaler.safetensors"] == before["latest"]["files"]["upscaler.safetensors"]
        assert tuned["files"]["model.safetensors"] != before["latest"]["files"]["model.safetensors"]
        r = http.post("/v1/images/generations", json={"model": f"{base}:ft-squares", "prompt": "red square",
                                                      "size": "64x64", "seed": 3})
        assert r.status_code == 200 and r.json()["model"] == tuned["ref"]
        assert "Hires upscaler: learned" in read_png_text(base64.b64decode(r.json()["data"][0]["b64_json"]))["parameters"]


def test_bad_sklearn_hyperparameters_are_refused_at_creation(http, client):
    table = upload(client, "h.csv", houses_csv(20, 3))

    def create(hyper):
        return http.post("/v1/fine_tuning/jobs", json={"model": "sklearn", "training_file": table.id,
                                                       "suffix": "never-sk", "hyperparameters": hyper})

    assert error_of(create({"target": "price", "estimator": "svm"}), 400)["param"] == "hyperparameters.estimator"
    assert error_of(create({"target": "price", "cv": 1}), 400)["param"] == "hyperparameters.cv"
    assert error_of(create({"estimator": "ridge"}), 400)["param"] == "hyperparameters.target"
    assert error_of(create({"target": "price", "alpha": 1}), 400)["param"] == "hyperparameters"
