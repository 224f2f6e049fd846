"""The job worker: a process of its own, so training never blocks the request path.

    python -m atelier.jobs.worker        (the server starts and supervises it)

Every replica's server runs one; they share the queue in the database. A worker claims a job
with an UPDATE only one claimer can win and holds a lease on it that it renews every third of
ATELIER_JOB_LEASE_S; a job whose lease runs out (its worker died, on whatever machine) is
queued again by any worker, and resumes from its last checkpoint. A worker restarted by its
server takes the same name (ATELIER_WORKER_ID, set by the supervisor), so it reclaims its dead
predecessor's jobs at once instead of waiting for their leases. It runs up to ATELIER_MAX_JOBS
jobs at a time, one thread each, and exits when its parent (the server) is gone or on SIGTERM,
handing its unfinished jobs back to the queue.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from atelier.config import get_settings
from atelier.jobs import store
from atelier.jobs.runner import run_job
from atelier.safety.crypto import audit_mac_key
from atelier.safety.redact import RedactingFilter
from atelier.storage.db import make_engine, make_sessionmaker
from atelier.storage.blobs import open_blobs

log = logging.getLogger("atelier.worker")


def worker_id() -> str:
    """This worker's name in job leases: the supervisor's (host:server pid), else host:parent pid."""
    return os.environ.get("ATELIER_WORKER_ID") or f"{socket.gethostname()}:{os.getppid()}"


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s worker: %(message)s")
    for handler in logging.getLogger().handlers:  # job errors quote file names: no personal data in the log
        handler.addFilter(RedactingFilter())
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    parent, me, lease_s = os.getppid(), worker_id(), settings.job_lease_s
    # A worker needs few connections (one per running job, and its loop): a quarter of the server's.
    engine = make_engine(settings.db_url, pool_size=max(1, settings.db_pool_size // 4),
                         max_overflow=max(settings.max_jobs + 2, settings.db_max_overflow // 4))
    sessions = make_sessionmaker(engine, audit_key=audit_mac_key(settings))
    blobs = open_blobs(settings)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    running: dict[str, threading.Thread] = {}
    renewed = 0.0
    while not stopping.is_set():
        if os.getppid() != parent:  # the server is gone
            break
        try:
            if time.monotonic() - renewed > lease_s / 3:
                with sessions() as db:
                    store.renew_leases(db, owner=me, lease_s=lease_s)
                    # The first pass also takes back the jobs leased to this worker's name: its predecessor's.
                    for job_id in store.requeue_orphans(db, owner=None if renewed else me):
                        log.warning("job %s lost its worker; queued again", job_id)
                renewed = time.monotonic()
            for job_id in [j for j, t in running.items() if not t.is_alive()]:
                del running[job_id]
            while len(running) < settings.max_jobs:
                with sessions() as db:
                    job = store.claim_next(db, owner=me, lease_s=lease_s)
                    if job is not None:
                        store.add_event(db, job.id, f"claimed by worker {me} (attempt {job.attempts})",
                                        data={"worker": me, "attempt": job.attempts})
                if job is None:
                    break
                log.info("running job %s", job.id)
                t = threading.Thread(target=run_job, args=(job.id,), name=job.id, daemon=True,
                                     kwargs=dict(settings=settings, sessions=sessions, blobs=blobs,
                                                 shutting_down=stopping))
                running[job.id] = t
                t.start()
        except Exception:  # noqa: BLE001 — the database went away: keep the jobs, try again shortly
            log.exception("the job queue is unreachable; retrying")
            time.sleep(1.0)
        time.sleep(0.2)
    stopping.set()
    _hand_back(sessions, running, me, lease_s)


def _hand_back(sessions, running: dict[str, threading.Thread], me: str, lease_s: float) -> None:
    """Let running jobs reach a checkpoint (keeping their leases alive meanwhile, so no other worker
    starts them twice), then queue what is unfinished again."""
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in running.values()) and time.monotonic() < deadline:
        with sessions() as db:
            store.renew_leases(db, owner=me, lease_s=lease_s)
        for t in running.values():
            t.join(timeout=min(lease_s / 3, 1.0))
    with sessions() as db:
        store.requeue_orphans(db, owner=me, graceful=True)


if __name__ == "__main__":
    main()
