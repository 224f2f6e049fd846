"""Shared fixtures: a real Atelier server on loopback, with a fresh home and small limits."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from atelier.api.app import create_app
from atelier.config import Settings

ADMIN_KEY = "test-admin-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving create_app(settings) in a thread, on 127.0.0.1:<free port>."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_process(env: dict, port: int, *, ready=lambda readyz: True, output=None, timeout_s: float = 90):
    """`atelier serve` as a process of its own (for signals: SIGTERM, kill -9), returned once its /readyz
    answers and `ready(readyz_json)` holds; its output goes to `output` (a file) or nowhere."""
    import subprocess
    import sys

    sink = output if output is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "atelier.cli", "serve"], env=env, stdout=sink, stderr=sink)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            if r.status_code == 200 and ready(r.json()):
                return proc
        except (httpx.TransportError, KeyError, TypeError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("atelier serve did not start")


# -- the database under the tests: SQLite, or with `pytest --db postgresql` a real PostgreSQL --------
def pytest_addoption(parser):
    parser.addoption("--db", choices=("sqlite", "postgresql"), default="sqlite",
                     help="the database every test server uses (make_settings): a fresh SQLite file in its home, "
                          "or a fresh database on a PostgreSQL cluster started for the session")


_backend = {"db": "sqlite", "postgres": None, "databases": 0}


def pytest_configure(config):
    _backend["db"] = config.getoption("--db")


def pytest_unconfigure(config):
    if _backend["postgres"] is not None:
        _backend["postgres"].close()


def shared_postgres():
    """The session's PostgreSQL cluster, started on first use (tests/postgres.py)."""
    if _backend["postgres"] is None:
        from postgres import Postgres

        _backend["postgres"] = Postgres()
    return _backend["postgres"]


def new_postgres_database() -> str:
    _backend["databases"] += 1
    return shared_postgres().create_database(f"atelier_test_{os.getpid()}_{_backend['databases']}")


def database_url(folder: Path) -> str:
    """A fresh database for a test that opens one itself: SQLite in `folder`, or one on the PostgreSQL."""
    if _backend["db"] == "postgresql":
        return new_postgres_database()
    return f"sqlite:///{folder / 'a.db'}"


def make_settings(home: Path, **overrides) -> Settings:
    values = dict(home=home, port=free_port(), admin_key=ADMIN_KEY, max_body_bytes=20_000, max_tokens_limit=100,
                  max_n=4, max_prompt_chars=150, max_batch=8, threads=None, max_upload_bytes=40_000_000)
    if _backend["db"] == "postgresql" and "database_url" not in overrides:
        values["database_url"] = new_postgres_database()
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with LiveServer(make_settings(tmp_path_factory.mktemp("home"))) as s:
        yield s


