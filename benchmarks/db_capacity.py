"""How many generation requests per second the database can account for, SQLite vs PostgreSQL.

    .venv/bin/python benchmarks/db_capacity.py [--seconds 5] [--concurrency 1 4 16] [--database-url URL]

Every generation request does the same database work whatever its model, on every replica:
the key looked up twice (the gate before the body, the route's dependency), the rate-limit
verdict under a lock on the key's row and its usage row written (api/metering.py), then at the
end the usage updated and one audit entry appended to the chain (storage/audit.py) — the one
write every replica serialises on. This runs exactly that code, from `concurrency` threads
(one connection each), against a fresh SQLite file and a fresh PostgreSQL database (a
throwaway cluster from tests/postgres.py unless --database-url names one), and prints
requests/s, the latency of one request's database work, and the ratio to one thread. It is the
database's ceiling in docs/scaling.md's capacity model; replicas share it.
"""

from __future__ import annotations

import argparse
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
from atelier.api.metering import Meter  # noqa: E402
from atelier.safety.audit import audit_key  # noqa: E402
from atelier.storage.db import ApiKey, Usage, make_engine, make_sessionmaker  # noqa: E402
from atelier.storage.keys import create_key  # noqa: E402
from atelier.storage.usage import InFlight, verdict  # noqa: E402
from sqlalchemy import select  # noqa: E402


def one_request(sessions, header: str, inflight: InFlight) -> None:
    """The database side of one metered generation, as the server does it."""
    with sessions() as db:  # the key gate (api/limits.py)
        key_from_header(db, header)
    with sessions() as db:  # the route's dependency, then metered() (api/metering.py)
        key = key_from_header(db, header)
        db.execute(select(ApiKey.id).where(ApiKey.id == key.id).with_for_update())
        v = verdict(db, key.id, key.limits, parallel=inflight.count(key.id))
        assert v.allowed, v.message
        row = Usage(key_id=key.id, route="completions")
        db.add(row)
        db.commit()
        key_id, usage_id = key.id, row.id
    inflight.enter(key_id)
    meter = Meter(sessions, key_id, usage_id, inflight)
    meter.model, meter.tokens, meter.prompt = "tang-poet@1", 64, "春眠不觉晓"
    meter.close()  # usage updated, audit entry appended


def measure(sessions, header: str, threads: int, seconds: float) -> dict:
    inflight, stop, latencies, lock = InFlight(), threading.Event(), [], threading.Lock()

    def loop():
        mine = []
        while not stop.is_set():
            t = time.perf_counter()
            one_request(sessions, header, inflight)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))], "n": len(latencies)}


def bench(name: str, url: str, concurrency: list[int], seconds: float) -> None:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine, audit_key=audit_key(b"\x01" * 32))
    with sessions() as db:
        _, secret = create_key(db, name="bench", scopes=["generate"])
    header = f"Bearer {secret}"
    one_request(sessions, header, InFlight())  # warm the pool and the caches
    base = None
    for threads in concurrency:
        r = measure(sessions, header, threads, seconds)
        base = base or r["rps"]
        print(f"{name:<11} {threads:>7} {r['rps']:>10.0f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} "
              f"{r['rps'] / base:>8.2f}x {r['n']:>8}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--database-url", help="a PostgreSQL database to use instead of a throwaway cluster")
    args = parser.parse_args()
    print(f"{'database':<11} {'threads':>7} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'vs 1':>9} {'requests':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        bench("sqlite", f"sqlite:///{tmp}/bench.db", args.concurrency, args.seconds)
    if args.database_url:
        bench("postgresql", args.database_url, args.concurrency, args.seconds)
        return
    from postgres import Postgres

    pg = Postgres()
    try:
        bench("postgresql", pg.create_database("bench"), args.concurrency, args.seconds)
    finally:
        pg.close()


if __name__ == "__main__":
    main()
