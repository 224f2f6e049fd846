"""What a finished request served, written behind its response: the usage row's tokens, images and model,
and the request's audit entry.

A request's usage row is inserted when it starts (atelier/api/metering.py), so concurrent requests and
replicas count each other's requests at once. What it served is only known at its end. Writing that on
the event loop cost each request about a millisecond after its last byte, and 32 streams' worth kept the
loop busy; so the end is handed to this writer's thread, which writes everything that has piled up
since its last write in one transaction: one commit, one audit head update, for any number of requests.

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
  - A process killed outright loses what it had not written yet: requests that ended in the last few tens
    of milliseconds, as it loses the requests still running. Their usage rows, written at their start,
    remain, with what they were given up front.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import bindparam

from atelier.storage import audit
from atelier.storage.db import DATABASE_DOWN, Usage

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

    usage_id: int
    key_id: str
    route: str
    model: str
    tokens: int
    images: int
    prompt: str  # hashed into the audit entry, never stored

    def audit_entry(self) -> dict:
        # Every generation leaves a trace: who, which model@version, how much, and the prompt's hash.
        return {"action": "generate", "target": self.model or self.route, "key_id": self.key_id,
                "detail": {"route": self.route, "tokens": self.tokens, "images": self.images,
                           "prompt_sha256": hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()}}


_USAGE = Usage.__table__  # a plain statement, built once, without the ORM's bulk-update machinery
_USAGE_DONE = (_USAGE.update().where(_USAGE.c.id == bindparam("usage_id"))
               .values(tokens=bindparam("n_tokens"), images=bindparam("n_images"), model=bindparam("model_ref")))


def write(db, batch: list[Served]) -> None:
    """Requests' usage rows and audit entries, in `db`'s transaction: one statement for the rows, the
    chain locked and its head signed once for the entries."""
    entries = [done.audit_entry() for done in batch]
    db.execute(_USAGE_DONE, [{"usage_id": d.usage_id, "n_tokens": d.tokens, "n_images": d.images,
                              "model_ref": d.model[:200]} for d in batch])
    audit.record_many(db, entries, commit=False)


class UsageWriter:
    def __init__(self, sessions):
        self._sessions = sessions
        self._cond = threading.Condition()
        self._queue: list[Served] = []
        self._pending: dict[str, list[int]] = {}  # key id -> [tokens, images, requests] handed over, not written
        self._submitted = self._written = 0
        self._flushing = 0  # callers waiting in flush(): the batch being gathered goes now
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="atelier-usage-writer", daemon=True)
        self._thread.start()

    def submit(self, done: Served) -> None:
        with self._cond:
            self._queue.append(done)
            self._submitted += 1
            counts = self._pending.setdefault(done.key_id, [0, 0, 0])
            counts[0] += done.tokens
            counts[1] += done.images
            counts[2] += 1
            self._cond.notify_all()

    def pending(self, key_id: str) -> tuple[int, int]:
        """(tokens, images) of this key's finished requests not yet in the database."""
        with self._cond:
            tokens, images, _ = self._pending.get(key_id, (0, 0, 0))
        return tokens, images

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed over so far is written; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._written < target:
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
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                gathered = time.monotonic() + COALESCE_S
                while not self._flushing and not self._stopping and len(self._queue) < BATCH_MAX:
                    left = gathered - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
            self._write(batch)
            with self._cond:
                self._written += len(batch)
                for done in batch:
                    counts = self._pending[done.key_id]
                    counts[0] -= done.tokens
                    counts[1] -= done.images
                    counts[2] -= 1
                    if not counts[2]:
                        del self._pending[done.key_id]
                self._cond.notify_all()

    def _write(self, batch: list[Served]) -> None:
        """All of `batch` in one transaction, retried while the database is unreachable. A record the
        database refuses for what it holds is logged and dropped, so it cannot hold up the others."""
        delay = 0.05
        while True:
            try:
                with self._sessions() as db:
                    write(db, batch)
                    db.commit()
                return
            except DATABASE_DOWN as e:  # a retry may cure these
                if self._stopping:
                    return
                log.warning("database unavailable (%s); retrying %d usage records in %.2f s",
                            type(e).__name__, len(batch), delay)
                time.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
            except Exception:  # noqa: BLE001 - one of them is refused: find it below
                break
        for done in batch:
            try:
                with self._sessions() as db:
                    write(db, [done])
                    db.commit()
            except Exception as e:  # noqa: BLE001 - logged, and the writer goes on
                log.error("dropped the usage record of request %d (%s): %s", done.usage_id, type(e).__name__, e)
