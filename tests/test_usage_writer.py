"""What finished requests served, written behind their responses (atelier/storage/usage_writer.py): in
batches that keep the audit chain whole, counted by rate limits before they are written, kept through a
database that is locked, and not held up by a record the database refuses."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import create_engine, event, func, select

from atelier.storage import audit, usage_writer
from atelier.storage.db import AuditEntry, Usage, make_engine, make_sessionmaker
from atelier.storage.keys import create_key
from atelier.storage.usage import verdict
from atelier.storage.usage_writer import Served, UsageWriter


@pytest.fixture()
def db_path(tmp_path):
    path = tmp_path / "atelier.db"
    make_engine(f"sqlite:///{path}").dispose()  # migrated
    return path


def sessions_for(path, *, busy_timeout_s: float = 30):
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _wal(conn, _):
        conn.execute("PRAGMA journal_mode=WAL")

    return make_sessionmaker(engine, audit_key=b"k" * 32)


def started(sessions, key_id: str, n: int) -> list[int]:
    """n requests' usage rows, as metering inserts them when each starts."""
    with sessions() as db:
        rows = [Usage(key_id=key_id, route="completions") for _ in range(n)]
        db.add_all(rows)
        db.commit()
        return [r.id for r in rows]


def finished(usage_id: int, key_id: str, tokens: int = 7, prompt: str = "春眠") -> Served:
    return Served(usage_id, key_id, "completions", "tang-poet@1", tokens, 0, prompt)


def test_many_requests_are_written_in_batches_and_the_audit_chain_stays_whole(db_path):
    sessions = sessions_for(db_path)
    with sessions() as db:
        a, b = create_key(db, scopes=["generate"])[0].id, create_key(db, scopes=["generate"])[0].id
    writer = UsageWriter(sessions)
    try:
        ids = started(sessions, a, 30) + started(sessions, b, 20)
        for i, usage_id in enumerate(ids):
            writer.submit(finished(usage_id, a if i < 30 else b, tokens=i))
        assert writer.flush(timeout=30)
        assert writer.pending(a) == (0, 0) and writer.pending(b) == (0, 0)
        with sessions() as db:
            rows = {u.id: u for u in db.scalars(select(Usage))}
            assert [rows[i].tokens for i in ids] == list(range(50))
            assert {rows[i].model for i in ids} == {"tang-poet@1"}
            entries = list(db.scalars(select(AuditEntry).where(AuditEntry.action == "generate")))
            assert [e.detail["tokens"] for e in entries] == list(range(50))
            assert entries[0].detail["prompt_sha256"] != "春眠" and len(entries[0].detail["prompt_sha256"]) == 64
            assert audit.verify(db)["ok"]
    finally:
        writer.close()


def test_requests_of_a_key_without_limits_get_their_rows_when_they_end(db_path):
    """Metering writes nothing when a key without limits starts a request (storage/usage.py admit): the
    writer inserts its row, dated when it started, in the same batch as the rows it updates."""
    from datetime import timedelta

    from atelier.storage.db import utcnow
    from atelier.storage.usage import admit

    sessions = sessions_for(db_path)
    with sessions() as db:
        limited, free = create_key(db, scopes=["generate"], limits={"rpm": 100})[0].id, \
            create_key(db, scopes=["generate"])[0].id
        assert admit(db, free, None, "completions")[1] is None
        assert db.scalar(select(func.count(Usage.id))) == 0  # nothing written for the free key's start
        limited_id = admit(db, limited, {"rpm": 100}, "completions")[1]
        assert limited_id is not None
    began = utcnow() - timedelta(seconds=3)
    writer = UsageWriter(sessions)
    try:
        writer.submit(finished(limited_id, limited, tokens=5))
        for tokens in (1, 2):
            writer.submit(Served(None, free, "completions", "tang-poet@1", tokens, 0, "春眠", began))
        assert writer.flush(timeout=30)
        with sessions() as db:
            rows = list(db.scalars(select(Usage).order_by(Usage.id)))
            assert [(u.key_id, u.tokens, u.model) for u in rows] == [
                (limited, 5, "tang-poet@1"), (free, 1, "tang-poet@1"), (free, 2, "tang-poet@1")]
            assert all(abs((u.at - began).total_seconds()) < 0.01 for u in rows[1:])
            assert len(list(db.scalars(select(AuditEntry).where(AuditEntry.action == "generate")))) == 3
            assert audit.verify(db)["ok"]
    finally:
        writer.close()


