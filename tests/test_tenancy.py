"""Tenancy, tried as an attacker would (issue #10, defects 1 and 2): two train keys cannot see or
touch each other's files, jobs, models or fine-tunes — another key's resource is a 404, exactly
like one that does not exist — and cannot take over a name, a suffix or a shared model's aliases."""

from __future__ import annotations

import io
import zipfile

import httpx
import pytest

from conftest import admin_http
from test_jobs import POEMS, TINY, jsonl, wait_for


def key_client(server, name: str, scopes=("train", "generate")) -> httpx.Client:
    with admin_http(server) as admin:
        secret = admin.post("/api/keys", json={"name": name, "scopes": list(scopes)}).json()["key"]
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=120)


@pytest.fixture(scope="module")
def alice(server):
    with key_client(server, "alice") as c:
        yield c


@pytest.fixture(scope="module")
def bob(server):
    with key_client(server, "bob") as c:
        yield c


def upload(c: httpx.Client, name: str, data: bytes) -> dict:
    r = c.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()


def sdk_wait(server, job_id):
    from conftest import admin_openai

    return wait_for(admin_openai(server), job_id)


def test_files_are_their_keys_own(alice, bob, http):
    data = "\n\n".join(POEMS).encode("utf-8") + b"\n\nalice"
    f = upload(alice, "alice.txt", data)
    assert f["id"] in [x["id"] for x in alice.get("/v1/files").json()["data"]]
    assert f["id"] not in [x["id"] for x in bob.get("/v1/files").json()["data"]]
    for method, path in (("GET", f"/v1/files/{f['id']}"), ("GET", f"/v1/files/{f['id']}/content"),
                         ("DELETE", f"/v1/files/{f['id']}")):
        r = bob.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["message"] == f"file {f['id']!r} does not exist"
    # the same bytes uploaded by bob are bob's own record, not a pointer to alice's
    g = upload(bob, "bob.txt", data)
    assert g["id"] != f["id"] and "duplicate" not in g
    # bob cannot train on alice's file either
    r = bob.post("/v1/fine_tuning/jobs", json={"model": "chargpt", "training_file": f["id"], "suffix": "bobs"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
    assert f["id"] in [x["id"] for x in http.get("/v1/files").json()["data"]]  # the admin sees everyone's
    assert alice.get(f"/v1/files/{f['id']}/content").content == data


def test_jobs_are_their_keys_own(alice, bob, server):
    f = upload(alice, "alice-job.txt", "\n\n".join(POEMS * 2).encode("utf-8"))
    job = alice.post("/v1/fine_tuning/jobs", json={"model": "chargpt", "training_file": f["id"],
                                                   "suffix": "alice-poet",
                                                   "hyperparameters": TINY | {"max_steps": 2, "eval_every": 2}}).json()
    assert job["id"] not in [j["id"] for j in bob.get("/v1/fine_tuning/jobs").json()["data"]]
    for method, path in (("GET", f"/v1/fine_tuning/jobs/{job['id']}"), ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
                         ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
                         ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")):
        assert bob.request(method, path).status_code == 404, path
    done = sdk_wait(server, job["id"])
    assert done.status == "succeeded", done.error
    # the model it made is alice's: bob neither lists, reads, calls, promotes nor imports over it
    assert "alice-poet" in [m["id"] for m in alice.get("/v1/models").json()["data"]]
    assert "alice-poet" not in [m["id"] for m in bob.get("/v1/models").json()["data"]]
    assert bob.get("/v1/models/alice-poet").status_code == 404
    r = bob.post("/v1/completions", json={"model": "alice-poet", "prompt": "春", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["message"] == "model 'alice-poet' does not exist"
    assert bob.post("/api/models/alice-poet/aliases", json={"alias": "production", "version": 1}).status_code == 404
    assert bob.get("/api/models/alice-poet@1/export").status_code == 404
    assert bob.post("/api/models/alice-poet/load").status_code == 404
    r = bob.post("/v1/fine_tuning/jobs", json={"model": "chargpt", "training_file": upload(bob, "b.txt", b"x" * 400)["id"],
                                               "suffix": "alice-poet"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "suffix_taken"
    assert alice.post("/v1/completions", json={"model": "alice-poet", "prompt": "春", "max_tokens": 2}).status_code == 200
    assert alice.post("/api/models/alice-poet/aliases", json={"alias": "production", "version": 1}).status_code == 200


def test_a_fine_tune_of_a_shared_model_is_its_keys_own(alice, bob, server):
    f = upload(alice, "alice-ft.jsonl", jsonl({"prompt": p.split("\n")[0] + "\n", "completion": p.split("\n")[1]}
                                              for p in POEMS))
    job = alice.post("/v1/fine_tuning/jobs", json={"model": "tang-poet", "training_file": f["id"], "suffix": "mine",
                                                   "hyperparameters": {"max_steps": 1, "batch_size": 2}}).json()
    assert sdk_wait(server, job["id"]).status == "succeeded"
    alices = {m["id"]: m for m in alice.get("/v1/models").json()["data"]}
    number = alices["tang-poet:ft-mine"]["latest"]["version"]
    listed = {m["id"]: m for m in bob.get("/v1/models").json()["data"]}
    assert "tang-poet:ft-mine" not in listed and "ft-mine" not in listed["tang-poet"]["aliases"]
    assert number not in [v["version"] for v in listed["tang-poet"]["versions"]]  # alice's version is not shown
    assert bob.get(f"/v1/models/tang-poet@{number}").status_code == 404
    assert bob.post("/v1/completions", json={"model": "tang-poet:ft-mine", "prompt": "春",
                                             "max_tokens": 2}).status_code == 404
    assert bob.post("/v1/completions", json={"model": "tang-poet", "prompt": "春", "max_tokens": 2}).status_code == 200
    # bob cannot reuse the suffix to move alice's alias
    r = bob.post("/v1/fine_tuning/jobs", json={"model": "tang-poet", "suffix": "mine",
                                               "training_file": upload(bob, "b.txt", POEMS[0].encode())["id"]})
    assert r.status_code == 409 and r.json()["error"]["param"] == "suffix"
    assert alice.post("/v1/completions", json={"model": "tang-poet:ft-mine", "prompt": "春",
                                               "max_tokens": 2}).status_code == 200


def test_shared_models_are_read_by_all_and_changed_by_admins_only(alice, http):
    r = alice.post("/api/models/tang-poet/aliases", json={"alias": "latest", "version": 1})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_owner"
    assert alice.post("/api/models/tang-poet/rollback", json={"alias": "production"}).status_code == 403
    # an import cannot move what everyone gets for plain `tang-poet`
    archive = http.get("/api/models/tang-poet@1/export").content
    r = alice.post("/api/models/import", files={"file": ("t.zip", archive)}, data={"name": "tang-poet"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"
    r = alice.post("/api/models/import", files={"file": ("t.zip", archive)})  # the archive's own name
    assert r.status_code == 409
    assert http.get("/v1/models/tang-poet").json()["aliases"]["latest"] == 1
    # importing under a new name makes alice's own model, which bob does not see
    r = alice.post("/api/models/import", files={"file": ("t.zip", archive)}, data={"name": "alice-copy"})
    assert r.status_code == 200 and r.json()["owned_by"] != "atelier"


def test_import_of_a_users_model_over_another_keys_name_is_refused(alice, bob):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "not a model")
    r = bob.post("/api/models/import", files={"file": ("m.zip", buf.getvalue())}, data={"name": "alice-copy"})
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
