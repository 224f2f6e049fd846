"""Registry: versions are immutable and content-addressed, aliases move, references resolve."""

import json

import pytest

from conftest import database_url

from atelier.storage.db import make_engine, make_sessionmaker
from atelier.common.files import atomic_write_bytes
from atelier.storage.blobs import BlobStore
from atelier.storage.registry import get_model, NotFound, parse_ref, register_version, resolve, set_alias
from atelier.storage import audit
from atelier.storage.keys import create_key, find_key, revoke_key


@pytest.fixture()
def db(tmp_path):
    return make_sessionmaker(make_engine(database_url(tmp_path)))()


def folder(tmp_path, name, weights: bytes):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"n_positions": 8}))
    (d / "model.safetensors").write_bytes(weights)
    return d


def test_versions_aliases_and_references(db, tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    v1 = register_version(db, blobs, name="poet", family="chargpt", task="text-generation",
                          folder=folder(tmp_path, "a", b"one"), aliases=("latest", "production"))
    v2 = register_version(db, blobs, name="poet", family="chargpt", task="text-generation",
                          folder=folder(tmp_path, "b", b"two"))
    assert (v1.number, v2.number) == (1, 2)
    assert resolve(db, ref="poet").number == 2  # latest moved
    assert resolve(db, ref="poet:production").number == 1
    assert resolve(db, ref="poet@1").files == v1.files
    assert blobs.verify(v1.files["model.safetensors"])
    set_alias(db, model=get_model(db, name="poet"), alias="production", number=2)
    db.commit()
    assert resolve(db, ref="poet:production").number == 2
    with pytest.raises(NotFound, match="no version 9"):
        resolve(db, ref="poet@9")
    with pytest.raises(NotFound, match="no alias 'staging'"):
        resolve(db, ref="poet:staging")
    with pytest.raises(NotFound):
        resolve(db, ref="painter")


def test_reference_syntax():
    assert parse_ref("poet@3").version == 3
    assert parse_ref("poet:prod").alias == "prod"
    for bad in ("poet@x", "poet@0", "poet:"):
        with pytest.raises(ValueError):
            parse_ref(bad)


def test_keys_are_stored_hashed_and_revocable(db):
    key, secret = create_key(db, scopes=["generate"])
    assert secret not in key.hash and len(key.hash) == 64
    assert find_key(db, secret=secret).id == key.id
    revoke_key(db, key_id=key.id)
    assert find_key(db, secret=secret) is None
    with pytest.raises(ValueError, match="choose from"):
        create_key(db, scopes=["root"])


def test_audit_chain_detects_tampering(db):
    for i in range(3):
        audit.record(db, action="test", target=str(i))
    assert audit.verify(db) == {"ok": True, "entries": 3, "first_bad_id": None, "reason": None}
    from atelier.storage.db import AuditEntry

    entry = db.get(AuditEntry, 2)
    entry.target = "forged"
    db.commit()
    assert audit.verify(db)["first_bad_id"] == 2


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = atomic_write_bytes(tmp_path / "x" / "f.bin", b"data")
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and [q.name for q in p.parent.iterdir()] == ["f.bin"]
