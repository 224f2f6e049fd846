"""The server remembers the keys requests name for ATELIER_KEY_CACHE_S (atelier/storage/keys.py KeyCache):
what that costs in revocation, through the real server — at once through its own routes, within the
cache's time from anywhere else — and that unknown secrets are never remembered."""

from __future__ import annotations

import time

import httpx

from conftest import ADMIN_KEY, LiveServer, make_settings
from atelier.storage.keys import revoke_key

ASK = {"model": "tang-poet", "prompt": "春", "max_tokens": 1, "seed": 1}


def test_a_key_revoked_elsewhere_stops_working_within_the_cache_time(tmp_path):
    with LiveServer(make_settings(tmp_path, key_cache_s=1.0)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
        made = admin.post("/api/keys", json={"scopes": ["generate"]}).json()
        user = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {made['key']}"}, timeout=60)
        assert user.post("/v1/completions", json=ASK).status_code == 200
        with server.app.state.sessions() as db:  # as `atelier keys revoke` or another replica does
            revoke_key(db, key_id=made["id"])
        revoked_at = time.monotonic()
        early = user.post("/v1/completions", json=ASK)
        if time.monotonic() - revoked_at < 0.9:  # the server's memory of it has not run out yet
            assert early.status_code == 200
        deadline = time.monotonic() + 10
        while (r := user.post("/v1/completions", json=ASK)).status_code == 200:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.1)
        assert time.monotonic() - revoked_at < 2.5
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # Through the server's own route it is at once, however long the cache's time.
        other = admin.post("/api/keys", json={"scopes": ["generate"]}).json()
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other['key']}"}, timeout=60)
        assert client.post("/v1/completions", json=ASK).status_code == 200
        assert admin.delete(f"/api/keys/{other['id']}").status_code == 200
        assert client.post("/v1/completions", json=ASK).status_code == 401


def test_limits_changed_by_an_admin_hold_from_the_next_request_and_unknown_secrets_are_not_kept(tmp_path):
    with LiveServer(make_settings(tmp_path, key_cache_s=60.0)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
        made = admin.post("/api/keys", json={"scopes": ["generate"]}).json()
        user = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {made['key']}"}, timeout=60)
        assert user.post("/v1/completions", json=ASK).status_code == 200
        assert admin.patch(f"/api/keys/{made['id']}", json={"limits": {"rpm": 1}}).status_code == 200
        r = user.post("/v1/completions", json=ASK)
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "1"
        assert user.post("/v1/completions", json=ASK).status_code == 429
        for i in range(20):
            r = httpx.post(server.url + "/v1/completions", json=ASK, headers={"Authorization": f"Bearer atl-guess-{i:012d}"})
            assert r.status_code == 401
        remembered = server.app.state.keys._keys
        assert len(remembered) <= 2  # the admin's and the user's, never a guess
