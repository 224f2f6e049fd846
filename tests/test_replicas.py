"""Scale-out: two `atelier serve` processes on different ports, over one PostgreSQL and one shared
ATELIER_HOME, behave as one service; a database lost mid-run answers 503 and recovers when it returns.

Real processes, a real PostgreSQL (tests/postgres.py), loopback only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ADMIN_KEY, LiveServer, free_port, make_settings, new_postgres_database
from test_jobs import POEMS, TINY, all_events



def start_replicas(env: dict, ports: list[int], logs) -> list[subprocess.Popen]:
    """Start every replica at once (they race for the migrations and the bootstrap), then wait for all."""
    procs = [subprocess.Popen([sys.executable, "-m", "atelier.cli", "serve"], env=env | {"ATELIER_PORT": str(p)},
                              stdout=log, stderr=log) for p, log in zip(ports, logs)]
    deadline = time.time() + 120
    for proc, port in zip(procs, ports):
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if r.status_code == 200 and r.json()["worker"]["alive"]:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                for p in procs:
                    p.kill()
                raise AssertionError(f"replica on port {port} did not start")
            time.sleep(0.2)
    return procs


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    home = tmp_path_factory.mktemp("shared-home")
    env = os.environ | {"ATELIER_HOME": str(home), "ATELIER_DATABASE_URL": new_postgres_database(),
                        "ATELIER_ADMIN_KEY": ADMIN_KEY, "ATELIER_JOB_LEASE_S": "5", "ATELIER_THREADS": "1"}
    ports = [free_port(), free_port()]
    logs = [open(home / f"replica-{i}.log", "wb") for i in range(2)]
    procs = start_replicas(env, ports, logs)
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                            timeout=60) for p in ports]
    try:
        yield clients
    finally:
        for c in clients:
            c.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()


def with_key(client: httpx.Client, secret: str) -> httpx.Client:
    return httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def test_both_replicas_bootstrapped_one_registry(replicas):
    a, b = replicas
    keys = a.get("/api/keys").json()["data"]
    assert [k["name"] for k in keys].count("admin") == 1  # one admin key, though both started at once
    assert a.get("/v1/models").json() == b.get("/v1/models").json()
    assert [v["version"] for v in a.get("/v1/models/tang-poet").json()["versions"]] == [1]


def test_a_key_made_on_one_replica_works_on_the_other_and_dies_on_both(replicas):
    a, b = replicas
    made = a.post("/api/keys", json={"name": "roaming", "scopes": ["read"]}).json()
    with with_key(b, made["key"]) as on_b, with_key(a, made["key"]) as on_a:
        assert on_b.get("/v1/models").status_code == 200
        assert b.delete(f"/api/keys/{made['id']}").status_code == 200
        assert on_a.get("/v1/models").status_code == 401


def test_rate_limits_count_requests_on_both_replicas(replicas):
    a, b = replicas
    made = a.post("/api/keys", json={"name": "metered", "scopes": ["generate"], "limits": {"rpm": 3}}).json()
    body = {"model": "tang-poet", "prompt": "春", "max_tokens": 1}
    with with_key(a, made["key"]) as on_a, with_key(b, made["key"]) as on_b:
        assert [c.post("/v1/completions", json=body).status_code for c in (on_a, on_b, on_a)] == [200, 200, 200]
        refused = on_b.post("/v1/completions", json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_the_audit_chain_stays_one_valid_chain_under_concurrent_writers(replicas):
    a, b = replicas
    before = a.get("/api/audit/verify").json()["entries"]

    def make(i):
        return (a, b)[i % 2].post("/api/keys", json={"name": f"burst-{i}", "scopes": ["read"]}).status_code

    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(make, range(40))) == {201}
    for replica in (a, b):
        verdict = replica.get("/api/audit/verify").json()
        assert verdict["ok"], verdict
        assert verdict["entries"] >= before + 40


def test_each_job_is_run_by_exactly_one_worker(replicas):
    """Jobs created on either replica are claimed once each (a database lease, not a file lock), and the
    models they make are visible on both."""
    a, b = replicas
    data = "\n\n".join(POEMS * 3).encode()
    file_id = a.post("/v1/files", files={"file": ("poems.txt", data)}, data={"purpose": "fine-tune"}).json()["id"]
    jobs = [(a, b)[i % 2].post("/v1/fine_tuning/jobs", json={
        "model": "chargpt", "training_file": file_id, "suffix": f"twin{i}",
        "hyperparameters": TINY | {"max_steps": 30, "eval_every": 10}}).json()["id"] for i in range(4)]
    deadline = time.time() + 300
    for job_id in jobs:
        while (job := b.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.time() < deadline, f"{job_id} did not finish"
            time.sleep(0.5)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        claims = [e for e in all_events(a, job_id) if e["message"].startswith("claimed by worker")]
        assert len(claims) == 1, claims
    workers = {e["data"]["worker"] for job_id in jobs for e in all_events(a, job_id) if "worker" in e["data"]}
    assert len(workers) >= 1
    for i in range(4):
        assert a.get(f"/v1/models/twin{i}").json()["versions"][0]["version"] == 1
        assert b.get(f"/v1/models/twin{i}").status_code == 200


def test_a_job_whose_replica_dies_is_finished_by_the_other(replicas):
    """kill -9 of one replica's server and worker mid-job: its lease runs out (ATELIER_JOB_LEASE_S=5) and
    the other replica's worker takes the job over, resuming from its last checkpoint. Runs last: it
    leaves one replica."""
    import signal

    a, b = replicas
    data = "\n\n".join(POEMS * 3).encode()
    file_id = a.post("/v1/files", files={"file": ("poems.txt", data)}, data={"purpose": "fine-tune"}).json()["id"]
    job_id = a.post("/v1/fine_tuning/jobs", json={
        "model": "chargpt", "training_file": file_id, "suffix": "orphan",
        "hyperparameters": TINY | {"max_steps": 3000, "eval_every": 20}}).json()["id"]
    deadline = time.time() + 120
    while not (owner := next((e["data"]["worker"] for e in all_events(a, job_id) if "worker" in e["data"]), None)) \
            or not b.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]:
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.2)
    workers = {c: c.get("/readyz").json()["worker"] for c in (a, b)}
    doomed = next(c for c in (a, b) if workers[c]["id"] == owner)  # its id is host:server pid
    survivor = b if doomed is a else a
    os.kill(workers[doomed]["pid"], signal.SIGKILL)
    os.kill(int(owner.rsplit(":", 1)[1]), signal.SIGKILL)
    deadline = time.time() + 300
    while (job := survivor.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.time() < deadline, "the job was not taken over"
        time.sleep(0.5)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    messages = [e["message"] for e in all_events(survivor, job_id)]
    assert any(m.startswith("worker lost: job queued again") for m in messages)
    assert len([m for m in messages if m.startswith("claimed by worker")]) == 2
    assert any(m.startswith("resumed from the checkpoint") for m in messages)


def test_a_database_lost_mid_run_answers_503_and_recovers(tmp_path):
    """A PostgreSQL of its own, stopped under a running server and started again."""
    from postgres import Postgres

    pg = Postgres()
    try:
        settings = make_settings(tmp_path / "home", database_url=pg.create_database("lost"), run_worker=False,
                                 shipped_models=False)
        with LiveServer(settings) as s, httpx.Client(base_url=s.url, timeout=30,
                                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
            assert http.get("/api/keys").status_code == 200
            pg.stop()
            for method, path, body in (("GET", "/api/keys", None), ("POST", "/api/keys", {"name": "x"}),
                                       ("GET", "/v1/models", None)):
                r = http.request(method, path, json=body)
                assert r.status_code == 503, (path, r.text)
                assert r.json()["error"]["code"] == "database_unavailable" and r.json()["error"]["type"] == "server_error"
            assert http.get("/readyz").status_code == 503
            pg.start()
            assert http.get("/readyz").status_code == 200
            assert http.post("/api/keys", json={"name": "after", "scopes": ["read"]}).status_code == 201
            assert http.get("/api/audit/verify").json()["ok"]
    finally:
        pg.close()
