"""No e-mail address, phone number, resident ID, card number or IP address sent in a request is
found anywhere in ATELIER_HOME or in the server's log (issue #10, privacy): `atelier serve` runs as a
process, is sent personal data through several routes, stopped, and its home and log are searched."""

from __future__ import annotations

import os
import signal

import httpx

from conftest import ADMIN_KEY, free_port, serve_process

PERSONAL = {"email": "alice.wong@example.com", "phone": "13812345678", "id": "11010519491231002X",
            "card": "4111111111111111", "ip": "192.168.31.77"}


def test_personal_data_is_nowhere_at_rest(tmp_path):
    home, log = tmp_path / "home", tmp_path / "server.log"
    port = free_port()
    env = os.environ | {"ATELIER_HOME": str(home), "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": ADMIN_KEY,
                        "ATELIER_RUN_WORKER": "false", "ATELIER_LOG_LEVEL": "info"}
    with open(log, "wb") as out:
        proc = serve_process(env, port, output=out)
    try:
        url = f"http://127.0.0.1:{port}"
        said = " ".join(PERSONAL.values())
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
            r = http.post("/v1/images/generations", json={"model": "emoji-gan", "prompt": f"red apple {said}",
                                                          "user": PERSONAL["email"], "extra": PERSONAL["phone"]})
            assert r.status_code in (200, 400), r.text  # an unknown OpenAI field may be refused: still not stored
            r = http.post("/v1/images/generations", json={"model": "emoji-gan", "prompt": f"red apple {said}",
                                                          "user": PERSONAL["email"], "seed": 1})
            assert r.status_code == 200, r.text
            art = http.get(f"/api/artifacts/{r.json()['data'][0]['artifact_id']}").json()
            assert PERSONAL["email"] not in str(art) and "[EMAIL]" in str(art)
            name = f"poems of {PERSONAL['email']} {PERSONAL['phone']}.txt"
            up = http.post("/v1/files", files={"file": (name, "春眠不觉晓\n\n床前明月光\n".encode())},
                           data={"purpose": "fine-tune"})
            assert up.status_code == 200 and PERSONAL["email"] not in up.json()["filename"]
            assert http.post("/api/keys", json={"name": f"for {PERSONAL['email']}", "scopes": ["read"]}).status_code == 201
            http.post("/v1/completions", json={"model": "tang-poet", "prompt": f"春 {said}", "max_tokens": 2})
            http.get("/v1/models", params={"who": PERSONAL["email"], "card": PERSONAL["card"], "from": PERSONAL["ip"]})
            redacted = http.post("/api/redact", json={"text": said}).json()["text"]
            assert all(v not in redacted for v in PERSONAL.values())
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    found = []
    for path in [log, *home.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.name}: {kind}" for kind, value in PERSONAL.items() if value.encode() in data]
    assert not found, found
    assert "/v1/models?who=" in log.read_text()  # the request was logged — with its data redacted
