"""The artifact store: blobs first then rows, deduplication, paging, signed links."""

import hashlib
import os
import stat

import pytest

from atelier.storage.artifacts import (check_signature, create_artifact, get_artifact, list_artifacts, signature,
                                        signed_path, signing_secret)
from conftest import database_url

from atelier.storage.db import Artifact, make_engine, make_sessionmaker
from atelier.storage.blobs import BlobStore
from atelier.storage.registry import NotFound


@pytest.fixture()
def store(tmp_path):
    sessions = make_sessionmaker(make_engine(database_url(tmp_path)))
    with sessions() as db:
        yield db, BlobStore(tmp_path / "blobs")


def test_create_list_page_and_dedup(store):
    db, blobs = store
    made = [create_artifact(db, blobs, kind="image", data=b"png-%d" % (i % 2), mime="image/png",
                            model_ref=f"emoji-diffusion@{1 + i % 2}", key_id="key_a" if i < 4 else "key_b",
                            params={"seed": i}) for i in range(6)]
    poem = create_artifact(db, blobs, kind="poem", data="床前明月光".encode(), mime="text/plain", model_ref="tang-poet@1")
    assert len({a.sha256 for a in made}) == 2  # identical bytes share one blob
    assert blobs.verify(made[0].sha256) and made[0].size == 5
    assert made[3].sha256 == hashlib.sha256(b"png-1").hexdigest()
    assert get_artifact(db, artifact_id=poem.id).kind == "poem"
    page, more = list_artifacts(db, kind="image", limit=4)
    rest, more2 = list_artifacts(db, kind="image", limit=4, after=page[-1].id)
    assert more and not more2 and len(page) + len(rest) == 6
    assert {a.id for a in page + rest} == {a.id for a in made}
    assert [a.params["seed"] for a in page + rest] == [5, 4, 3, 2, 1, 0]  # newest first
    assert len(list_artifacts(db, model="emoji-diffusion")[0]) == 6
    assert len(list_artifacts(db, model="emoji-diffusion@2")[0]) == 3
    assert len(list_artifacts(db, key_id="key_b")[0]) == 2
    with pytest.raises(NotFound):
        get_artifact(db, artifact_id="art_missing")
    with pytest.raises(ValueError, match="kind"):
        create_artifact(db, blobs, kind="sculpture", data=b"x", mime="x/y")


def test_blob_is_written_before_the_row(store, monkeypatch):
    db, blobs = store

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(blobs, "put_bytes", crash)
    with pytest.raises(RuntimeError):
        create_artifact(db, blobs, kind="image", data=b"x", mime="image/png")
    db.rollback()
    assert db.query(Artifact).count() == 0  # no row without its bytes


def test_signing_secret_and_links(tmp_path):
    secret = signing_secret(tmp_path)
    assert len(secret) == 32 and signing_secret(tmp_path) == secret
    mode = stat.S_IMODE(os.stat(tmp_path / "url-signing.key").st_mode)
    assert mode == 0o600
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left
    path = signed_path(secret, "art_1", expires=2000)
    assert path == f"/api/artifacts/art_1/content?expires=2000&sig={signature(secret, 'art_1', 2000)}"
    sig = signature(secret, "art_1", 2000)
    assert check_signature(secret, "art_1", expires=2000, sig=sig, now=1999)
    assert not check_signature(secret, "art_1", expires=2000, sig=sig, now=2001)  # expired
    assert not check_signature(secret, "art_2", expires=2000, sig=sig, now=1999)  # another artifact
    assert not check_signature(secret, "art_1", expires=3000, sig=sig, now=1999)  # a longer life
    assert not check_signature(b"x" * 32, "art_1", expires=2000, sig=sig, now=1999)  # another install


def test_completions_and_chat_answers_go_to_the_gallery_unless_store_is_false(http):
    """Each choice is an artifact of kind text with the request's parameters and its own seed; streamed answers
    are stored once the stream has ended; store: false leaves nothing."""
    import json

    body = {"model": "tang-poet", "prompt": "秋风", "max_tokens": 6, "seed": 9, "n": 2}
    out = http.post("/v1/completions", json=body).json()
    for choice in out["choices"]:
        art = http.get(f"/api/artifacts/{choice['artifact_id']}").json()
        assert art["kind"] == "text" and art["model"] == "tang-poet@1"
        assert art["params"]["prompt"] == "秋风" and art["params"]["seed"] == 9 + choice["index"]
        assert http.get(f"/api/artifacts/{choice['artifact_id']}/content").text == choice["text"]
    assert "artifact_id" not in http.post("/v1/completions", json=body | {"store": False}).json()["choices"][0]

    before = {a["id"] for a in http.get("/api/artifacts", params={"kind": "text", "limit": 100}).json()["data"]}
    streamed = ""
    with http.stream("POST", "/v1/completions", json=body | {"n": 1, "seed": 31, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["text"]
    after = http.get("/api/artifacts", params={"kind": "text", "limit": 100}).json()["data"]
    new = [a for a in after if a["id"] not in before]
    assert len(new) == 1 and new[0]["params"]["seed"] == 31
    assert http.get(f"/api/artifacts/{new[0]['id']}/content").text == streamed

    chat = http.post("/v1/chat/completions", json={"model": "tang-poet", "messages": [{"role": "user", "content": "春江"}],
                                                   "max_tokens": 8, "seed": 3}).json()
    art = http.get(f"/api/artifacts/{chat['choices'][0]['artifact_id']}").json()
    assert art["params"]["messages"] == [{"role": "user", "content": "春江"}]


def test_a_completions_artifact_is_written_behind_its_response_and_found_at_once(tmp_path):
    """The answer does not wait for its artifact's fsyncs and commit (atelier/storage/usage_writer.py), yet
    the id it gives is there for the next request: reading artifacts waits for those being stored."""
    import threading

    import httpx

    from conftest import ADMIN_KEY, LiveServer, make_settings

    with LiveServer(make_settings(tmp_path)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as http:
        blobs, gate = server.app.state.blobs, threading.Event()
        put_bytes = blobs.put_bytes

        def held_put_bytes(data: bytes) -> str:  # the blob store's write, held until the answer is in
            gate.wait(timeout=30)
            return put_bytes(data)

        blobs.put_bytes = held_put_bytes
        body = {"model": "tang-poet", "prompt": "秋风", "max_tokens": 4, "seed": 5}
        answer = http.post("/v1/completions", json=body).json()["choices"][0]
        with server.app.state.sessions() as db:
            assert db.get(Artifact, answer["artifact_id"]) is None  # answered before it was written
        threading.Timer(0.3, gate.set).start()
        art = http.get(f"/api/artifacts/{answer['artifact_id']}").json()  # waits for the write
        assert art["id"] == answer["artifact_id"] and art["params"]["seed"] == 5
        assert http.get(f"/api/artifacts/{answer['artifact_id']}/content").text == answer["text"]
        listed = http.get("/api/artifacts", params={"kind": "text"}).json()["data"]
        assert listed[0]["id"] == answer["artifact_id"]
