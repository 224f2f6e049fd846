"""The audit chain catches an edited, an inserted, a deleted and a truncated entry, and a chain
rebuilt by someone with write access to the database but not the key (issue #10, defect 10)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, select, text

from atelier.safety.audit import chain_digest
from atelier.storage.db import AuditEntry, engine_url
from conftest import LiveServer, admin_http, audit_entries, make_settings


@pytest.fixture()
def home_with_log(tmp_path):
    settings = make_settings(tmp_path / "home", run_worker=False, shipped_models=False)
    with LiveServer(settings) as s, admin_http(s) as http:
        for i in range(4):
            assert http.post("/api/keys", json={"name": f"k{i}", "scopes": ["read"]}).status_code == 201
        assert http.get("/api/audit/verify").json()["ok"]
    return settings


def verify(settings) -> dict:
    with LiveServer(settings) as s, admin_http(s) as http:
        return http.get("/api/audit/verify").json()


def db(settings):
    """A connection straight to the database (SQLite or PostgreSQL), as someone with write access has."""
    return create_engine(engine_url(settings.db_url)).begin()


def cli_verify(settings) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atelier.cli", "audit", "verify", "--home", str(settings.home_dir)],
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {"ATELIER_ADMIN_KEY": "", "ATELIER_DATABASE_URL": settings.db_url})


def test_an_untouched_chain_verifies(home_with_log):
    r = cli_verify(home_with_log)
    assert r.returncode == 0 and "audit chain ok" in r.stdout


def test_an_edited_entry_is_named(home_with_log):
    with db(home_with_log) as c:
        c.execute(text("UPDATE audit SET target = 'key_forged' WHERE id = 3"))
    result = verify(home_with_log)
    assert not result["ok"] and result["first_bad_id"] == 3
    r = cli_verify(home_with_log)
    assert r.returncode == 1 and "entry 3" in r.stderr


def test_a_deleted_middle_entry_is_named(home_with_log):
    with db(home_with_log) as c:
        c.execute(text("DELETE FROM audit WHERE id = 2"))
    result = verify(home_with_log)
    assert not result["ok"] and result["first_bad_id"] == 3


def test_truncating_the_end_is_caught_by_the_signed_head(home_with_log):
    with db(home_with_log) as c:
        last = c.execute(text("SELECT max(id) FROM audit")).scalar()
        c.execute(text("DELETE FROM audit WHERE id = :id"), {"id": last})
    result = verify(home_with_log)
    assert not result["ok"] and "deleted" in result["reason"]


def test_a_chain_rebuilt_without_the_key_is_caught(home_with_log):
    """Edit an entry, then recompute every hash after it the way an unkeyed chain would."""
    with db(home_with_log) as c:
        rows = c.execute(select(AuditEntry.id, AuditEntry.at, AuditEntry.key_id, AuditEntry.action,
                                AuditEntry.target, AuditEntry.detail).order_by(AuditEntry.id)).all()
        prev = "0" * 64
        for id_, at, key_id, action, target, detail in rows:
            target = "key_forged" if id_ == 2 else target
            digest = chain_digest(prev, at, key_id, action, target, detail)
            c.execute(text("UPDATE audit SET target = :t, prev_hash = :p, hash = :h WHERE id = :id"),
                      {"t": target, "p": prev, "h": digest, "id": id_})
            prev = digest
        c.execute(text("UPDATE audit_head SET last_hash = :h"), {"h": prev})
    result = verify(home_with_log)
    assert not result["ok"]


def test_key_use_leaves_a_trace_and_links_die_with_their_key(server, http):
    """Generations (model@version and the prompt's hash, never the text), downloads and exports are
    audited; a signed link stops working when the key it was made for is revoked."""
    import hashlib

    import httpx

    made = http.post("/api/keys", json={"name": "linker", "scopes": ["generate"]}).json()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {made['key']}"}, timeout=60) as c:
        c.post("/v1/completions", json={"model": "tang-poet", "prompt": "秋风", "max_tokens": 2})
        image = c.post("/v1/images/generations", json={"model": "emoji-gan", "prompt": "red apple",
                                                       "response_format": "url"}).json()["data"][0]
    link = image["url"]
    assert httpx.get(link).status_code == 200
    http.get("/api/models/tang-poet@1/export")
    entries = audit_entries(http)
    mine = [e for e in entries if e["key_id"] == made["id"]]
    generation = next(e for e in mine if e["action"] == "generate" and e["detail"]["route"] == "completions")
    assert generation["target"] == "tang-poet@1"
    assert generation["detail"]["prompt_sha256"] == hashlib.sha256("秋风".encode()).hexdigest()
    assert any(e["action"] == "generate" and e["detail"]["images"] == 1 for e in mine)
    assert any(e["action"] == "artifact.download" and e["target"] == image["artifact_id"] for e in entries)
    assert any(e["action"] == "model.export" and e["target"] == "tang-poet@1" for e in entries)
    http.delete(f"/api/keys/{made['id']}")
    r = httpx.get(link)
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_revoked"
    assert http.get("/api/audit/verify").json()["ok"]
