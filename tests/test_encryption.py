"""Encryption at rest: blobs are sealed on disk, served in the clear, and guarded by the key."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest

from atelier.config import Settings
from atelier.storage.blobs import BlobStore, open_blobs
from atelier.safety import crypto
from conftest import LiveServer, admin_http, free_port, make_settings

MARKER = "a line only this upload contains: 月落乌啼霜满天"


def blob_files(home):
    return [p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file()]


def test_uploads_and_weights_are_sealed_on_disk_and_served_in_the_clear(tmp_path):
    settings = make_settings(tmp_path / "home", run_worker=False)
    with LiveServer(settings) as live, admin_http(live) as http:
        data = ('{"text": "%s"}\n' % MARKER).encode()
        f = http.post("/v1/files", files={"file": ("mine.jsonl", data)}, data={"purpose": "fine-tune"}).json()
        assert http.get(f"/v1/files/{f['id']}/content").content == data  # the API serves the plaintext
        r = http.post("/v1/completions", json={"model": "tang-poet", "prompt": "床前明月光，", "max_tokens": 4,
                                               "seed": 1})
        assert r.status_code == 200  # the model loads from sealed weights
    files = blob_files(settings.home_dir)
    assert files and all(p.read_bytes().startswith(crypto.MAGIC) for p in files)
    on_disk = b"".join(p.read_bytes() for p in files)
    assert MARKER.encode() not in on_disk and b"safetensors" not in on_disk and b'"n_embd"' not in on_disk
    key_file = settings.home_dir / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    # Versions are unpacked for loading into a private in-memory folder, never beside the store.
    assert not (settings.home_dir / "versions").exists()


def test_a_tampered_blob_is_refused_not_served(tmp_path):
    settings = make_settings(tmp_path / "home", run_worker=False, shipped_models=False)
    with LiveServer(settings) as live, admin_http(live) as http:
        f = http.post("/v1/files", files={"file": ("t.txt", "春眠不觉晓".encode())}, data={"purpose": "fine-tune"}).json()
        (path,) = blob_files(settings.home_dir)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
        r = http.get(f"/v1/files/{f['id']}/content")
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "blob_unreadable" and "failed authentication" in err["message"]


def test_the_wrong_key_refuses_to_start_and_the_right_one_reads(tmp_path):
    home = tmp_path / "home"
    key = base64.b64encode(os.urandom(32)).decode()
    settings = make_settings(home, run_worker=False, shipped_models=False, secret_key=key)
    blobs = open_blobs(settings)
    digest = blobs.put_bytes(b"my weights")
    assert not (home / "secret.key").exists()  # the key came from the environment
    other = make_settings(home, secret_key=base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(ValueError, match="does not open"):
        open_blobs(other)
    assert open_blobs(make_settings(home, secret_key=key)).get_bytes(digest) == b"my weights"
    with pytest.raises(ValueError, match="base64 of 32"):
        open_blobs(make_settings(home, secret_key="too-short"))
    # The CLI says why, with no traceback.
    env = os.environ | {"ATELIER_HOME": str(home), "ATELIER_PORT": str(free_port()),
                        "ATELIER_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(), "ATELIER_RUN_WORKER": "false"}
    r = subprocess.run([sys.executable, "-m", "atelier.cli", "serve"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 2 and "cannot start" in r.stderr and "Traceback" not in r.stderr


def test_plain_blobs_from_before_stay_readable_and_off_means_plain(tmp_path):
    plain = BlobStore(tmp_path / "blobs")
    digest = plain.put_bytes(b"written before encryption")
    assert plain.path(digest).read_bytes() == b"written before encryption"
    sealed = BlobStore(tmp_path / "blobs", key=os.urandom(32))
    assert sealed.get_bytes(digest) == b"written before encryption"  # no MAGIC: read as it is
    new = sealed.put_bytes(b"written after")
    with pytest.raises(crypto.SealError, match="no data key"):
        plain.get_bytes(new)
    settings = Settings(home=tmp_path / "off", encrypt_at_rest=False)
    assert open_blobs(settings).key is None and not (tmp_path / "off" / "secret.key").exists()


def test_exported_archive_holds_plaintext_that_imports_elsewhere(tmp_path):
    """An export is for moving a model: plaintext files, verified by their sha256 on import."""
    settings = make_settings(tmp_path / "a", run_worker=False)
    with LiveServer(settings) as live, admin_http(live) as http:
        archive = http.get("/api/models/tang-poet@1/export")
        assert archive.status_code == 200
    other = make_settings(tmp_path / "b", run_worker=False, shipped_models=False)
    with LiveServer(other) as live, admin_http(live) as http:
        r = http.post("/api/models/import", files={"file": ("m.zip", archive.content)}, data={"name": "copy"})
        assert r.status_code in (200, 201), r.text
        out = http.post("/v1/completions", json={"model": "copy", "prompt": "春", "max_tokens": 3, "seed": 2})
        assert out.status_code == 200


def test_unpacked_folders_of_dead_processes_are_removed(tmp_path):
    from atelier.storage.blobs import _remove_orphans, PLAIN_PREFIX

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has just exited
    orphan, ours = tmp_path / f"{PLAIN_PREFIX}{dead}-abc", tmp_path / f"{PLAIN_PREFIX}{os.getpid()}-def"
    for d in (orphan, ours):
        (d / "m").mkdir(parents=True)
    _remove_orphans(tmp_path)
    assert not orphan.exists() and ours.exists()
