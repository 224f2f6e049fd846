"""The job worker: a process of its own, so training never blocks the request path.

    python -m atelier.jobs.worker        (the server starts and supervises it)

One worker per ATELIER_HOME, enforced by an exclusive lock on `worker.lock` (a new worker
waits for an old one to let go). On start it queues again any job left `running` by a
worker that died, and those jobs resume from their last checkpoint. It runs up to
ATELIER_MAX_JOBS jobs at a time, one thread each, and exits when its parent (the server)
is gone or on SIGTERM, leaving unfinished jobs queued.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
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


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s worker: %(message)s")
    for handler in logging.getLogger().handlers:  # job errors quote file names: no personal data in the log
        handler.addFilter(RedactingFilter())
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    parent = os.getppid()
    lock = open(home / "worker.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while an older worker still runs
    (home / "worker.pid").write_text(str(os.getpid()))
    sessions = make_sessionmaker(make_engine(settings.db_url), audit_key=audit_mac_key(settings))
    blobs = open_blobs(settings)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    with sessions() as db:
        for job_id in store.requeue_orphans(db):
            log.warning("job %s was interrupted; queued again", job_id)
    running: dict[str, threading.Thread] = {}
    while not stopping.is_set():
        if os.getppid() != parent:  # the server is gone
            stopping.set()
            break
        for job_id in [j for j, t in running.items() if not t.is_alive()]:
            del running[job_id]
        while len(running) < settings.max_jobs:
            with sessions() as db:
                job = store.claim_next(db)
            if job is None:
                break
            log.info("running job %s", job.id)
            t = threading.Thread(target=run_job, args=(job.id,), name=job.id, daemon=True,
                                 kwargs=dict(settings=settings, sessions=sessions, blobs=blobs, shutting_down=stopping))
            running[job.id] = t
            t.start()
        time.sleep(0.2)
    for t in running.values():
        t.join(timeout=30)
    with sessions() as db:
        store.requeue_orphans(db, graceful=True)


if __name__ == "__main__":
    main()
