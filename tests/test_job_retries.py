"""A job whose worker keeps dying is failed after MAX_ATTEMPTS, not retried for ever; a graceful stop
does not count as an attempt (issue #10, defect 11). Real SQLite, the worker's own functions."""

from __future__ import annotations

from atelier.jobs import store
from conftest import database_url

from atelier.storage.db import Job, make_engine, make_sessionmaker


def test_attempts_are_capped_and_graceful_stops_do_not_count(tmp_path):
    sessions = make_sessionmaker(make_engine(database_url(tmp_path)))
    with sessions() as db:
        job = store.create_job(db, base_model="chargpt", family="chargpt", suffix="x", training_file="file-1",
                               validation_file=None, hyperparameters={}, seed=1, key_id=None)
        for attempt in range(1, store.MAX_ATTEMPTS + 1):
            claimed = store.claim_next(db, owner="w1", lease_s=30)
            assert claimed.id == job.id and claimed.attempts == attempt
            if attempt == 1:  # the server stopped gracefully: queued again, the attempt given back
                store.requeue_orphans(db, owner="w1", graceful=True)
                assert db.get(Job, job.id).status == "queued"
                claimed = store.claim_next(db, owner="w1", lease_s=30)
                assert claimed.attempts == 1
            store.requeue_orphans(db, owner="w1")  # the worker died; it restarts
        db.expire_all()
        failed = db.get(Job, job.id)
        assert failed.status == "failed" and failed.error["code"] == "worker_died"
        assert store.claim_next(db, owner="w1", lease_s=30) is None


def test_a_job_stays_with_its_worker_while_the_lease_is_renewed_and_moves_when_it_runs_out(tmp_path):
    """Two workers (two replicas) over one queue: a live lease is left alone, a lapsed one is requeued
    once, and a claim race among many claimers has exactly one winner."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    from sqlalchemy import update

    sessions = make_sessionmaker(make_engine(database_url(tmp_path)))
    with sessions() as db:
        job = store.create_job(db, base_model="chargpt", family="chargpt", suffix="x", training_file="file-1",
                               validation_file=None, hyperparameters={}, seed=1, key_id=None)

    def claim(owner):
        with sessions() as db:
            won = store.claim_next(db, owner=owner, lease_s=30)
            return won.id if won else None

    with ThreadPoolExecutor(8) as pool:
        winners = [w for w in pool.map(claim, [f"w{i}" for i in range(8)]) if w]
    assert winners == [job.id]
    with sessions() as db:
        owner = db.get(Job, job.id).lease_owner
        other = "w-other" if owner != "w-other" else "w-else"
        assert store.requeue_orphans(db, owner=other) == []  # the lease is live: not another's to take
        assert store.renew_leases(db, owner=owner, lease_s=30) == 1
        assert store.renew_leases(db, owner=other, lease_s=30) == 0
        lapsed = db.get(Job, job.id).lease_until - timedelta(seconds=60)
        db.execute(update(Job).where(Job.id == job.id).values(lease_until=lapsed))
        db.commit()
        assert store.requeue_orphans(db, owner=other) == [job.id]  # its worker stopped renewing: gone
        assert store.requeue_orphans(db, owner=other) == []
        db.expire_all()
        requeued = db.get(Job, job.id)
        assert requeued.status == "queued" and requeued.lease_owner is None and requeued.attempts == 1
        assert store.claim_next(db, owner=other, lease_s=30).lease_owner == other
