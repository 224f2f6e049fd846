"""The family contract: every family declares what the server needs, and a new family is one
object in the registry — served, described and refused like the shipped ones, with no other
file touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atelier.families import FAMILIES, Family, get_family
from atelier.families.shipped import SHIPPED_DIR
from conftest import LiveServer, admin_http, make_settings

ENGINES = {"text", "image", "call", None}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_declares_the_contract(name):
    f = FAMILIES[name]
    assert isinstance(f, Family) and f.name == name and f.task and f.engine in ENGINES
    for folder in f.shipped:
        assert (SHIPPED_DIR / folder / "config.json").exists(), f"{name} ships {folder}, which is missing"
    if f.fine_tunable:
        assert f.train_formats, f"{name} is fine-tunable but trains from no upload format"
    if f.engine is not None:
        assert type(f).load is not Family.load, f"{name} is served but does not load"


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="families: chargpt"):
        get_family("nope")


class Doubler:
    """A 'model' that predicts twice its input column."""

    def __init__(self, folder: Path):
        self.factor = json.loads((folder / "config.json").read_text())["factor"]

    def predict(self, rows):
        return [self.factor * float(r["x"]) for r in rows]


class DoublerFamily(Family):
    name, task, engine = "doubler", "regression", "call"

    def describe(self, config, files):
        return {"features": ["x"], "factor": config["factor"]}

    def load(self, folder):
        return Doubler(Path(folder))


def test_a_new_family_is_one_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "doubler", DoublerFamily())
    folder = tmp_path / "doubler"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"factor": 2}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)  # what the memory budget counts
    settings = make_settings(tmp_path / "home", run_worker=False, shipped_models=False)
    with LiveServer(settings) as s, admin_http(s) as http:
        from atelier.storage.registry import register_version

        with s.app.state.sessions() as db:
            register_version(db, s.app.state.blobs, name="twice", family="doubler", task="regression", folder=folder)
        r = http.post("/api/models/twice/predict", json={"rows": [{"x": 1.5}, {"x": -2}]})
        assert r.status_code == 200, r.text
        assert r.json() == {"model": "twice@1", "predictions": [3.0, -4.0]}
        listed = http.get("/v1/models/twice").json()
        assert listed["family"] == "doubler" and listed["factor"] == 2 and listed["features"] == ["x"]
        ps = http.get("/api/ps").json()["data"]
        assert ps[0]["model"] == "twice@1" and ps[0]["engine"] == "call" and ps[0]["size_bytes"] == 64
        # The routes of other tasks refuse it by what it does, not by a list of family names.
        r = http.post("/v1/completions", json={"model": "twice", "prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
        assert "doubler" in r.json()["error"]["message"]


class SlowFamily(DoublerFamily):
    """Loads only when the test says so: a stand-in for a big model that takes seconds to load."""

    name = "slow"
    release_load = None  # a threading.Event, set by the test

    def load(self, folder):
        assert self.release_load.wait(30), "the test never let the load finish"
        return super().load(folder)


def test_a_slow_load_does_not_hold_up_models_already_loaded(tmp_path, monkeypatch):
    """While one request loads a model, requests to loaded models are served (the manager's lock is
    not held across a load; if it were, the first request below would wait forever and this fails)."""
    import threading

    slow = SlowFamily()
    slow.release_load = threading.Event()
    monkeypatch.setitem(FAMILIES, "doubler", DoublerFamily())
    monkeypatch.setitem(FAMILIES, "slow", slow)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"factor": 3}))
    settings = make_settings(tmp_path / "home", run_worker=False, shipped_models=False)
    with LiveServer(settings) as s, admin_http(s) as http:
        from atelier.storage.registry import register_version

        with s.app.state.sessions() as db:
            register_version(db, s.app.state.blobs, name="fast", family="doubler", task="regression", folder=folder)
            register_version(db, s.app.state.blobs, name="sluggish", family="slow", task="regression", folder=folder)
        assert http.post("/api/models/fast/predict", json={"rows": [{"x": 1}]}).json()["predictions"] == [3.0]
        slow_answer = {}
        waiting = threading.Thread(target=lambda: slow_answer.update(
            http.post("/api/models/sluggish/predict", json={"rows": [{"x": 2}]}, timeout=60).json()))
        waiting.start()
        while ("sluggish", 1) not in s.app.state.manager._loading:  # the slow load has begun
            threading.Event().wait(0.01)
        with admin_http(s) as other:
            assert other.post("/api/models/fast/predict", json={"rows": [{"x": 2}]}, timeout=10).json()["predictions"] \
                == [6.0]
        slow.release_load.set()
        waiting.join(30)
        assert slow_answer["predictions"] == [6.0]
