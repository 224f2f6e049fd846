"""A job whose worker keeps dying is failed after MAX_ATTEMPTS, not retried for ever; a graceful stop
does not count as an attempt (issue #10, defect 11). Real SQLite, the worker's own functions."""

from __future__ import annotations

from atelier.jobs import store
from atelier.storage.db import Job, make_engine, make_sessionmaker


def test_attempts_are_capped_and_graceful_stops_do_not_count(tmp_path):
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'a.db'}"))
    with sessions() as db:
        job = store.create_job(db, base_model="chargpt", family="chargpt", suffix="x", training_file="file-1",
                               validation_file=None, hyperparameters={}, seed=1, key_id=None)
        for attempt in range(1, store.MAX_ATTEMPTS + 1):
            claimed = store.claim_next(db)
            assert claimed.id == job.id and claimed.attempts == attempt
            if attempt == 1:  # the server stopped gracefully: queued again, the attempt given back
                store.requeue_orphans(db, graceful=True)
                assert db.get(Job, job.id).status == "queued"
                claimed = store.claim_next(db)
                assert claimed.attempts == 1
            store.requeue_orphans(db)  # the worker died
        db.expire_all()
        failed = db.get(Job, job.id)
        assert failed.status == "failed" and failed.error["code"] == "worker_died"
        assert store.claim_next(db) is None
