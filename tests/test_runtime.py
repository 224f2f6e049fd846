"""The one runtime, through the real server: what is loaded (/api/ps), load/unload, LRU eviction
under ATELIER_MAX_LOADED_MODELS, the memory budget, keep_alive, unloading mid-stream, and
decrypted folders removed on eviction and at shutdown. Also the job worker with the data key
given by environment (it used to receive "**********")."""

from __future__ import annotations

import base64
import json
import secrets
import time

import httpx
import pytest

from atelier.jobs.supervisor import settings_env
from atelier.common.durations import parse_keep_alive
from conftest import ADMIN_KEY, LiveServer, admin_http, admin_openai, make_settings, make_tiny_image_models


@pytest.fixture(scope="module")
def small_runtime(tmp_path_factory):
    """One model at a time, tang-poet (shipped) and a tiny GAN registered."""
    from atelier.storage.registry import register_version

    settings = make_settings(tmp_path_factory.mktemp("runtime-home"), max_loaded_models=1, run_worker=False,
                             max_body_bytes=200_000)
    folders = make_tiny_image_models(tmp_path_factory.mktemp("runtime-models"))
    with LiveServer(settings) as s:
        with s.app.state.sessions() as db:
            register_version(db, s.app.state.blobs, name="tiny-gan", family="dcgan", task="image-generation",
                             folder=folders["tiny-gan"])
        yield s


@pytest.fixture()
def rt(small_runtime):
    with admin_http(small_runtime) as c:
        for row in c.get("/api/ps").json()["data"]:  # every test starts with nothing loaded
            c.post(f"/api/models/{row['model']}/unload")
        yield c


def loaded(http) -> list[str]:
    return [row["model"] for row in http.get("/api/ps").json()["data"]]


def test_keep_alive_forms():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("30s") == 30 and parse_keep_alive("500ms") == 0.5
    assert parse_keep_alive(0) == 0 and parse_keep_alive("-1") is None and parse_keep_alive(-5) is None
    for bad in ("soon", "5 minutes", True, "1h30m"):
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


def test_ps_load_unload_and_lru_eviction(rt, small_runtime):
    ps = rt.get("/api/ps").json()
    assert ps["object"] == "list" and ps["data"] == [] and ps["max_loaded_models"] == 1
    r = rt.post("/api/models/tang-poet/load", json={"keep_alive": -1})
    assert r.status_code == 200, r.text
    row = r.json()
    assert row["model"] == "tang-poet@1" and row["family"] == "chargpt" and row["engine"] == "text"
    assert row["size_bytes"] > 10_000_000 and row["expires_at"] is None
    assert row["decoding"] == "native"  # the kernels make built (atelier/common/native/)
    assert loaded(rt) == ["tang-poet@1"]
    # A request for another model evicts the least recently used one (the limit is 1).
    client = admin_openai(small_runtime)
    client.images.generate(model="tiny-gan", prompt="red apple", extra_body={"seed": 1})
    assert loaded(rt) == ["tiny-gan@1"]
    assert small_runtime.app.state.manager.evictions >= 1
    r = rt.post("/api/models/tiny-gan/unload")
    assert r.json() == {"model": "tiny-gan@1", "unloaded": True}
    assert rt.post("/api/models/tiny-gan/unload").json()["unloaded"] is False
    assert loaded(rt) == []
    audit = rt.get("/api/audit", params={"limit": 200}).json()["data"]
    assert {"model.load", "model.unload"} <= {e["action"] for e in audit}


def test_a_loaded_model_stays_out_of_the_collectors_passes_and_is_freed_when_unloaded(rt):
    """What a load builds is frozen (no full collection walks it again: one took 160 ms of the event loop); an
    unload gives everything frozen back to the collector, so that reference cycles that were alive at a load
    and are garbage now (a model's own, say) are freed."""
    import gc
    import weakref

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle
    alive = weakref.ref(cycle)
    frozen = gc.get_freeze_count()
    assert rt.post("/api/models/tang-poet/load", json={"keep_alive": -1}).status_code == 200
    assert gc.get_freeze_count() > frozen  # the cycle with them
    del cycle
    gc.collect()
    assert alive() is not None  # frozen: no collection frees it
    assert rt.post("/api/models/tang-poet/unload").json()["unloaded"] is True
    assert alive() is None