def test_requests_that_end_close_together_share_one_write_and_a_flush_does_not_wait_for_the_batch(
        db_path, monkeypatch):
    """A batch gathers for COALESCE_S after its first request (a second here): three requests ending one
    after another are one transaction (one commit), written without anyone asking; a flush writes at once."""
    monkeypatch.setattr(usage_writer, "COALESCE_S", 1.0)
    sessions = sessions_for(db_path)
    with sessions() as db:
        key = create_key(db, scopes=["generate"])[0].id
    ids = started(sessions, key, 4)
    commits = []
    event.listen(sessions.kw["bind"], "commit", lambda conn: commits.append(1))
    writer = UsageWriter(sessions)
    try:
        for usage_id in ids[:3]:
            writer.submit(finished(usage_id, key))
        deadline = time.monotonic() + 10
        while writer.pending(key) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert writer.pending(key) == (0, 0) and len(commits) == 1
        writer.submit(finished(ids[3], key))
        started_at = time.monotonic()
        assert writer.flush(timeout=10)
        assert time.monotonic() - started_at < 0.5 and len(commits) == 2
    finally:
        writer.close()


def test_appends_from_the_writer_and_from_requests_at_once_keep_one_chain(db_path):
    """SQLite has no row locks: the usage writer's batches and entries recorded by requests (a download, a key
    revoked) in other threads must still take turns, or two of them link to the same head and fork it."""
    sessions = sessions_for(db_path)
    with sessions() as db:
        key = create_key(db, scopes=["generate"])[0].id
    ids = started(sessions, key, 60)
    writer = UsageWriter(sessions)

    def requests_recording(n: int) -> None:
        for i in range(n):
            with sessions() as db:
                audit.record(db, action="artifact.download", target=f"art_{i}", key_id=key)

    try:
        others = [threading.Thread(target=requests_recording, args=(40,)) for _ in range(2)]
        for t in others:
            t.start()
        for usage_id in ids:
            writer.submit(finished(usage_id, key))
            time.sleep(0.001)
        for t in others:
            t.join()
        assert writer.flush(timeout=30)
        with sessions() as db:
            assert audit.verify(db)["ok"]
            assert db.scalar(select(func.count(AuditEntry.id))) == 60 + 80
    finally:
        writer.close()


def test_a_locked_database_is_waited_out_and_rate_limits_count_what_is_not_written_yet(db_path):
    sessions = sessions_for(db_path, busy_timeout_s=0.05)
    with sessions() as db:
        key = create_key(db, scopes=["generate"], limits={"tpm": 100})[0]
    (usage_id,) = started(sessions, key.id, 1)
    writer = UsageWriter(sessions)
    blocker = sqlite3.connect(db_path, timeout=30, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database: every write of ours is refused
    try:
        writer.submit(finished(usage_id, key.id, tokens=120))
        assert not writer.flush(timeout=0.5)
        assert writer.pending(key.id) == (120, 0)
        blocker.rollback()  # the lock is gone; reads work again, the writer has not caught up yet
        with sessions() as db:
            assert db.get(Usage, usage_id).tokens in (0, 120)
            over = verdict(db, key.id, key.limits, unwritten=writer.pending(key.id))
            assert not over.allowed and over.code == "rate_limit_exceeded"
        assert writer.flush(timeout=30)
        assert writer.pending(key.id) == (0, 0)
        with sessions() as db:
            assert db.get(Usage, usage_id).tokens == 120
            assert not verdict(db, key.id, key.limits).allowed  # now counted from the database alone
    finally:
        blocker.close()
        writer.close()


def test_a_record_that_cannot_be_written_is_dropped_without_holding_up_the_others(db_path, caplog):
    sessions = sessions_for(db_path, busy_timeout_s=0.05)
    with sessions() as db:
        key_id = create_key(db, scopes=["generate"])[0].id
    ids = started(sessions, key_id, 3)
    writer = UsageWriter(sessions)
    blocker = sqlite3.connect(db_path, timeout=30, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # the three pile up while the database is locked
    try:
        for i, usage_id in enumerate(ids):  # the second has no prompt to hash: it cannot be written
            writer.submit(finished(usage_id, key_id, tokens=i + 1, prompt=None if i == 1 else "x"))
        blocker.rollback()
        assert writer.flush(timeout=30)
        with sessions() as db:
            assert [db.get(Usage, i).tokens for i in ids] == [1, 0, 3]
            assert audit.verify(db)["ok"]
        assert f"dropped the usage record of request {ids[1]}" in caplog.text
        assert writer.pending(key_id) == (0, 0)
    finally:
        blocker.close()
        writer.close()
