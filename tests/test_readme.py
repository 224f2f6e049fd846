"""The README stays true: its SDK example runs against the real server, every setting is listed."""

import os
import re
import subprocess
import sys

import pytest

from atelier.config import Settings
from conftest import ADMIN_KEY, ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def block_after(marker: str) -> str:
    m = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", README, re.S)
    assert m, f"no python block after {marker}"
    return m.group(1)


def run_example(marker: str, server, tmp_path) -> str:
    """Run the README's python block after marker against the test server; its stdout."""
    script = tmp_path / "example.py"
    script.write_text(block_after(marker).replace("http://127.0.0.1:8000", server.url), encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env=os.environ | {"ATELIER_API_KEY": ADMIN_KEY, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_sdk_example_runs(server, tmp_path):
    assert "tang-poet" in run_example("<!-- readme-test: sdk -->", server, tmp_path).splitlines()[0]


def test_fine_tune_example_runs(server, tmp_path):
    out = run_example("<!-- readme-test: fine-tune -->", server, tmp_path)
    assert out.startswith("succeeded tang-poet:ft-my-style")


def test_every_setting_is_in_the_readme_table():
    for name in Settings.model_fields:
        assert f"`ATELIER_{name.upper()}`" in README, name


def test_quick_start_commands_and_ci():
    assert "make serve" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text() and "pytest" in makefile


@pytest.mark.parametrize("page, marker", [("runtime.md", "runtime"), ("runtime.md", "engine-process"),
                                          ("runtime.md", "prefix-cache"), ("runtime.md", "prefill-chunk"),
                                          ("bring-your-own-model.md", "byo"), ("music.md", "music"),
                                          ("compression.md", "compression"), ("co-writing.md", "cowrite"),
                                          ("image-to-poem.md", "picture")])
def test_tutorial_runs(tmp_path, page, marker):
    """A docs/ tutorial's example prints what the page says it prints (each on its own server)."""
    from conftest import LiveServer, make_settings

    doc = (ROOT / "docs" / page).read_text(encoding="utf-8")
    example = re.search(rf"<!-- doc-test: {marker} -->\s*```python\n(.*?)```(.*)", doc, re.S)
    code, after = example.group(1), example.group(2)
    expected = re.search(r"It prints:\s*```text\n(.*?)```", after, re.S).group(1)
    runtime = "process" if marker == "engine-process" else "local"
    with LiveServer(make_settings(tmp_path / "home", run_worker=marker == "compression", runtime=runtime)) as server:
        script = tmp_path / "tutorial.py"
        script.write_text(code.replace("http://127.0.0.1:8000", server.url), encoding="utf-8")
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                           env=os.environ | {"ATELIER_API_KEY": ADMIN_KEY, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected


def test_scaling_tutorial_runs_against_two_replicas(tmp_path):
    """docs/scaling.md's example against two servers over one PostgreSQL and one home, as the page sets up."""
    from conftest import LiveServer, make_settings, new_postgres_database

    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- doc-test: replicas -->\s*```python\n(.*?)```", doc, re.S).group(1)
    expected = re.search(r"It prints:\s*```text\n(.*?)```", doc, re.S).group(1)
    database = new_postgres_database()
    first = make_settings(tmp_path / "home", database_url=database, run_worker=False)
    second = make_settings(tmp_path / "home", database_url=database, run_worker=False)
    with LiveServer(first) as a, LiveServer(second) as b:
        script = tmp_path / "tutorial.py"
        script.write_text(code.replace("http://127.0.0.1:8001", a.url).replace("http://127.0.0.1:8002", b.url),
                          encoding="utf-8")
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                           env=os.environ | {"ATELIER_API_KEY": ADMIN_KEY, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
