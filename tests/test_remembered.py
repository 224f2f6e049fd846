"""The server remembers what every request looks up — the key it names, the version its model name resolves
to — for ATELIER_LOOKUP_CACHE_S (atelier/storage/remembered.py). Through the real server: a change made
through the server holds from the next request; one made elsewhere (another process's sessions: a replica,
the job worker, the CLI) within the cache's time; unknown secrets are never remembered."""

from __future__ import annotations

import time

import httpx
from sqlalchemy import create_engine

from conftest import ADMIN_KEY, LiveServer, make_settings
from atelier.storage.db import make_sessionmaker
from atelier.storage.keys import revoke_key
from atelier.storage.registry import get_model, set_alias

ASK = {"model": "tang-poet", "prompt": "春", "max_tokens": 1, "seed": 1}


def elsewhere(server):
    """Sessions on the server's database that are not the server's, as another process has."""
    return make_sessionmaker(create_engine(server.app.state.sessions.kw["bind"].url))


def as_key(server, secret: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def until_changed(ask, before, ttl_s: float):
    """Ask until the answer is no longer `before`: it must change within the cache's time (plus slack)."""
    changed_at, deadline = time.monotonic(), time.monotonic() + ttl_s + 5
    while (answer := ask()) == before:
        assert time.monotonic() < deadline, f"still {before!r} after the cache's time"
        time.sleep(0.05)
    return answer, time.monotonic() - changed_at


def test_a_key_revoked_elsewhere_stops_working_within_the_cache_time_and_through_the_server_at_once(tmp_path):
    with LiveServer(make_settings(tmp_path, lookup_cache_s=1.0)) as server, as_key(server, ADMIN_KEY) as admin:
        made = admin.post("/api/keys", json={"scopes": ["generate"]}).json()
        user = as_key(server, made["key"])
        assert user.post("/v1/completions", json=ASK).status_code == 200
        with elsewhere(server)() as db:  # as `atelier keys revoke` does
            revoke_key(db, key_id=made["id"])
        status, took = until_changed(lambda: user.post("/v1/completions", json=ASK).status_code, 200, 1.0)
        assert status == 401 and took < 1.0 + 5
        r = user.post("/v1/completions", json=ASK)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # Through the server's own route: at once.
        other = admin.post("/api/keys", json={"scopes": ["generate"]}).json()
        client = as_key(server, other["key"])
        assert client.post("/v1/completions", json=ASK).status_code == 200
        assert admin.delete(f"/api/keys/{other['id']}").status_code == 200
        assert client.post("/v1/completions", json=ASK).status_code == 401


def test_an_alias_moved_through_the_server_holds_at_once_and_moved_elsewhere_within_the_cache_time(tmp_path):
    with LiveServer(make_settings(tmp_path, lookup_cache_s=60.0)) as server, as_key(server, ADMIN_KEY) as admin:
        served = lambda: admin.post("/v1/completions", json=ASK).json()["model"]  # noqa: E731
        assert admin.post("/api/models/tang-poet@1/quantize", json={"method": "int8", "alias": "int8"}).status_code == 200
        assert served() == "tang-poet@1"  # remembered from here on
        assert admin.post("/api/models/tang-poet/aliases", json={"alias": "latest", "version": 2}).status_code == 200
        assert served() == "tang-poet@2"
        with elsewhere(server)() as db:  # the job worker's or another replica's change
            set_alias(db, model=get_model(db, name="tang-poet"), alias="latest", number=1)
            db.commit()
        assert served() == "tang-poet@2"  # not seen before the cache's 60 s
        assert admin.delete("/api/models/tang-poet@2", params={"force": "true"}).status_code == 200
        assert served() == "tang-poet@1"  # a deletion through the server: at once


def test_limits_changed_by_an_admin_hold_from_the_next_request_and_unknown_secrets_are_not_kept(tmp_path):
    with LiveServer(make_settings(tmp_path, lookup_cache_s=60.0)) as server, as_key(server, ADMIN_KEY) as admin:
        made = admin.post("/api/keys", json={"scopes": ["generate"]}).json()
        user = as_key(server, made["key"])
        assert user.post("/v1/completions", json=ASK).status_code == 200
        # A key without limits has its requests written behind them (the usage writer): wait until this one is
        # counted, so that the limit below meets the same count whenever the writer runs.
        for _ in range(100):
            if admin.get("/api/usage", params={"key_id": made["id"]}).json()["totals"]["requests"] == 1:
                break
            time.sleep(0.05)
        assert admin.patch(f"/api/keys/{made['id']}", json={"limits": {"rpm": 2}}).status_code == 200
        r = user.post("/v1/completions", json=ASK)
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "2"
        assert user.post("/v1/completions", json=ASK).status_code == 429
        for i in range(20):
            r = httpx.post(server.url + "/v1/completions", json=ASK, headers={"Authorization": f"Bearer atl-guess-{i:012d}"})
            assert r.status_code == 401
        assert len(server.app.state.keys.remembered) <= 2  # the admin's and the user's, never a guess
