"""Inputs an attacker would send: each gets a clear 4xx in OpenAI's error shape, never a 500 or a leak.

Bounded and loopback only: the shared `server` fixture, small bodies, no timing or memory probes.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
import re
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
from conftest import raw_exchange


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def upload(http, name: str, data: bytes) -> httpx.Response:
    return http.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})


# -- 1. .npz decompression bombs ---------------------------------------------------------------


def npz_bomb(shape=(1, 16000, 16000, 3)) -> bytes:
    """An .npz of zeros declaring `shape` (768 MB by default), about 0.75 MB on the wire, built in 1 MB chunks."""
    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    size, chunk = int(np.prod(shape)), bytes(1 << 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, z.open("images.npy", "w", force_zip64=True) as f:
        f.write(header.getvalue())
        for start in range(0, size, len(chunk)):
            f.write(chunk[: size - start])
    return buf.getvalue()


def test_npz_bomb_is_refused_from_its_headers(http):
    bomb = npz_bomb()
    assert len(bomb) < 1_000_000
    start = time.monotonic()
    err = error_of(upload(http, "bomb.npz", bomb), 400)
    assert time.monotonic() - start < 5  # refused from the header, not after inflating
    assert err["param"] == "file" and "inflates to more than" in err["message"]


def test_npz_whose_header_lies_about_its_size_is_refused(http):
    # A header that declares a 64×64 image over data for a 32×32 one: the entry's size disagrees.
    good = io.BytesIO()
    np.save(good, np.zeros((1, 32, 32, 3), np.uint8))
    raw = good.getvalue().replace(b"(1, 32, 32, 3)", b"(1, 64, 64, 3)")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", raw)
    err = error_of(upload(http, "liar.npz", buf.getvalue()), 400)
    assert err["param"] == "file" and "zip entry holds" in err["message"]


def test_npz_with_object_arrays_or_stray_members_is_refused(http):
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 8, 8, 3), np.uint8), names=np.array([{"a": 1}, None], dtype=object))
    err = error_of(upload(http, "pickle.npz", buf.getvalue()), 400)
    assert err["param"] == "file" and "pickles" in err["message"] and "'names'" in err["message"]
    stray = io.BytesIO()
    with zipfile.ZipFile(stray, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images", b"\0" * 100_000)
    err = error_of(upload(http, "stray.npz", stray.getvalue()), 400)
    assert "is not a .npy array" in err["message"]


def test_a_fair_npz_is_still_accepted(http):
    data = npz_bytes(images=np.full((3, 8, 8, 3), 200, np.uint8), names=np.array(["a", "b", "c"]))
    r = upload(http, "fair.npz", data)
    assert r.status_code == 200, r.text
    assert r.json()["format"] == "npz" and r.json()["records"] == 3


# -- 2. signed links with odd signatures and expiries --------------------------------------------


@pytest.mark.parametrize("params", [
    {"expires": "99999999999", "sig": "é"},
    {"expires": "99999999999", "sig": "ｆ" * 64},
    {"expires": "99999999999", "sig": "0" * 64},
    {"expires": "99999999999", "sig": "0" * 10_000},
])
def test_signed_link_with_a_bad_signature_is_403(server, params):
    r = httpx.get(server.url + "/api/artifacts/x/content", params=params)
    assert error_of(r, 403)["code"] == "invalid_signature"


def test_signed_link_with_a_huge_expiry_is_a_400(server):
    r = httpx.get(server.url + "/api/artifacts/x/content", params={"expires": "9" * 40, "sig": "0" * 64})
    assert error_of(r, 400)["param"] == "expires"


# -- 3. upload names in Content-Disposition ------------------------------------------------------


def disposition_params(header: str) -> dict[str, str]:
    """`attachment; a="x"; b*=UTF-8''y` → {"a": "x", "b*": "UTF-8''y"}, refusing anything that is not a param."""
    kind, _, rest = header.partition(";")
    assert kind == "attachment"
    token = r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:;|$)'
    params, pos = {}, 0
    while pos < len(rest):
        m = re.compile(token).match(rest, pos)
        assert m, f"unparseable Content-Disposition at {rest[pos:]!r}"
        assert m.group(1) not in params, f"{m.group(1)} given twice"
        params[m.group(1)] = m.group(2)
        pos = m.end()
    return params


@pytest.mark.parametrize("name", ["雪.jsonl", 'a"; x=y.jsonl', 'b\\"\r\n.jsonl'])
def test_odd_upload_names_download_with_one_safe_filename(http, name):
    body = json.dumps({"text": f"a poem called {name!r}"}).encode()
    r = upload(http, name, body)
    assert r.status_code == 200, r.text
    got = http.get(f"/v1/files/{r.json()['id']}/content")
    assert got.status_code == 200 and got.content == body
    header = got.headers["content-disposition"]
    assert header.isascii()
    params = disposition_params(header)
    assert list(params) == ["filename", "filename*"]  # no injected x=y
    fallback = params["filename"][1:-1]
    assert fallback and not set(fallback) & set('"\\;\r\n') and fallback.isprintable()
    assert params["filename*"].startswith("UTF-8''")
    assert unquote(params["filename*"].removeprefix("UTF-8''")) == r.json()["filename"]  # the exact name


# -- 4. huge integers and malformed manifests ---------------------------------------------------


def test_huge_integers_are_400s(http):
    err = error_of(http.get("/api/audit", params={"after": "9" * 23}), 400)
    assert err["param"] == "after"
    job = "ftjob-nope"
    r = http.get(f"/v1/fine_tuning/jobs/{job}/events", params={"after": "ftevent-" + "9" * 23})
    assert r.status_code == 404  # the job is looked up first
    err = error_of(http.post("/api/models/tang-poet/aliases", json={"alias": "x", "version": 10**30}), 400)
    assert err["param"] == "version"


def test_huge_event_id_on_a_real_job_is_a_400(http, server):
    from atelier.storage.db import Job

    with server.app.state.sessions() as db:  # a finished job, so the worker leaves it alone
        db.add(Job(id="ftjob-attack-events", base_model="chargpt", family="chargpt", training_file="file-x",
                   status="cancelled"))
        db.commit()
    r = http.get("/v1/fine_tuning/jobs/ftjob-attack-events/events", params={"after": "ftevent-" + "9" * 23})
    assert error_of(r, 400)["param"] == "after"
    r = http.get("/v1/fine_tuning/jobs/ftjob-attack-events/events", params={"after": f"ftevent-{2**63 - 1}"})
    assert r.status_code == 200 and r.json()["data"] == []


def archive(manifest) -> bytes:
    """A zip with manifest.json and config.json (so a manifest listing config.json passes the name check)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("manifest.json", manifest if isinstance(manifest, str) else json.dumps(manifest))
        z.writestr("config.json", "{}")
    return buf.getvalue()


