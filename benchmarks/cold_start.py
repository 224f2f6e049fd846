"""Cold start and memory: how long `atelier serve` takes to answer /readyz, and its resident memory with
every shipped model loaded (issue "Performance", goal 5: ≤ 3 s after the first start, ≤ 1 GiB).

    .venv/bin/python benchmarks/cold_start.py [--starts 3]

Starts the server on a fresh home (the first start registers the shipped models: hashing and
storing their weights), stops it, then starts it `--starts` more times on the same home and
reports each time to a 200 from /readyz. On the last start it loads every shipped model
(POST /api/models/{name}/load, ATELIER_MAX_LOADED_MODELS set to hold them all) and reports the
server's resident memory before and after, and the job worker's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ADMIN_KEY, free_port  # noqa: E402

SHIPPED = ("tang-poet", "folk-tunes", "emoji-diffusion", "emoji-gan", "style-transfer")


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def start(home: str) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    env = os.environ | {"ATELIER_HOME": home, "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": ADMIN_KEY,
                        "ATELIER_LOG_LEVEL": "warning", "ATELIER_MAX_LOADED_MODELS": str(len(SHIPPED))}
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "atelier.cli", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port, time.perf_counter() - began
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit("atelier serve exited")
        time.sleep(0.01)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=3, help="starts after the first")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        proc, _, first = start(home)
        stop(proc)
        times = []
        for i in range(args.starts):
            proc, port, took = start(home)
            times.append(took)
            if i < args.starts - 1:
                stop(proc)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=300) as http:
            worker = http.get("/readyz").json()["worker"]["pid"]
            idle = rss_mb(proc.pid)
            for name in SHIPPED:
                http.post(f"/api/models/{name}/load", json={"keep_alive": -1}).raise_for_status()
            loaded = [m["model"] for m in http.get("/api/ps").json()["data"]]
            full, worker_mb = rss_mb(proc.pid), rss_mb(worker)
        stop(proc)
    best = min(times)
    print(f"first start (registers the shipped models): {first:.2f} s to /readyz")
    print(f"later starts: {', '.join(f'{t:.2f}' for t in times)} s (best {best:.2f} s; goal ≤ 3 s: "
          f"{best / 3:.2f} of it)")
    print(f"server RSS: {idle:.0f} MB idle, {full:.0f} MB with {len(loaded)} shipped models loaded "
          f"({', '.join(loaded)}); goal ≤ 1024 MB: {full / 1024:.2f} of it")
    print(f"job worker RSS: {worker_mb:.0f} MB (a process of its own)")


if __name__ == "__main__":
    main()
