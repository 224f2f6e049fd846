"""All of Atelier's settings, in one pydantic-settings class.

Every field is read from an `ATELIER_*` environment variable (e.g. `ATELIER_PORT=9000`);
CLI flags override them. Read settings through `get_settings()`, which caches one instance.
The README's settings table lists every field.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from atelier.common.durations import parse_keep_alive

PACKAGE_DIR = Path(__file__).resolve().parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore")

    home: Path = Field(default=Path("~/.atelier"), description="data folder: atelier.db and blobs/")
    host: str = Field(default="127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite:///<home>/atelier.db")
    db_pool_size: int = Field(default=20, ge=1, description="database connections each process keeps open (the server; its worker keeps a quarter)")
    db_max_overflow: int = Field(default=80, ge=0, description="more connections each process may open under load")
    admin_key: str | None = Field(default=None, description="on first start, use this as the admin key instead of a random one")
    lookup_cache_s: float = Field(default=2.0, ge=0, description="how long the server remembers what every request looks up: the key it names, the version its model name resolves to; a change through another replica, the job worker or the CLI shows within this (0: look up every time)")
    log_level: str = Field(default="info", description="debug | info | warning | error")

    # Encryption at rest (atelier/safety/crypto.py): blobs sealed with AES-256-GCM
    encrypt_at_rest: bool = Field(default=True, description="seal every blob (weights, uploads, artifacts) with AES-256-GCM")
    secret_key: SecretStr | None = Field(default=None, description="the data key, base64 of 32 bytes (e.g. from a secret manager)")
    secret_key_file: Path | None = Field(default=None, description="where the data key is kept; default <home>/secret.key, created on first start")

    # Client side (CLI): where the server is and which key to send
    url: str = Field(default="http://127.0.0.1:8000", description="server URL the CLI talks to")
    api_key: str | None = Field(default=None, description="API key the CLI sends")

    # Request limits: every one is explicit, configurable and tested.
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="largest accepted request body")
    max_tokens_limit: int = Field(default=512, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(default=8, ge=1, description="largest n (choices per request)")
    max_prompt_chars: int = Field(default=4000, ge=1, description="longest prompt or message text, in characters")
    max_stop_sequences: int = Field(default=4, ge=0, description="most stop sequences per request")
    body_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for the next part of a request body before a 408")
    max_upload_bytes: int = Field(default=50_000_000, ge=1024, description="largest uploaded file or model archive")

    # Jobs
    run_worker: bool = Field(default=True, description="start the job worker process with the server")
    max_jobs: int = Field(default=1, ge=1, description="jobs the worker runs at the same time; more wait queued")
    max_job_steps: int = Field(default=20_000, ge=1, description="most optimiser steps a job may ask for")
    job_lease_s: float = Field(default=30.0, ge=1.0, description="a worker renews its jobs' leases every third of "
                               "this; a job whose lease ran out (its worker died, on any replica) is queued again")

    # Runtime (atelier/runtime/manager.py): what stays loaded, like Ollama's OLLAMA_MAX_LOADED_MODELS / OLLAMA_KEEP_ALIVE
    max_loaded_models: int = Field(default=3, ge=1, description="model versions held loaded at once; the least recently used is unloaded first")
    max_model_memory: int | None = Field(default=None, ge=1, description="bytes of weights held loaded at once (unset: no limit besides the count)")
    keep_alive: str = Field(default="5m", description="how long a model stays loaded once idle: seconds or 30s / 5m / 1h; 0 unloads after each request, -1 keeps it")
    max_batch: int = Field(default=32, ge=1, description="sequences decoded together per text model (continuous batching)")
    threads: int | None = Field(default=None, ge=1, description="torch threads for inference; unset: half the cores, at least 1 (see inference_threads)")
    step_threads: int | None = Field(default=None, ge=1, description="threads one decoding step of many rows may share: the native kernels split its rows, 4 or more to each thread; unset: half the cores, at least 1 (see step_threads)")
    kv_cache_dtype: Literal["float32", "float16"] = Field(default="float32", description="what a text engine's KV cache holds: float32 (the same tokens as transformers' generate on the same weights, and on every path of ours, to a float's rounding) or float16 (half the bytes its attention reads: at 16-32 rows a tang-poet step takes about 0.8 of the time; keys and values rounded to float16 on every path, as llama.cpp and Ollama keep theirs by default; sampled tokens can part from a float32 run after a few dozen)")
    prefix_cache: bool = Field(default=True, description="a freed slot of a text engine keeps its sequence's keys and values, and the same API key's next prompt that starts with those tokens (a chat's next turn, the same prompt again) computes only the rest; usage.prompt_tokens_details.cached_tokens says how many it found. Never shared between keys. Off: every prompt is computed whole")
    prefill_chunk: int = Field(default=256, ge=1, le=4096, description="the most prompt tokens a text engine computes between two decoding steps (chunked prefill): a longer prompt, or a burst of them, is prefilled over several while the sequences already running go on getting a token each, as vLLM and llama.cpp's server do it; smaller bounds their wait more tightly, larger prefills a long prompt in fewer passes over the weights (at most 4096, the most one forward takes)")
    native: bool = Field(default=True, description="decode with the compiled kernels (atelier/common/native/, built by make); off: the Python paths, same results, slower")
    shipped_models: bool = Field(default=True, description="register the shipped models (tang-poet) on start")
    # Where generation runs: in this process, in engine processes (atelier/runtime/engine_process.py), or on
    # Ray Serve deployments (atelier/runtime/ray_serve.py)
    runtime: Literal["local", "process", "ray"] = Field(default="local", description="local: engines in the server process; process: each text model's engine in a process of its own (the server's GIL left to HTTP); ray: text and image models served by Ray Serve deployments (pip install -e .[ray])")
    ray_address: str | None = Field(default=None, description="a Ray cluster to join (ray://host:10001 or auto); unset: start a local one")
    ray_max_replicas: int = Field(default=2, ge=1, description="most replicas each Ray Serve deployment autoscales to")
    ray_replica_cpus: float = Field(default=0.5, ge=0, description="CPUs Ray reserves for each replica")
    ray_models_per_replica: int = Field(default=3, ge=1, description="model versions one replica holds at once (Ray Serve multiplexing, least recently used out)")

    # Moderation (atelier/api/moderation_policy.py): the word-list moderator on every generation route
    moderation: Literal["off", "flag", "block"] = Field(default="flag", description="off | flag (check, serve, audit) | block (refuse flagged inputs, cut flagged outputs)")

    # Images (generation, uploads, micro-batching, signed links)
    max_music_bars: int = Field(default=64, ge=1, description="most bars a tune may ask for (POST /api/music); a checked or rendered tune may have four times as many")
    max_render_seconds: float = Field(default=600.0, gt=0, description="longest audio rendering of a tune (WAV, Ogg), in seconds")
    max_image_n: int = Field(default=8, ge=1, description="largest n (images per request)")
    max_image_steps: int = Field(default=100, ge=1, description="largest number of denoising or style-transfer steps")
    max_image_upload_bytes: int = Field(default=4_000_000, ge=1024, description="largest uploaded image (style transfer, image → poem), in bytes")
    max_image_upload_pixels: int = Field(default=4_000_000, ge=1024, description="largest uploaded image, in pixels (decompression bombs)")
    image_tagger: str = Field(default="emoji-tagger", description="the model that turns a picture into poem keywords (image → poem)")
    image_max_batch: int = Field(default=16, ge=1, description="images sampled together per image model (micro-batching)")
    image_batch_wait_ms: float = Field(default=10.0, ge=0, description="how long a batch waits for more requests to join")
    image_threads: int | None = Field(default=None, ge=1, description="threads one batch of images may share: one for every 4 images; unset: every core (see image_threads)")
    url_ttl_s: int = Field(default=3600, ge=1, description="lifetime of signed artifact URLs (response_format=url)")

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_is_a_duration(cls, value: str) -> str:
        parse_keep_alive(value)  # ValueError names the value and the accepted forms
        return value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'atelier.db'}"

    @property
    def blobs_dir(self) -> Path:
        return self.home_dir / "blobs"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def inference_threads(settings: Settings) -> int:
    """Torch threads for the serving process: ATELIER_THREADS, or half the cores (at least 1).

    Engines run in threads of their own, and there an OpenMP team is costly: on a 2-core box
    tang-poet decodes a token in 1.1 ms with 1 torch thread and 3.4 ms with 2, and one
    emoji-diffusion image takes 0.25 s against 0.5 s (benchmarks/text_decode.py,
    benchmarks/image_throughput.py). The other half of the cores serve HTTP, the database and
    the other engines. A native step of many rows is the exception: it splits its rows between a few
    threads of its own, one hand-over a step (ATELIER_STEP_THREADS, atelier/common/native/).
    """
    return settings.threads or half_the_cores()


def step_threads(settings: Settings) -> int:
    """Threads one native decoding step may share (ATELIER_STEP_THREADS), by default half the cores.

    A step split between two threads reads all the weights in each: at 16 rows it takes 0.69 of the time
    and 1.38 times the CPU. That pays where a core would idle, and costs where it would serve HTTP: through
    the server on 2 cores, 32 streaming clients got 5,400 tok/s with two step threads against 6,400 with one
    (benchmarks/serve.py). benchmarks/text_decode.py, the engine alone, gives it every core.
    """
    return settings.step_threads or half_the_cores()


def image_threads(settings: Settings) -> int:
    """Threads one image batch may share (ATELIER_IMAGE_THREADS), by default every core: a batch of 16
    emoji-diffusion images is 20 forwards of 32 rows, each long enough that an OpenMP team pays (1.8× faster
    on two threads), while serving its requests costs the event loop next to nothing. The engine gives a
    batch one thread per IMAGES_PER_THREAD images (atelier/runtime/image_engine.py), so a lone image still
    takes one core and leaves the other to the rest."""
    return settings.image_threads or every_core()


def half_the_cores() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def every_core() -> int:
    return os.cpu_count() or 1
