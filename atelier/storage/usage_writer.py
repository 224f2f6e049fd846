"""What a finished request served, written behind its response: the usage row's tokens, images and model,
and the request's audit entry; and the gallery artifacts of text completions, written behind theirs too.

A request's usage row is inserted when it starts (atelier/api/metering.py), so concurrent requests and
replicas count each other's requests at once; a key without limits has no one counting, and its
requests' rows are inserted here, at their end. What a request served is only known then. Writing that on
the event loop cost each request about a millisecond after its last byte, and 32 streams' worth kept the
loop busy; so the end is handed to this writer's thread, which writes everything that has piled up
since its last write in one transaction: one commit, one audit head update, for any number of requests.

Gallery artifacts (`store`) go through the same thread for the same reason: SQLite has one writer at a
time, and a request's admission (its usage row, written on the event loop) waited for the lock behind
every artifact committed from a worker thread of its own (at 32 streaming clients the INSERT's p90 was
2.4 ms, the loop stalled meanwhile; 1.4 ms this way). Here the blobs are written first (each
fsynced, outside any transaction), then their rows join the batch's transaction. They are written
behind the response, as OpenAI stores completions, and gather with the usage records: their ids are
given at once (waiting for the fsyncs and the commit added 2.3 ms to a stored 1-token completion, and
held every stream's last event), and readers of artifacts in this process flush first when some are
waiting (`storing`), so an id a response gave is found at once.

What that keeps:
  - Rate limits and quotas stay exact in this process: `pending(key)` adds what is handed over but not
    yet written to the database's sums (atelier/storage/usage.py `verdict`). Other replicas see it
    once it is written, within a few tens of milliseconds.
  - Readers in this process (`GET /api/usage`, `/api/audit`) call `flush()` first: they see every
    request that has ended.
  - A database that is down is waited out: the batch is kept and retried (backing off to 5 s) and
    nothing is lost while the process lives. Stopping the server flushes (up to 10 s).
  - A batch gathers for up to 20 ms (COALESCE_S) before it is written: one write per request cost each
    request after it the writer's GIL time.
  - A process killed outright loses what it had not written yet: requests and artifacts of the last few
    tens of milliseconds, as it loses the requests still running. Their usage rows, written at their start,
    remain, with what they were given up front (a key without limits: no row).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam

from atelier.storage import audit
from atelier.storage.artifacts import new_artifact_id, stored_blob
from atelier.storage.db import DATABASE_DOWN, Artifact, Usage, utcnow

log = logging.getLogger("atelier.usage")

RETRY_MAX_S = 5.0
# A batch waits this long after its first request for others to join it. A write costs about 0.7 ms of
# Python for one request and 1.6 ms for ten (the session, the audit head read, updated and signed, the
# commit), and the writer's Python takes the GIL from the requests being served: requests one after another
# each paid for their predecessor's write. Requests under load fill a batch sooner (BATCH_MAX).
COALESCE_S = 0.02
BATCH_MAX = 256


@dataclass
class Served:
    """One request's end: what its usage row gets, and what its audit entry says."""

    usage_id: int | None  # None: no row yet (a key without limits), inserted with the rest
    key_id: str
    route: str
    model: str
    tokens: int
    images: int
    prompt: str  # hashed into the audit entry, never stored
    at: datetime | None = None  # when the request started: a row inserted at its end is dated then

    def audit_entry(self) -> dict:
        # Every generation leaves a trace: who, which model@version, how much, and the prompt's hash.
        return {"action": "generate", "target": self.model or self.route, "key_id": self.key_id,
                "detail": {"route": self.route, "tokens": self.tokens, "images": self.images,
                           "prompt_sha256": hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()}}


_USAGE = Usage.__table__  # a plain statement, built once, without the ORM's bulk-update machinery
_USAGE_DONE = (_USAGE.update().where(_USAGE.c.id == bindparam("usage_id"))
               .values(tokens=bindparam("n_tokens"), images=bindparam("n_images"), model=bindparam("model_ref")))
_USAGE_NEW = _USAGE.insert()


def write(db, batch: list[Served]) -> None:
    """Requests' usage rows and audit entries, in `db`'s transaction: one statement for the rows, the
    chain locked and its head signed once for the entries."""
    entries = [done.audit_entry() for done in batch]
    started = [d for d in batch if d.usage_id is not None]
    if started:
        db.execute(_USAGE_DONE, [{"usage_id": d.usage_id, "n_tokens": d.tokens, "n_images": d.images,
                                  "model_ref": d.model[:200]} for d in started])
    if len(started) < len(batch):
        db.execute(_USAGE_NEW, [{"key_id": d.key_id, "at": d.at or utcnow(), "route": d.route, "model": d.model[:200],
                                 "tokens": d.tokens, "images": d.images} for d in batch if d.usage_id is None])
    audit.record_many(db, entries, commit=False)