def test_keep_alive_zero_unloads_after_the_request_and_a_duration_expires(rt, small_runtime):
    client = admin_openai(small_runtime)
    out = client.completions.create(model="tang-poet", prompt="春", max_tokens=3, seed=1,
                                    extra_body={"keep_alive": 0})
    assert out.choices[0].text
    assert loaded(rt) == []
    client.completions.create(model="tang-poet", prompt="春", max_tokens=3, seed=1, extra_body={"keep_alive": "1s"})
    row = rt.get("/api/ps").json()["data"][0]
    assert row["model"] == "tang-poet@1" and row["expires_at"] is not None and row["in_use"] == 0
    deadline = time.time() + 10
    while loaded(rt) and time.time() < deadline:
        time.sleep(0.2)
    assert loaded(rt) == []


def test_bad_keep_alive_is_a_400_and_loads_nothing(rt):
    r = rt.post("/v1/completions", json={"model": "tang-poet", "prompt": "春", "keep_alive": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
    r = rt.post("/api/models/tang-poet/load", json={"keep_alive": "forever"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
    r = rt.post("/api/models/tang-poet/load", json={"keep_alive": 1, "extra": 2})
    assert r.status_code == 400 and "extra" in r.json()["error"]["message"]
    assert loaded(rt) == []


def test_scopes_for_runtime_routes(rt):
    secret = rt.post("/api/keys", json={"name": "reader", "scopes": ["read"]}).json()["key"]
    with httpx.Client(base_url=str(rt.base_url), headers={"Authorization": f"Bearer {secret}"}) as reader:
        assert reader.get("/api/ps").status_code == 200
        assert reader.post("/api/models/tang-poet/load").status_code == 403
        assert reader.post("/api/models/tang-poet/unload").status_code == 403
    assert rt.post("/api/models/no-such-model/load").status_code == 404


def test_unload_mid_stream_ends_the_stream_with_a_clear_error(rt, small_runtime):
    """An engine that closes fails its running requests: the stream ends, it does not hang."""
    body = {"model": "tang-poet", "prompt": "春", "max_tokens": 100, "stream": True, "ignore_eos": True, "seed": 3,
            "keep_alive": -1}
    events = []
    manager = small_runtime.app.state.manager
    with httpx.Client(base_url=small_runtime.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        started = time.time()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            events.append(json.loads(line[6:]))
            if len(events) == 1:  # the first token is here; 99 are still to come
                assert manager.unload("tang-poet", 1)  # what POST /api/models/tang-poet/unload does
        assert time.time() - started < 20
    errors = [e["error"] for e in events if "error" in e]
    texts = [e for e in events if "choices" in e]
    assert texts, "some text streamed before the unload"
    assert len(errors) == 1 and errors[0]["code"] == "model_unloaded" and errors[0]["type"] == "server_error"
    assert "unloaded" in errors[0]["message"]
    assert loaded(rt) == []
    # The model loads again on the next request.
    assert rt.post("/v1/completions", json={"model": "tang-poet", "prompt": "春", "max_tokens": 2}).status_code == 200


def test_decrypted_folders_go_on_eviction_and_at_shutdown(tmp_path):
    settings = make_settings(tmp_path / "home", max_loaded_models=1, run_worker=False)
    with LiveServer(settings) as s, admin_http(s) as http:
        blobs = s.app.state.blobs
        assert blobs.encrypted
        http.post("/api/models/tang-poet/load", json={"keep_alive": -1})
        root = blobs._plain_root
        folder = root / "tang-poet" / "1"
        assert (folder / "model.safetensors").exists()
        http.post("/api/models/style-transfer/load")  # evicts tang-poet
        assert not folder.exists()
        assert (root / "style-transfer" / "1" / "model.safetensors").exists()
    assert not root.exists(), "the unpacked plaintexts outlived the server"


def test_a_model_larger_than_the_memory_budget_is_a_503(tmp_path):
    settings = make_settings(tmp_path / "home", max_model_memory=1_000_000, run_worker=False)
    with LiveServer(settings) as s, admin_http(s) as http:
        r = http.post("/v1/completions", json={"model": "tang-poet", "prompt": "春", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_too_large"
        assert "ATELIER_MAX_MODEL_MEMORY" in r.json()["error"]["message"]
        r = http.post("/api/models/style-transfer/load")  # small enough
        assert r.status_code == 200 and r.json()["size_bytes"] < 1_000_000


def test_worker_gets_the_data_key_itself_not_its_mask(tmp_path):
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    settings = make_settings(tmp_path / "home", secret_key=key)
    env = settings_env(settings)
    assert env["ATELIER_SECRET_KEY"] == key


def test_a_job_trains_with_encryption_on_and_the_key_from_the_environment(tmp_path):
    """The worker process opens the encrypted upload and seals the new version with the same key."""
    from test_jobs import POEMS, TINY, upload, wait_for

    key = base64.b64encode(secrets.token_bytes(32)).decode()
    settings = make_settings(tmp_path / "home", secret_key=key, shipped_models=False)
    with LiveServer(settings) as s:
        client = admin_openai(s)
        f = upload(client, "tiny.txt", "\n\n".join(POEMS * 3).encode("utf-8"))
        job = client.fine_tuning.jobs.create(model="chargpt", training_file=f.id, suffix="sealed-poet",
                                             hyperparameters=TINY | {"max_steps": 4, "eval_every": 2})
        job = wait_for(client, job.id, timeout=180)
        assert job.status == "succeeded", job.error
        assert client.completions.create(model="sealed-poet", prompt="春", max_tokens=3, seed=0).choices[0].text
        assert not (tmp_path / "home" / "secret.key").exists()  # the key came from the environment only
        # The finished job's folder (a plaintext copy of the upload, checkpoints, weights) is gone.
        assert not (tmp_path / "home" / "jobs" / job.id).exists()


def test_sigterm_of_atelier_serve_leaves_no_decrypted_folder(tmp_path):
    """`atelier serve` stopped by SIGTERM (systemd, docker stop) deletes the unpacked plaintexts:
    atexit does not run after uvicorn re-raises the signal, so shutdown must do it."""
    import os
    import signal

    from atelier.storage.blobs import PLAIN_PREFIX
    from conftest import free_port, serve_process

    port = free_port()
    env = os.environ | {"ATELIER_HOME": str(tmp_path / "home"), "ATELIER_PORT": str(port),
                        "ATELIER_ADMIN_KEY": ADMIN_KEY, "ATELIER_RUN_WORKER": "false", "ATELIER_LOG_LEVEL": "warning"}
    proc = serve_process(env, port)
    try:
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(url + "/api/models/style-transfer/load", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       timeout=60)
        assert r.status_code == 200, r.text
        roots = [p for base in ("/dev/shm", "/tmp") if os.path.isdir(base)
                 for p in __import__("pathlib").Path(base).glob(f"{PLAIN_PREFIX}{proc.pid}-*")]
        assert roots and any((r / "style-transfer" / "1" / "model.safetensors").exists() for r in roots)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not any(r.exists() for r in roots), "decrypted weights stayed behind after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_temp_files_of_crashed_blob_writes_are_removed_at_start(tmp_path):
    import os

    settings = make_settings(tmp_path / "home", run_worker=False, shipped_models=False)
    folder = settings.blobs_dir / "sha256" / "ab"
    folder.mkdir(parents=True)
    import subprocess
    import sys

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)
    stale, fresh = folder / ".abcd.1234.tmp", folder / f".abce.pid{os.getpid()}.5678.tmp"
    crashed = folder / f".abcf.pid{dead_pid}.9abc.tmp"  # fresh, but its writer is gone
    for p in (stale, fresh, crashed):
        p.write_bytes(b"part of a blob")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with LiveServer(settings):
        assert not stale.exists() and not crashed.exists() and fresh.exists()


def test_kill_9_during_an_upload_leaves_the_file_absent_or_whole(tmp_path):
    """The server killed while it writes an upload: after a restart the file is listed whole or not at
    all, and no temp file of the interrupted write is left in the blob store."""
    import hashlib
    import os
    import signal
    import threading

    from conftest import ADMIN_KEY, free_port, serve_process

    home, port = tmp_path / "home", free_port()
    env = os.environ | {"ATELIER_HOME": str(home), "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": ADMIN_KEY,
                        "ATELIER_RUN_WORKER": "false", "ATELIER_SHIPPED_MODELS": "false", "ATELIER_LOG_LEVEL": "warning"}
    url = f"http://127.0.0.1:{port}"

    data = ("\n\n".join(["春眠不觉晓，处处闻啼鸟。"] * 600_000)).encode()  # ~20 MB of plain text
    proc = serve_process(env, port)
    try:
        def upload():
            try:
                httpx.post(url + "/v1/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60,
                           files={"file": ("big.txt", data)}, data={"purpose": "fine-tune"})
            except httpx.HTTPError:
                pass  # the server died under it

        t = threading.Thread(target=upload)
        t.start()
        time.sleep(0.6)  # somewhere inside the upload: reading, checking, sealing or writing
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t.join(30)
        proc = serve_process(env, port)
        files = httpx.get(url + "/v1/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
        for f in files:
            content = httpx.get(f"{url}/v1/files/{f['id']}/content",
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"}).content
            assert hashlib.sha256(content).hexdigest() == hashlib.sha256(data).hexdigest()  # whole
        assert not list((home / "blobs").rglob("*.tmp"))
    finally:
        proc.kill()
