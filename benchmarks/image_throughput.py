"""Image throughput through the real server: 1 vs 16 concurrent requests, micro-batching on and off.

    .venv/bin/python benchmarks/image_throughput.py [--model emoji-diffusion] [--steps 20] [--requests 16] [--threads N]

Starts Atelier on loopback with a fresh home (the shipped models), then sends `--requests`
requests of n=1 through the openai SDK:
  sequential   — one at a time (each request is its own batch)
  concurrent   — all at once from `--requests` threads; the image engine micro-batches them
  concurrent, batching off — the same with ATELIER_IMAGE_MAX_BATCH=1 (a second server)
and prints images/s for each and the ratios. Every request uses its own seed, and the
benchmark checks that batched and sequential images are byte-identical.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ADMIN_KEY, LiveServer, make_settings  # noqa: E402

from atelier.config import inference_threads  # noqa: E402


def run(server, model: str, steps: int, seeds: list[int], concurrent: bool) -> tuple[float, list[bytes]]:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=600)
    extra = {"steps": steps} if model != "emoji-gan" else {}

    def one(seed: int) -> bytes:
        r = client.images.generate(model=model, prompt="smiling cat face", n=1, size="32x32",
                                   response_format="b64_json", extra_body={"seed": seed, "store": False, **extra})
        return base64.b64decode(r.data[0].b64_json)

    one(seeds[0])  # load the model, warm up
    start = time.perf_counter()
    if concurrent:
        with cf.ThreadPoolExecutor(len(seeds)) as pool:
            out = list(pool.map(one, seeds))
    else:
        out = [one(s) for s in seeds]
    return len(seeds) / (time.perf_counter() - start), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji-diffusion")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="the server's ATELIER_THREADS (default: half the cores)")
    args = ap.parse_args()
    seeds = list(range(100, 100 + args.requests))
    results = {}
    with tempfile.TemporaryDirectory() as home:
        common = dict(threads=args.threads, run_worker=False, max_body_bytes=1_000_000)
        with LiveServer(make_settings(Path(home) / "a", image_max_batch=args.requests, **common)) as server:
            results["sequential"], seq = run(server, args.model, args.steps, seeds, concurrent=False)
            results["concurrent"], conc = run(server, args.model, args.steps, seeds, concurrent=True)
            engine = next(m for m in server.app.state.manager._loaded.values()
                          if m.ref.startswith(args.model + "@")).engine
            sizes = engine.batch_sizes[-8:]
        with LiveServer(make_settings(Path(home) / "b", image_max_batch=1, **common)) as server:
            results["concurrent, batching off"], off = run(server, args.model, args.steps, seeds, concurrent=True)
    print(f"{args.model}, {args.requests} requests of n=1, {args.steps} steps, "
          f"{inference_threads(make_settings(Path('.'), threads=args.threads))} threads")
    for k, v in results.items():
        print(f"  {k:26s} {v:7.2f} images/s")
    print(f"  ratio concurrent / sequential          {results['concurrent'] / results['sequential']:.2f}x")
    print(f"  ratio batching on / off (concurrent)   {results['concurrent'] / results['concurrent, batching off']:.2f}x")
    print(f"  last batch sizes: {sizes}")
    print(f"  batched images identical to sequential ones: {seq == conc == off}")


if __name__ == "__main__":
    main()