def admin_http(live: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def admin_openai(live: LiveServer):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with admin_http(server) as c:
        yield c


@pytest.fixture()
def client(server):
    return admin_openai(server)


# -- images: a server with tiny random image models registered (fast, deterministic) -------


def leave_a_stream_early(live: LiveServer, max_tokens: int = 100) -> None:
    """Start 4 long streamed completions and leave after the first token (at temperature 2 <eos> is all
    but never drawn, so they would take a while)."""
    body = {"model": "tang-poet", "prompt": "春", "max_tokens": max_tokens, "n": 4, "temperature": 2.0,
            "stream": True, "seed": 1}
    with httpx.stream("POST", live.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break


def raw_exchange(server, head: bytes, body_part: bytes, wait_s: float = 10.0) -> bytes:
    """Send a request head and a body (or only part of it) over a raw socket; what the server answers before it
    closes the connection, an error's body has arrived, or `wait_s` passes."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head + body_part)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and b'"error"' in b"".join(chunks):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def audit_entries(http) -> list[dict]:
    """Every audit entry, page by page (the session's server has audited other tests' work too)."""
    entries, after = [], 0
    while True:
        page = http.get("/api/audit", params={"limit": 500, "after": after}).json()
        entries += page["data"]
        if not page["has_more"]:
            return entries
        after = page["data"][-1]["id"]


def engine_run(engine, sequences: list) -> list[tuple[str, list[int], object]]:
    """(text, tokens, Finished) of each Sequence (index i: the i-th; loop and events filled in here), submitted to
    `engine` at once: the worker admits nothing until every one is queued."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from atelier.runtime.text_engine import Finished, TextChunk

    async def run():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with engine._wake:
            for seq in sequences:
                seq.loop, seq.events = loop, events
                engine.submit(seq)
        out: list = [["", [], None] for _ in sequences]
        while any(done is None for _, _, done in out):
            i, event = await asyncio.wait_for(events.get(), 30)
            if isinstance(event, TextChunk):
                out[i][0] += event.text
                out[i][1] += [s.token for s in event.tokens]
            else:
                assert isinstance(event, Finished), event
                out[i][2] = event
        return [tuple(o) for o in out]

    # A loop of its own in a thread of its own: the studio tests' browser keeps one running in this thread.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(60)


def engine_texts(lm, requests: list[tuple[str, int, int]], *, max_batch: int = 8,
                 temperature: float = 1.0) -> list[str]:
    """The texts a TextEngine writes for (prompt, max_tokens, seed) requests submitted at once (admitted
    together, then as slots free), in order; each ends after exactly max_tokens (ignore_eos)."""
    from atelier.runtime.sampling import SamplingParams
    from atelier.runtime.text_engine import Sequence, TextEngine

    engine = TextEngine(lm, max_batch)
    params = SamplingParams(temperature=temperature, ignore_eos=True)
    answers = engine_run(engine, [Sequence(index=i, prompt_ids=lm.encode(prompt), params=params, max_tokens=n, stop=[],
                                           seed=seed, loop=None, events=None)
                                  for i, (prompt, n, seed) in enumerate(requests)])
    engine.close()
    assert all(s is None for s in engine.slots)
    assert [done.completion_tokens for _, _, done in answers] == [n for _, n, _ in requests]
    return [text for text, _, _ in answers]


def engine_answers(engine, requests: list[tuple[list[int], str, int, int]]) -> list[tuple[list[int], object]]:
    """(tokens, Finished) for (prompt ids, owner, max_tokens, seed) requests submitted to `engine` at once."""
    from atelier.runtime.sampling import SamplingParams
    from atelier.runtime.text_engine import Sequence

    params = SamplingParams(ignore_eos=True)
    answers = engine_run(engine, [Sequence(index=i, prompt_ids=ids, params=params, max_tokens=n, stop=[], seed=seed,
                                           loop=None, events=None, owner=owner)
                                  for i, (ids, owner, n, seed) in enumerate(requests)])
    return [(tokens, done) for _, tokens, done in answers]


def make_tiny_image_models(root: Path) -> dict[str, Path]:
    """Folders of a tiny ddpm (with a tiny ×2 upscaler) and a tiny dcgan (seeded random weights, perturbed so
    every layer matters)."""
    import torch

    from atelier.models import dcgan, ddpm, upscaler
    from atelier.models.text_encoder import WordVocab

    vocab = WordVocab.build(["grinning cat face", "smiling face with heart eyes", "red apple", "blue car"])
    torch.manual_seed(0)
    diffusion = ddpm.EmojiDiffusion(ddpm.DdpmConfig(base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
                                                    attention_resolutions=[16], vocab_size=len(vocab), text_dim=32))
    gan = dcgan.EmojiGAN(dcgan.DcganConfig(g_channels=16, d_channels=16, vocab_size=len(vocab), text_dim=32))
    upscaler_net = upscaler.Upscaler(upscaler.UpscalerConfig(channels=8, num_blocks=1))
    with torch.no_grad():
        for p in list(diffusion.parameters()) + list(upscaler_net.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    folders = {"tiny-diffusion": ddpm.save_pretrained(diffusion.eval(), vocab, root / "tiny-diffusion"),
               "tiny-gan": dcgan.save_pretrained(gan.eval(), vocab, root / "tiny-gan")}
    upscaler.save_pretrained(upscaler_net.eval(), folders["tiny-diffusion"])  # only the diffusion model has one
    return folders


@pytest.fixture(scope="session")
def image_server(tmp_path_factory):
    """A server with image-friendly limits and tiny-diffusion (ddpm) + tiny-gan (dcgan) registered."""
    from atelier.storage.registry import register_version

    settings = make_settings(tmp_path_factory.mktemp("image-home"), max_body_bytes=200_000, max_image_n=4,
                             max_image_steps=50, max_image_upload_bytes=60_000, max_image_upload_pixels=300_000,
                             image_max_batch=16, image_batch_wait_ms=50, image_threads=2, run_worker=False)
    folders = make_tiny_image_models(tmp_path_factory.mktemp("tiny-image-models"))
    with LiveServer(settings) as s:
        with s.app.state.sessions() as db:
            register_version(db, s.app.state.blobs, name="tiny-diffusion", family="ddpm", task="image-generation",
                             folder=folders["tiny-diffusion"], metrics={"val_loss": 1.0})
            register_version(db, s.app.state.blobs, name="tiny-gan", family="dcgan", task="image-generation",
                             folder=folders["tiny-gan"])
        yield s


@pytest.fixture()
def image_http(image_server):
    with admin_http(image_server) as c:
        yield c


@pytest.fixture()
def image_client(image_server):
    return admin_openai(image_server)


# -- the browser the studio tests drive ---------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium through Playwright, one for the session (every studio test file shares it)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test`, which installs Debian's chromium "
                    "(apt-get install chromium) before the tests", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True, timeout=30_000)
        yield b
        b.close()
