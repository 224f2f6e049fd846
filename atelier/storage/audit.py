"""The audit log in the database: append an entry to the keyed chain and its signed head, verify both.

The key comes with the session (`make_sessionmaker(engine, audit_key=...)`); sessions without one
(tests of other things) write a plain, unkeyed chain.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from atelier.safety.audit import GENESIS, chain_digest, head_mac
from atelier.safety.redact import redact, redact_obj
from atelier.storage.db import AuditEntry, AuditHead, utcnow

AUDIT_LOCK = 0x61756474  # the PostgreSQL advisory lock that serialises appends to the chain
_SQLITE_WRITE_LOCK = text("UPDATE audit_head SET id = id WHERE id = 1")  # changes nothing; takes the write lock


def record(db: Session, *, action: str, target: str = "", key_id: str | None = None,
           detail: dict | None = None, commit: bool = True) -> AuditEntry:
    return record_many(db, [{"action": action, "target": target, "key_id": key_id, "detail": detail}],
                       commit=commit)[0]


def record_many(db: Session, items: list[dict], *, commit: bool = True) -> list[AuditEntry]:
    """Append entries (dicts of `record`'s arguments) in order. The chain is locked, and its head read
    and signed, once for all of them: the usage writer appends a busy server's entries this way."""
    mac_key = db.info.get("audit_key")
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        # Writers on every replica take turns until this transaction ends, so each links to the entry
        # before it and the chain never forks (the head row's lock alone misses the very first entry).
        db.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK})
    elif dialect == "sqlite":
        # SQLite ignores FOR UPDATE, and a read outside a write transaction sees what was committed then:
        # two connections could both read the same head and fork the chain (the usage writer appending
        # while a request records a download did). A write first opens the write transaction, which only
        # one connection holds at a time and which reads the newest commit.
        db.execute(_SQLITE_WRITE_LOCK)
    head = db.scalar(select(AuditHead).where(AuditHead.id == 1).with_for_update()) if mac_key else None
    # The signed head names the last entry's hash; without one (an unkeyed chain, or its first keyed
    # entry) the last entry itself does. Linking to the head's hash keeps a deleted tail detectable:
    # the new entry's link then names an entry that is not before it.
    prev = head.last_hash if head is not None else \
        db.scalar(select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)) or GENESIS
    entries = []
    for item in items:
        at = utcnow()
        detail, target = redact_obj(item.get("detail") or {}), redact(item.get("target", "")).text  # no personal data
        key_id, action = item.get("key_id"), item["action"]
        entry = AuditEntry(at=at, key_id=key_id, action=action, target=target, detail=detail, prev_hash=prev,
                           hash=chain_digest(prev, at, key_id, action, target, detail, mac_key))
        entries.append(entry)
        prev = entry.hash
    db.add_all(entries)
    db.flush()  # the entries' ids
    if mac_key is not None and head is None:  # the first keyed entries: earlier ones stay as they were
        count = db.scalar(select(func.count(AuditEntry.id)))
        head = AuditHead(id=1, last_id=entries[0].id, last_hash="", entries=count - len(entries),
                         keyed_from=entries[0].id, mac="")
        db.add(head)
    if head is not None:
        head.last_id, head.last_hash, head.entries = entries[-1].id, entries[-1].hash, head.entries + len(entries)
        head.mac = head_mac(mac_key, head.last_id, head.last_hash, head.entries, head.keyed_from)
    if commit:
        db.commit()
    return entries


def verify(db: Session) -> dict:
    """{"ok", "entries", "first_bad_id", "reason"}: the first entry whose MAC or link is wrong, or the
    head's own problem (entries deleted at the end, a forged head)."""
    mac_key = db.info.get("audit_key")
    head = db.get(AuditHead, 1)
    prev, n, last = GENESIS, 0, None

    def bad(entry_id, reason):
        return {"ok": False, "entries": n, "first_bad_id": entry_id, "reason": reason}

    for e in db.scalars(select(AuditEntry).order_by(AuditEntry.id)):
        n += 1
        keyed = mac_key if head is not None and e.id >= head.keyed_from else None
        if head is not None and keyed is None and e.id >= head.keyed_from:
            return bad(e.id, "the chain is keyed but this server has no audit key")
        if e.prev_hash != prev or e.hash != chain_digest(prev, e.at, e.key_id, e.action, e.target, e.detail, keyed):
            return bad(e.id, "entry edited, inserted or removed before it")
        prev, last = e.hash, e
    if head is not None:
        if mac_key is None or head.mac != head_mac(mac_key, head.last_id, head.last_hash, head.entries,
                                                   head.keyed_from):
            return bad(None, "the chain's head is not signed by this server's key")
        if last is None or last.id != head.last_id or last.hash != head.last_hash or n != head.entries:
            return bad(last.id if last else None,
                       f"the log ends at entry {last.id if last else 'none'} but its head says {head.last_id} "
                       f"({head.entries} entries): entries were deleted")
    return {"ok": True, "entries": n, "first_bad_id": None, "reason": None}
