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
