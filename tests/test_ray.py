"""ATELIER_RUNTIME=ray: completions and images served by Ray Serve deployments on a local Ray cluster,
giving the same bytes as the in-process runtime; a replica killed mid-request fails that request
cleanly (or it is sent again) and the next one is served.

One Ray cluster for the module (`ray.init(num_cpus=2)`: about 15 s and under 1 GB here)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import ray
from ray import serve

from atelier.runtime.ray_serve import IMAGE_APP, TEXT_APP
from conftest import LiveServer, admin_http, make_settings, make_tiny_image_models


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_server(ray_cluster, tmp_path_factory):
    """The image_server's settings and tiny models (conftest.py), with the runtime on Ray Serve."""
    from atelier.storage.registry import register_version

    settings = make_settings(tmp_path_factory.mktemp("ray-home"), runtime="ray", run_worker=False,
                             max_body_bytes=200_000, max_image_n=4, max_image_steps=50, image_max_batch=16,
                             image_batch_wait_ms=50, ray_max_replicas=1, ray_replica_cpus=0.5, threads=1)
    folders = make_tiny_image_models(tmp_path_factory.mktemp("ray-image-models"))
    with LiveServer(settings) as s:
        with s.app.state.sessions() as db:
            register_version(db, s.app.state.blobs, name="tiny-diffusion", family="ddpm", task="image-generation",
                             folder=folders["tiny-diffusion"], metrics={"val_loss": 1.0})
        yield s


def served_by(app: str) -> dict:
    return serve.get_app_handle(app).stats.remote().result(timeout_s=60)


POEM = {"model": "tang-poet", "prompt": "秋风", "max_tokens": 24, "seed": 11, "temperature": 0.9}


def test_a_completion_runs_on_a_ray_serve_replica_and_matches_the_local_runtime(ray_server, server):
    with admin_http(ray_server) as on_ray, admin_http(server) as local:
        before = served_by(TEXT_APP)["requests"]
        remote = on_ray.post("/v1/completions", json=POEM)
        assert remote.status_code == 200, remote.text
        assert remote.json()["choices"][0]["text"] == local.post("/v1/completions", json=POEM).json()["choices"][0]["text"]
        stats = served_by(TEXT_APP)
        assert stats["requests"] == before + 1 and stats["pid"] != os.getpid()  # another process: a Ray replica
        ps = on_ray.get("/api/ps").json()["data"]
        assert next(m for m in ps if m["name"] == "tang-poet")["runtime"] == "ray"


def test_streaming_through_ray_serve_gives_the_same_text(ray_server):
    with admin_http(ray_server) as on_ray:
        whole = on_ray.post("/v1/completions", json=POEM).json()["choices"][0]["text"]
        pieces = []
        with on_ray.stream("POST", "/v1/completions", json=POEM | {"stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(pieces) == whole


def test_an_image_runs_on_a_ray_serve_replica_and_matches_the_local_runtime(ray_server, image_server):
    body = {"model": "tiny-diffusion", "prompt": "red apple", "n": 2, "seed": 5, "steps": 4,
            "response_format": "b64_json", "size": "32x32"}
    with admin_http(ray_server) as on_ray, admin_http(image_server) as local:
        before = served_by(IMAGE_APP)["requests"]
        remote = on_ray.post("/v1/images/generations", json=body)
        assert remote.status_code == 200, remote.text
        images = [d["b64_json"] for d in remote.json()["data"]]
        assert images == [d["b64_json"] for d in local.post("/v1/images/generations", json=body).json()["data"]]
        assert served_by(IMAGE_APP)["requests"] == before + 1


def test_a_replica_killed_mid_request_fails_it_cleanly_and_the_next_request_is_served(ray_server):
    pid = served_by(TEXT_APP)["pid"]
    long = POEM | {"max_tokens": 100, "n": 4, "stream": True, "seed": 3}
    outcome = None
    with admin_http(ray_server) as on_ray:
        with on_ray.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if outcome is None:
                    os.kill(pid, signal.SIGKILL)  # the replica dies with the request under way
                    outcome = "running"
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:  # OpenAI's error shape, mid-stream
                    assert event["error"]["type"] and event["error"]["code"], event
                    outcome = "failed cleanly"
        assert outcome in ("running", "failed cleanly")  # finished (its tokens were out) or ended with an error
        deadline = time.time() + 90
        while True:  # Serve replaces the replica; the next request is served
            r = on_ray.post("/v1/completions", json=POEM, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.json()["error"]["code"], r.text
            assert time.time() < deadline, "no replica came back"
            time.sleep(1)
        assert served_by(TEXT_APP)["pid"] != pid