FULL = {"format": "atelier-model/1", "name": "m", "version": 1, "family": "chargpt", "task": "text-generation",
        "files": {"config.json": "0" * 64}}


@pytest.mark.parametrize("manifest", [
    [],
    "null",
    "[" * 100_000 + "]" * 100_000,
    {"format": "atelier-model/1"},
    {"format": "atelier-model/1", "files": ["config.json"]},
    FULL | {"files": ["config.json"]},
    FULL | {"files": {"config.json": 1}},
    FULL | {"training": [1]},
    FULL | {"name": ["m"]},
    {k: v for k, v in FULL.items() if k != "family"},
])
def test_malformed_archive_manifests_are_400s(http, manifest):
    r = http.post("/api/models/import", files={"file": ("m.zip", archive(manifest))}, data={"name": "attack"})
    assert error_of(r, 400)["param"] in ("file", "name")


# -- 5. unknown fields in native request bodies --------------------------------------------------


def test_unknown_fields_in_api_bodies_are_refused_by_name(http):
    before = len(http.get("/api/keys").json()["data"])
    err = error_of(http.post("/api/keys", json={"name": "x", "scope": "read"}), 400)
    assert err["param"] == "scope" and "scope" in err["message"]
    assert len(http.get("/api/keys").json()["data"]) == before  # no key was minted
    err = error_of(http.post("/api/models/tang-poet/aliases", json={"alias": "x", "version": 1, "force": True}), 400)
    assert err["param"] == "force"
    err = error_of(http.post("/api/models/tang-poet/rollback", json={"alias": "production", "to": 1}), 400)
    assert err["param"] == "to"


# -- 6-8. what anyone can see ------------------------------------------------------------------


def test_readyz_without_a_key_shows_counts_not_names(server, http):
    http.post("/api/models/tang-poet/load")
    anonymous = httpx.get(server.url + "/readyz").json()
    assert anonymous["status"] == "ready" and isinstance(anonymous["loaded_models"], int)
    assert "tang-poet" not in json.dumps(anonymous) and "models" not in anonymous
    assert anonymous["worker"] is None or set(anonymous["worker"]) == {"alive"}
    bad_key = httpx.get(server.url + "/readyz", headers={"Authorization": "Bearer nope"}).json()
    assert "models" not in bad_key
    with_key = http.get("/readyz").json()
    assert with_key["loaded_models"] == len(with_key["models"]) >= 1
    assert any(m.startswith("tang-poet@") for m in with_key["models"])


def test_no_cdn_docs_but_the_schema_is_served(server):
    assert httpx.get(server.url + "/docs").status_code == 404
    assert httpx.get(server.url + "/redoc").status_code == 404
    assert httpx.get(server.url + "/openapi.json").status_code == 200


def test_studio_sends_a_content_security_policy(server):
    for path in ("/studio/", "/studio/studio.js", "/studio/nope.js"):
        r = httpx.get(server.url + path)
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert "content-security-policy" not in httpx.get(server.url + "/healthz").headers


# -- #10 defect 8: how requests arrive --------------------------------------------------------------


def test_a_keyless_body_is_refused_before_it_is_read(server):
    """A 48 MB upload without a key is answered 401 at once, with most of it never sent."""
    head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 48000000\r\n\r\n")
    answer = raw_exchange(server, head, b"--b\r\n" + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 401") and b"missing_api_key" in answer


def test_a_stalled_body_is_cut_off(tmp_path):
    from conftest import ADMIN_KEY, LiveServer, make_settings

    with LiveServer(make_settings(tmp_path / "home", body_timeout_s=1.0, run_worker=False,
                                  shipped_models=False)) as s:
        head = (b"POST /api/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n")
        answer = raw_exchange(s, head, b'{"name": ', wait_s=15)
        assert answer.startswith(b"HTTP/1.1 408") and b"ATELIER_BODY_TIMEOUT_S" in answer
