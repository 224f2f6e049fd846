"""Model lifecycle through the server and the CLI: promote, rollback, delete, export/import."""

import io
import json
import subprocess
import sys
import zipfile

import pytest

from conftest import ADMIN_KEY

CLI = [sys.executable, "-m", "atelier.cli"]


def cli(server, *args, timeout=300):
    import os

    env = os.environ | {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY, "COLUMNS": "200",
                        "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


@pytest.fixture(scope="module")
def poet_versions(server):
    """Import tang-poet twice under a new name: poet@1 and poet@2, identical weights."""
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as http:
        archive = http.get("/api/models/tang-poet@1/export").content
        for _ in range(2):
            r = http.post("/api/models/import", files={"file": ("poet.zip", archive)}, data={"name": "poet"})
            assert r.status_code == 200, r.text
    return archive


def test_export_import_round_trip_gives_identical_outputs(client, poet_versions):
    z = zipfile.ZipFile(io.BytesIO(poet_versions))
    manifest = json.loads(z.read("manifest.json"))
    assert manifest["name"] == "tang-poet" and set(manifest["files"]) >= {"config.json", "model.safetensors"}
    kw = dict(prompt="春江潮水连海平，", max_tokens=20, seed=11)
    a = client.completions.create(model="tang-poet@1", **kw).choices[0].text
    b = client.completions.create(model="poet@1", **kw).choices[0].text
    assert a == b


def test_promote_and_rollback(http, poet_versions):
    assert http.post("/api/models/poet/aliases", json={"alias": "production", "version": 2}).status_code == 200
    assert http.get("/v1/models/poet:production").json()["latest"]["version"] == 2
    out = http.post("/api/models/poet/rollback", json={"alias": "production"}).json()
    assert out["aliases"]["production"] == 1
    assert error_of(http.post("/api/models/poet/rollback", json={"alias": "production"}), 409)["param"] == "alias"
    assert error_of(http.post("/api/models/poet/aliases", json={"alias": "production", "version": 9}), 404)
    assert error_of(http.post("/api/models/poet/aliases", json={"alias": "Bad Alias", "version": 1}), 400)


def test_delete_refuses_aliased_versions_unless_forced(http, poet_versions):
    http.post("/api/models/poet/aliases", json={"alias": "keep", "version": 2})
    assert error_of(http.delete("/api/models/poet@2"), 409)["code"] == "version_has_aliases"
    r = http.delete("/api/models/poet@2", params={"force": "true"}).json()
    assert r["deleted"] and "keep" in r["removed_aliases"]
    assert error_of(http.get("/v1/models/poet@2"), 404)
    assert error_of(http.delete("/api/models/poet"), 400)["param"] == "model"


def zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in entries.items():
            z.writestr(k, v)
    return buf.getvalue()


def tampered(archive: bytes, **changes) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(archive))
    entries = {n: z.read(n) for n in z.namelist()}
    entries.update(changes)
    return zip_of(entries)


@pytest.mark.parametrize("mutate, needle", [
    (lambda a: tampered(a, **{"model.pkl": b"\x80\x04K\x01."}), "no pickle"),
    (lambda a: tampered(a, **{"../evil.json": b"{}"}), "unsafe path"),
    (lambda a: tampered(a, **{"model.safetensors": b"not the weights"}), "sha256 does not match"),
    (lambda a: zip_of({"config.json": b"{}"}), "not a model Atelier can import"),  # no manifest: a folder you bring
    (lambda a: b"not a zip", "neither a .zip of a model folder nor an .onnx file"),
])
def test_import_refuses_bad_archives(http, poet_versions, mutate, needle):
    before = http.get("/v1/models").json()
    r = http.post("/api/models/import", files={"file": ("x.zip", mutate(poet_versions))})
    err = error_of(r, 400)
    assert needle in err["message"] and err["param"] == "file"
    assert http.get("/v1/models").json() == before  # nothing registered half-way


def test_cli_lifecycle_and_hf_export(server, tmp_path, poet_versions):
    r = cli(server, "models", "promote", "poet@1", "--alias", "stable")
    assert r.returncode == 0, r.stderr
    assert "poet:stable → poet@1" in r.stdout
    r = cli(server, "models", "export", "poet@1", "-o", str(tmp_path / "p.zip"))
    assert r.returncode == 0 and zipfile.is_zipfile(tmp_path / "p.zip")
    r = cli(server, "models", "import", str(tmp_path / "p.zip"), "--name", "poet-copy")
    assert "imported poet-copy@1" in r.stdout, r.stderr
    r = cli(server, "models", "export", "poet@1", "--format", "hf", "-o", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    transformers = pytest.importorskip("transformers")
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.n_positions == 192
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # was KeyError 'added_tokens'
    assert tok.decode(tok.encode("春眠不觉晓"), skip_special_tokens=True) == "春眠不觉晓"
    assert tok.encode("春")[0] == tok.bos_token_id  # <bos> first, as chargpt was trained
    assert cli(server, "models", "delete", "poet-copy@1", "--force").returncode == 0
    assert cli(server, "models", "promote", "poet", "--alias", "x").returncode == 2


def test_cli_train_follow_and_jobs(server, tmp_path):
    data = tmp_path / "mine.txt"
    data.write_text("\n\n".join(["春眠不觉晓，处处闻啼鸟。", "床前明月光，疑是地上霜。"] * 6), encoding="utf-8")
    r = cli(server, "train", "--data", str(data), "--name", "followed", "--follow", "--steps", "8",
            "--batch-size", "4", "--context", "32", "--n-embd", "32", "--n-layer", "1", "--n-head", "2",
            "--eval-every", "4", "--warmup", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded: followed@1" in r.stdout and "registering the new version" in r.stdout
    job_id = r.stdout.split()[1]
    assert job_id in cli(server, "jobs", "list").stdout
    assert json.loads(cli(server, "jobs", "show", job_id).stdout)["status"] == "succeeded"
    assert "succeeded" in cli(server, "jobs", "follow", job_id).stdout
    assert cli(server, "jobs", "cancel", job_id).returncode == 1  # already finished: a 409
