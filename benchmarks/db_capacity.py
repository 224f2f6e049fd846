"""How many generation requests per second the database can account for, SQLite vs PostgreSQL.

    .venv/bin/python benchmarks/db_capacity.py [--seconds 5] [--concurrency 1 4 16] [--database-url URL]

Every generation request does the same database work whatever its model, on every replica:
the key looked up once (by the gate before the body; the route's dependency takes it), the rate-limit
verdict under a lock on the key's row and its usage row written (storage/usage.py `admit`), then at
the end the usage updated and one audit entry appended to the chain, which the usage writer does
behind the response, many requests to a transaction (storage/usage_writer.py); the chain is the
one write every replica serialises on. This runs exactly that code, from `concurrency` threads
(one connection each) and one writer, against a fresh SQLite file and a fresh PostgreSQL database
(a throwaway cluster from tests/postgres.py unless --database-url names one), and prints
requests/s (everything written), the latency of a request's own database work before its
response, and the ratio to one thread. It is the database's ceiling in docs/scaling.md's capacity
model; replicas share it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from atelier.api.deps import key_from_header  # noqa: E402
from atelier.safety.audit import audit_key  # noqa: E402
from atelier.storage.db import make_engine, make_sessionmaker  # noqa: E402
from atelier.storage.audit import record  # noqa: E402
from atelier.storage.keys import create_key  # noqa: E402
from atelier.storage.usage import InFlight, admit  # noqa: E402
from atelier.storage.usage_writer import Served, UsageWriter, write  # noqa: E402


def one_request(sessions, header: str, inflight: InFlight, writer: UsageWriter) -> None:
    """The database side of one metered generation, as the server does it."""
    with sessions() as db:  # the key gate (api/limits.py)
        gate_key = key_from_header(db, header)
    with sessions() as db:  # the route's dependency takes the gate's key, then metered() (api/metering.py)
        key = db.merge(gate_key, load=False)
        v, usage_id = admit(db, key.id, key.limits, "completions", parallel=inflight.count(key.id),
                            unwritten=writer.pending(key.id))
        assert v.allowed, v.message
        key_id = key.id
    inflight.enter(key_id)
    inflight.leave(key_id)  # the meter's close: the rest is the writer's
    writer.submit(Served(usage_id, key_id, "completions", "tang-poet@1", 64, 0, "春眠不觉晓"))


def server_cpu_seconds(uid: int | None) -> float:
    """CPU time used so far by the processes of user `uid` (the PostgreSQL cluster's): what the database
    server itself spends, apart from this client's Python."""
    if uid is None:
        return 0.0
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.parent.stat().st_uid != uid:
                continue
            fields = stat.read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def measure(sessions, header: str, threads: int, seconds: float, server_uid: int | None) -> dict:
    inflight, stop, latencies, lock = InFlight(), threading.Event(), [], threading.Lock()
    writer = UsageWriter(sessions)

    def loop():
        mine = []
        while not stop.is_set():
            t = time.perf_counter()
            one_request(sessions, header, inflight, writer)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    cpu = server_cpu_seconds(server_uid)
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    writer.close(timeout=60)  # requests count once their usage and audit entry are written
    elapsed = time.perf_counter() - start
    server_ms = 1000 * (server_cpu_seconds(server_uid) - cpu) / max(1, len(latencies))
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "server_ms": server_ms, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))], "n": len(latencies)}


def bench(name: str, url: str, concurrency: list[int], seconds: float, server_uid: int | None = None) -> None:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine, audit_key=audit_key(b"\x01" * 32))
    with sessions() as db:
        _, secret = create_key(db, name="bench", scopes=["generate"])
    header = f"Bearer {secret}"
    warm = UsageWriter(sessions)
    one_request(sessions, header, InFlight(), warm)  # warm the pool and the caches
    warm.close()
    base = None
    for threads in concurrency:
        r = measure(sessions, header, threads, seconds, server_uid)
        base = base or r["rps"]
        server = f"{r['server_ms']:>9.2f}" if server_uid is not None else f"{'-':>9}"
        print(f"{name:<11} {threads:>7} {r['rps']:>10.0f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} "
              f"{r['rps'] / base:>8.2f}x {server} {r['n']:>8}")
    audit = []
    for _ in range(200):  # the serialised part: one audit append, lock to commit, nothing else running
        with sessions() as db:
            t = time.perf_counter()
            record(db, action="generate", target="tang-poet@1", key_id="key_bench", detail={"tokens": 64})
            audit.append(time.perf_counter() - t)
    hold = statistics.median(audit)
    print(f"{name:<11} one audit append holds the chain {1000 * hold:.2f} ms: at most {1 / hold:.0f} appends/s "
          "across every replica")
    per_entry = []
    for _ in range(20):  # as the usage writer appends under load: many requests' entries to one transaction
        with sessions() as db:
            t = time.perf_counter()
            write(db, [Served(0, "key_bench", "completions", "tang-poet@1", 64, 0, "春眠不觉晓")] * 32)
            db.commit()
            per_entry.append((time.perf_counter() - t) / 32)
    hold = statistics.median(per_entry)
    print(f"{name:<11} in batches of 32 an entry holds it {1000 * hold:.2f} ms: at most {1 / hold:.0f} appends/s")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--database-url", help="a PostgreSQL database to use instead of a throwaway cluster")
    args = parser.parse_args()
    print(f"{'database':<11} {'threads':>7} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'vs 1':>9} "
          f"{'server ms':>9} {'requests':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        bench("sqlite", f"sqlite:///{tmp}/bench.db", args.concurrency, args.seconds)
    if args.database_url:
        bench("postgresql", args.database_url, args.concurrency, args.seconds)
        return
    from postgres import Postgres

    pg = Postgres()
    try:
        bench("postgresql", pg.create_database("bench"), args.concurrency, args.seconds, pg.data.stat().st_uid)
    finally:
        pg.close()


if __name__ == "__main__":
    main()
