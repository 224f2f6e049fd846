"""The CLI as a user runs it: a subprocess against the real server or a fresh home."""

import json
import os
import re
import subprocess
import sys

from conftest import ADMIN_KEY

ATELIER = [sys.executable, "-m", "atelier.cli"]


def run(args, env_extra=None, timeout=120):
    env = os.environ | {"PYTHONIOENCODING": "utf-8", "COLUMNS": "200"} | (env_extra or {})
    return subprocess.run(ATELIER + args, capture_output=True, text=True, timeout=timeout, env=env)


def test_generate_streams_a_continuation(server):
    env = {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY}
    r = run(["generate", "床前明月光，", "--max-tokens", "12", "--seed", "7"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("床前明月光，") and len(r.stdout.strip()) > len("床前明月光，")
    again = run(["generate", "床前明月光，", "--max-tokens", "12", "--seed", "7"], env)
    assert again.stdout == r.stdout


def test_generate_reports_errors_and_missing_key(server):
    r = run(["generate", "春", "--model", "nope"], {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY})
    assert r.returncode == 1 and "model 'nope' does not exist" in r.stderr
    r = run(["generate", "春"], {"ATELIER_URL": server.url, "ATELIER_API_KEY": ""})
    assert r.returncode == 2 and "ATELIER_API_KEY" in r.stderr


def test_poem_about_a_picture(server, tmp_path):
    env = {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY}
    r = run(["poem", "--form", "wujue", "--image", "docs/apple.png", "--seed", "3"], env)
    assert r.returncode == 0, r.stderr
    assert "emoji-tagger@1 sees: 果 fruit" in r.stdout and "compliant" in r.stdout
    r = run(["poem", "--form", "wujue", "--image", str(tmp_path / "missing.png")], env)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_models_list_shows_versions_aliases_and_sizes(server):
    r = run(["models", "list"], {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY})
    assert r.returncode == 0, r.stderr
    assert "tang-poet" in r.stdout and "latest, production" in r.stdout and "MB" in r.stdout
    r = run(["models", "show", "tang-poet@1"], {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY})
    assert json.loads(r.stdout)["latest"]["version"] == 1


def test_keys_create_list_revoke(tmp_path):
    env = {"ATELIER_HOME": str(tmp_path)}
    r = run(["keys", "create", "--scope", "generate", "--scope", "train", "--name", "studio"], env)
    assert r.returncode == 0, r.stderr
    key_id, secret = r.stdout.split()[0], r.stdout.split()[-1]
    assert secret.startswith("atl-")
    listed = run(["keys", "list"], env).stdout
    assert key_id in listed and secret not in listed and "generate,train" in listed
    assert run(["keys", "revoke", key_id], env).returncode == 0
    assert run(["keys", "revoke", "key_missing"], env).returncode == 1
    assert run(["keys", "create", "--scope", "root"], env).returncode == 2


def test_train_registers_a_version_and_resumes(tmp_path):
    data = tmp_path / "poems.txt"
    data.write_text("\n\n".join(["春眠不觉晓，处处闻啼鸟。", "床前明月光，疑是地上霜。", "白日依山尽，黄河入海流。"] * 4),
                    encoding="utf-8")
    env = {"ATELIER_HOME": str(tmp_path / "home")}
    args = ["train", "--data", str(data), "--name", "mini", "--workdir", str(tmp_path / "run"), "--context", "32",
            "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--steps", "20", "--batch-size", "4",
            "--eval-every", "10", "--warmup", "2"]
    r = run(args, env)
    assert r.returncode == 0, r.stderr
    assert "registered mini@1" in r.stdout and "val loss" in r.stdout
    longer = [("30" if a == "20" else a) for a in args]  # same run, 30 steps instead of 20
    r = run(longer, env)
    assert "resumed from step 20" in r.stdout and "registered mini@2" in r.stdout
    assert run(args + ["--optimizer", "lamb"], env).returncode == 2


def test_train_image_families_and_attach_an_upscaler(tmp_path):
    from conftest import SHARED_DATA

    from atelier.storage.db import Model, make_engine, make_sessionmaker

    data = str(SHARED_DATA / "images" / "emoji64")
    env = {"ATELIER_HOME": str(tmp_path / "home")}
    r = run(["train", "--family", "ddpm", "--data", data, "--name", "mini-diffusion", "--workdir", str(tmp_path / "d"),
             "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--base-channels", "8", "--threads", "1"], env)
    assert r.returncode == 0, r.stderr
    assert "registered mini-diffusion@1" in r.stdout and "val_loss" in r.stdout
    up = ["train", "--family", "upscaler", "--data", data, "--name", "up", "--workdir", str(tmp_path / "u"),
          "--steps", "4", "--batch-size", "4", "--eval-every", "4", "--threads", "1"]
    assert run(up, env).returncode == 2  # an upscaler needs a model to join
    r = run(up + ["--attach-to", "mini-diffusion"], env)
    assert r.returncode == 0, r.stderr
    assert "registered mini-diffusion@2" in r.stdout and "val_psnr" in r.stdout
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'home' / 'atelier.db'}"))
    with sessions() as db:
        versions = db.query(Model).filter_by(name="mini-diffusion").one().versions
        one, two = sorted(versions, key=lambda v: v.number)
        assert "upscaler.safetensors" not in one.files and "upscaler.safetensors" in two.files
        assert two.files["model.safetensors"] == one.files["model.safetensors"]  # the same generator
        assert "upscaler" in two.training
        assert two.metrics == one.metrics  # the image model's metrics, not the upscaler's
    assert run(up + ["--attach-to", "nope"], env).returncode == 2
    assert run(["train", "--family", "gpt", "--data", data, "--name", "x"], env).returncode == 2


def test_serve_prints_the_admin_key_once_and_serves(tmp_path):
    import time

    import httpx

    from conftest import free_port

    port = free_port()
    env = os.environ | {"ATELIER_HOME": str(tmp_path), "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": "",
                        "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("ATELIER_ADMIN_KEY")
    proc = subprocess.Popen(ATELIER + ["serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        secret, lines = None, []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.strip().startswith("atl-"):
                secret = line.strip()
            if "Atelier on http://127.0.0.1:" in line:
                break
        assert secret, "".join(lines)
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200 and "tang-poet" in [m["id"] for m in r.json()["data"]]
        db = (tmp_path / "atelier.db").read_bytes()
        assert secret.encode() not in db  # only the hash is stored
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # A second start finds the key and prints none.
    proc = subprocess.Popen(ATELIER + ["serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out = []
        deadline = time.time() + 60
        while time.time() < deadline:
            out.append(proc.stdout.readline())
            if "Atelier on http://127.0.0.1:" in out[-1]:
                break
        assert not any(l.strip().startswith("atl-") for l in out)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_models_import_a_folder_that_is_no_model_says_what_is_expected(server, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    r = run(["models", "import", str(tmp_path), "--name", "notes"], {"ATELIER_URL": server.url,
                                                                     "ATELIER_API_KEY": ADMIN_KEY})
    assert r.returncode == 1, r.stderr
    assert "not a model Atelier can import" in r.stderr and "Traceback" not in r.stderr
    r = run(["models", "import", str(tmp_path / "missing")], {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY})
    assert r.returncode == 2 and "does not exist" in r.stderr


TUNES = """X:1
T:One
M:6/8
L:1/8
K:D
A|:"D"dfe dcB|"G"BAG "A7"FGA|"D"dfe dcB|"A7"ABc "D"d2:|

X:2
T:Two
M:4/4
L:1/8
K:G
"G"GABc dBAG|"C"E2c2 "D7"A3B|"G"G2B2 d2G2|"D7"F2A2 "G"G4|]
"""


def test_train_a_tune_model_locally_then_write_and_check_tunes(server, tmp_path):
    data = tmp_path / "tunes.abc"
    data.write_text(TUNES, encoding="utf-8")
    home = {"ATELIER_HOME": str(tmp_path / "home")}
    r = run(["train", "--family", "abc-gpt", "--data", str(data), "--name", "jigs", "--workdir", str(tmp_path / "run"),
             "--context", "64", "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--steps", "6", "--batch-size", "2",
             "--eval-every", "3", "--warmup", "1"], home)
    assert r.returncode == 0, r.stderr
    assert "registered jigs@1" in r.stdout
    training = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    assert training["family"] == "abc-gpt" and training["data"]["train_sequences"] > training["data"]["train_tunes"]

    env = {"ATELIER_URL": server.url, "ATELIER_API_KEY": ADMIN_KEY}
    out = tmp_path / "jig.abc"
    r = run(["music", "--meter", "6/8", "--key", "D", "--seed", "1", "--bars", "8", "-o", str(out),
             "--midi", str(tmp_path / "jig.mid"), "--wav", str(tmp_path / "jig.wav")], env)
    assert r.returncode == 0, r.stderr
    assert "valid: 8 bars of 6/8 in D" in r.stdout
    assert out.read_text().startswith("X:1\n") and (tmp_path / "jig.mid").read_bytes()[:4] == b"MThd"
    assert (tmp_path / "jig.wav").read_bytes()[:4] == b"RIFF"
    assert run(["music", "--check", str(out)], env).returncode == 0
    bad = tmp_path / "bad.abc"
    bad.write_text("X:1\nM:4/4\nL:1/8\nK:G\nGABc dBAG|GABc dBA|GABc dBAG|\n")
    r = run(["music", "--check", str(bad)], env)
    assert r.returncode == 1 and "bar 2 (line 5, column 11): 7 units, 8 expected" in r.stderr


def test_serve_says_the_database_is_unreachable_and_exits_3(tmp_path):
    from conftest import free_port

    port = free_port()  # nothing listens there
    for url, shown in ((f"postgresql://atelier:s3cret@127.0.0.1:{port}/atelier", f"127.0.0.1:{port}"),
                       (f"sqlite:///{tmp_path}/no/such/folder/atelier.db", "no/such/folder")):
        r = run(["serve", "--port", str(free_port())], {"ATELIER_HOME": str(tmp_path / "home"),
                                                      "ATELIER_DATABASE_URL": url}, timeout=60)
        assert r.returncode == 3, (url, r.stdout, r.stderr)
        assert "cannot reach the database" in r.stderr and shown in r.stderr
        assert "Traceback" not in r.stderr and "s3cret" not in r.stderr  # a message, not a stack; no password


def test_train_rejects_a_family_without_a_local_trainer(tmp_path):
    from atelier.cli.train import LOCAL_TRAINERS
    from atelier.families import FAMILIES

    assert set(LOCAL_TRAINERS) <= set(FAMILIES)

    r = run(["train", "--family", "nonsense", "--data", str(tmp_path), "--name", "x"],
            {"ATELIER_HOME": str(tmp_path / "home")})
    assert r.returncode == 2
    assert "nonsense" in r.stderr and all(f in r.stderr for f in LOCAL_TRAINERS)


# -- ps, models load / unload (in-process through typer's runner, against the live server) --------


def invoke(server, *args):
    from typer.testing import CliRunner

    from atelier.cli import app
    from atelier.cli.http import console

    narrow, console.width = console._width, 200  # rich would wrap table rows at 80 columns off a terminal
    try:
        return CliRunner().invoke(app, [*args, "--url", server.url, "--api-key", ADMIN_KEY])
    finally:
        console._width = narrow


def test_ps_until_in_words():
    from atelier.cli.ps import _until

    assert _until(None, 100.0) == "forever"
    assert _until(100.0 + 4 * 60 + 59.5, 100.0) == "4 minutes from now"
    assert _until(100.0 + 3600, 100.0) == "1 hour from now"
    assert _until(50.0, 100.0) == "now"


def test_ps_shows_a_loaded_model_and_when_it_goes(server):
    r = invoke(server, "models", "load", "tang-poet@1", "--keep-alive", "5m")
    assert r.exit_code == 0, r.output
    assert "loaded tang-poet@1" in r.output
    r = invoke(server, "ps")
    assert r.exit_code == 0, r.output
    for col in ("MODEL", "FAMILY", "TASK", "SIZE", "RUNTIME", "DECODING", "IN USE", "UNTIL"):
        assert col in r.output
    line = next(l for l in r.output.splitlines() if "tang-poet@1" in l)
    assert "chargpt" in line and "text-generation" in line and "MB" in line and "minutes from now" in line
    assert re.search(r"MB\s+local\s+(native|python)\s", line), line
    assert re.search(r"\d+ of \d+ loaded, [\d.]+ [kM]B of (unlimited|[\d.]+ [kM]B) memory", r.output), r.output
    r = invoke(server, "models", "load", "tang-poet@1", "--keep-alive=-1")
    assert r.exit_code == 0, r.output
    line = next(l for l in invoke(server, "ps").output.splitlines() if "tang-poet@1" in l)
    assert "forever" in line


def test_models_load_unload_and_errors(server):
    assert invoke(server, "models", "load", "tang-poet@1").exit_code == 0
    r = invoke(server, "models", "unload", "tang-poet@1")
    assert r.exit_code == 0 and "unloaded tang-poet@1" in r.output, r.output
    assert "tang-poet@1" not in invoke(server, "ps").output
    r = invoke(server, "models", "unload", "tang-poet@1")
    assert r.exit_code == 0 and "tang-poet@1 was not loaded" in r.output, r.output
    r = invoke(server, "models", "load", "nope")
    assert r.exit_code == 1 and "does not exist" in r.output, r.output
    r = invoke(server, "models", "load", "tang-poet@1", "--keep-alive", "soon")
    assert r.exit_code == 1 and "keep_alive" in r.output, r.output