class UsageWriter:
    def __init__(self, sessions, blobs=None):
        self._sessions = sessions
        self._blobs = blobs  # where `store`'s artifacts keep their bytes
        self._cond = threading.Condition()
        self._queue: list[Served] = []
        self._stores: list[list[dict]] = []  # each request's artifacts: `stored_blob`'s keyword arguments
        self._due = 0.0  # when the records and artifacts waiting are written (COALESCE_S after the first)
        self._pending: dict[str, list[int]] = {}  # key id -> [tokens, images, requests] handed over, not written
        self._submitted = self._written = 0
        self._stores_submitted = self._stores_written = 0  # requests' artifacts handed over, written
        self._flushing = 0  # callers waiting in flush(): the batch being gathered goes now
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="atelier-usage-writer", daemon=True)
        self._thread.start()

    def submit(self, done: Served) -> None:
        with self._cond:
            first = self._gathering()
            self._queue.append(done)
            self._submitted += 1
            counts = self._pending.setdefault(done.key_id, [0, 0, 0])
            counts[0] += done.tokens
            counts[1] += done.images
            counts[2] += 1
            self._arrived(first)

    def store(self, artifacts: list[dict]) -> list[str]:
        """Gallery artifacts (`stored_blob`'s keyword arguments), written with the next batch: their ids, in
        order, given now."""
        ids = [new_artifact_id() for _ in artifacts]
        job = [a | {"artifact_id": i} for a, i in zip(artifacts, ids)]
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is stopping")
            first = self._gathering()
            self._stores.append(job)
            self._stores_submitted += 1
            self._arrived(first)
        return ids

    def _gathering(self) -> bool:
        """Under the lock, before an arrival: whether it starts a batch (which is then due in COALESCE_S)."""
        if self._queue or self._stores:
            return False
        self._due = time.monotonic() + COALESCE_S
        return True

    def _arrived(self, first: bool) -> None:
        # The writer sleeps without a deadline while nothing waits: a batch's first arrival gives it one. The
        # others wake it only to fill a batch: each wake cost the request the writer's turn at the GIL.
        if first or len(self._queue) + len(self._stores) >= BATCH_MAX:
            self._cond.notify_all()

    def storing(self) -> bool:
        """Whether artifacts handed over are not yet written (or dropped): a reader of artifacts flushes."""
        return self._stores_written < self._stores_submitted

    def pending(self, key_id: str) -> tuple[int, int]:
        """(tokens, images) of this key's finished requests not yet in the database."""
        with self._cond:
            tokens, images, _ = self._pending.get(key_id, (0, 0, 0))
        return tokens, images

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed over so far is written; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target, stores = self._submitted, self._stores_submitted
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._written < target or self._stores_written < stores:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is left (waiting up to `timeout` for a database that is down), then stop."""
        if not self.flush(timeout):
            with self._cond:
                lost = self._submitted - self._written
            log.error("stopping with %d finished requests' usage and audit entries unwritten "
                      "(the database did not come back within %.0f s)", lost, timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._batch_due()):
                    self._cond.wait(self._due - time.monotonic() if self._queue or self._stores else None)
                if self._stopping:
                    if self._stores:
                        log.error("stopping with %d requests' artifacts unwritten", len(self._stores))
                    return
                batch, self._queue = self._queue, []
                stores, self._stores = self._stores, []
            self._write(batch, self._blobs_of(stores))
            with self._cond:
                self._written += len(batch)
                self._stores_written += len(stores)
                for done in batch:
                    counts = self._pending[done.key_id]
                    counts[0] -= done.tokens
                    counts[1] -= done.images
                    counts[2] -= 1
                    if not counts[2]:
                        del self._pending[done.key_id]
                self._cond.notify_all()

    def _batch_due(self) -> bool:
        """Whether what waits (usage records, artifacts) goes now: gathered for COALESCE_S, BATCH_MAX of it, or a flush."""
        waiting = len(self._queue) + len(self._stores)
        return bool(waiting) and (self._flushing or waiting >= BATCH_MAX or time.monotonic() >= self._due)

    def _blobs_of(self, stores: list[list[dict]]) -> list[list[Artifact]]:
        """Each request's artifact rows, their bytes written (outside any transaction); a request whose bytes
        cannot be written loses its artifacts, logged."""
        ready = []
        for job in stores:
            try:
                ready.append([stored_blob(self._blobs, **a) for a in job])
            except Exception as e:  # noqa: BLE001 - logged, and the writer goes on
                log.error("dropped artifacts %s (%s): %s", ", ".join(a["artifact_id"] for a in job),
                          type(e).__name__, e)
        return ready

    def _write(self, batch: list[Served], stores: list[list[Artifact]]) -> None:
        """All of `batch` and the artifacts' rows in one transaction, retried while the database is
        unreachable. A record the database refuses for what it holds is logged and dropped, so it cannot
        hold up the others."""
        delay = 0.05
        while True:
            try:
                self._transaction(batch, stores)
                return
            except DATABASE_DOWN as e:  # a retry may cure these
                if self._stopping:
                    if stores:
                        log.error("stopping with %d requests' artifacts unwritten: %s", len(stores), e)
                    return
                log.warning("database unavailable (%s); retrying %d usage records and %d requests' artifacts "
                            "in %.2f s", type(e).__name__, len(batch), len(stores), delay)
                time.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
            except Exception:  # noqa: BLE001 - one of them is refused: find it below
                break
        for done in batch:
            try:
                self._transaction([done], [])
            except Exception as e:  # noqa: BLE001 - logged, and the writer goes on
                log.error("dropped the usage record of request %s (%s): %s", done.usage_id, type(e).__name__, e)
        for rows in stores:
            try:
                self._transaction([], [rows])
            except Exception as e:  # noqa: BLE001 - logged, and the writer goes on
                log.error("dropped artifacts %s (%s): %s", ", ".join(a.id for a in rows), type(e).__name__, e)

    def _transaction(self, batch: list[Served], stores: list[list[Artifact]]) -> None:
        with self._sessions() as db:
            if batch:
                write(db, batch)
            for rows in stores:
                db.add_all(rows)
            db.commit()
