"""The sklearn family: tables → training (CV, search, fusion) → skops files → predictions, and the API route."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from atelier.models import tabular
from atelier.training.tabular import TabularError, fuse, load_table, make_estimator, make_pipeline, train_tabular

ZONES = ["north", "south", "east"]


def write_csv(path: Path, header: list[str], rows) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def houses(path: Path, n: int, seed: int) -> Path:
    """price = 3·sqft − 2·age + 5·[zone = north] + noise(0.05)."""
    rng = np.random.default_rng(seed)
    sqft, age, zone = rng.normal(size=n), rng.normal(size=n), rng.choice(ZONES, n)
    price = 3 * sqft - 2 * age + 5 * (zone == "north") + rng.normal(scale=0.05, size=n)
    return write_csv(path, ["sqft", "age", "zone", "price"],
                     [(f"{a:.4f}", f"{b:.4f}", z, f"{p:.4f}") for a, b, z, p in zip(sqft, age, zone, price)])


def churn(path: Path, n: int, seed: int) -> Path:
    """JSONL; churned = "yes" when usage − tenure + (plan = basic) > 0 (plus a little noise)."""
    rng = np.random.default_rng(seed)
    usage, tenure, plan = rng.normal(size=n), rng.normal(size=n), rng.choice(["basic", "pro"], n)
    logit = 4 * (usage - tenure + (plan == "basic") - 0.5) + rng.normal(scale=0.5, size=n)
    with path.open("w") as f:
        for u, t, p, z in zip(usage, tenure, plan, logit):
            f.write(json.dumps({"usage": round(float(u), 4), "tenure": round(float(t), 4), "plan": str(p),
                                "churned": "yes" if z > 0 else "no"}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tables")
    return {"houses": houses(d / "houses.csv", 120, 0), "houses_new": houses(d / "houses-new.csv", 80, 1),
            "churn": churn(d / "churn.jsonl", 200, 2), "churn_new": churn(d / "churn-new.jsonl", 120, 3)}


@pytest.fixture(scope="module")
def linear(data, tmp_path_factory):
    events = []
    folder = train_tabular(data["houses"], {"target": "price", "task": "regression", "estimator": "linear", "cv": 4},
                           tmp_path_factory.mktemp("linear"), on_event=events.append)
    return folder, events


@pytest.fixture(scope="module")
def boosted(data, tmp_path_factory):
    return train_tabular(data["houses"], {"target": "price", "estimator": "gradient_boosting", "cv": 3, "seed": 1,
                                          "params": {"n_estimators": 30, "max_depth": 2}},
                         tmp_path_factory.mktemp("gb"))


@pytest.fixture(scope="module")
def logistic(data, tmp_path_factory):
    return train_tabular(data["churn"], {"target": "churned", "estimator": "logistic", "cv": 3},
                         tmp_path_factory.mktemp("logistic"))


@pytest.fixture(scope="module")
def forest(data, tmp_path_factory):
    return train_tabular(data["churn"], {"target": "churned", "estimator": "random_forest", "cv": 3,
                                         "params": {"n_estimators": 25, "max_depth": 5}},
                         tmp_path_factory.mktemp("forest"))


def training(folder: Path) -> dict:
    return json.loads((folder / "training.json").read_text())


# -- training -------------------------------------------------------------------------------


def test_linear_recovers_coefficients(linear, data):
    folder, _ = linear
    model = tabular.load(folder)
    base = {"sqft": 0.0, "age": 0.0, "zone": "south"}
    p0, p_sqft, p_age, p_north = model.predict([base, base | {"sqft": 1.0}, base | {"age": 1.0},
                                                base | {"zone": "north"}])
    assert p_sqft - p0 == pytest.approx(3, abs=0.05)
    assert p_age - p0 == pytest.approx(-2, abs=0.05)
    assert p_north - p0 == pytest.approx(5, abs=0.05)
    t = training(folder)
    assert t["metrics"]["holdout_r2"] > 0.99 and t["metrics"]["cv_r2_mean"] > 0.99
    assert t["metrics"]["train_rows"] == 96 and t["metrics"]["holdout_rows"] == 24
    assert t["data"]["training"] == {"file": "houses.csv", "rows": 120, "columns": 4,
                                     "sha256": hashlib.sha256(data["houses"].read_bytes()).hexdigest()}
    config = json.loads((folder / "config.json").read_text())
    explain_keys = ("feature_importances", "feature_importances_method", "baseline", "transformed_mean")
    assert {k: v for k, v in config.items() if k not in explain_keys} == {
        "family": "sklearn", "estimator": "linear", "task": "regression", "features": ["sqft", "age", "zone"],
        "target": "price", "feature_kinds": {"sqft": "numeric", "age": "numeric", "zone": "categorical"}}
    assert config["feature_importances_method"] == "coefficients" and set(config["baseline"]) == {"sqft", "age", "zone"}
    assert list(config["feature_importances"]) == ["zone", "sqft", "age"]  # |5| (one-hot summed), |3·σ|, |2·σ|
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.skops", "training.json"]


def test_cv_reports_k_folds_and_every_stage(linear):
    folder, events = linear
    cv = [e for e in events if e["type"] == "cv"]
    assert [e["fold"] for e in cv] == [1, 2, 3, 4] and all(e["folds"] == 4 for e in cv)
    assert all(set(e["scores"]) == {"r2", "mae", "rmse"} for e in cv)
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert list(dict.fromkeys(stages)) == ["prepare", "build", "cross-validate", "fit", "evaluate", "explain",
                                          "save"]
    assert events[-1]["type"] == "done" and all(e["message"] for e in events)
    assert {e["name"] for e in events if e["type"] == "metric"} >= {"cv_r2_mean", "holdout_r2", "holdout_rmse"}
    t = training(folder)
    assert t["metrics"]["cv_folds"] == 4 and len(t["folds"]) == 4
    assert t["metrics"]["cv_r2_mean"] == pytest.approx(np.mean([f["r2"] for f in t["folds"]]))


def test_classifiers_learn_the_rule(logistic, forest, data):
    for folder, floor in ((logistic, 0.85), (forest, 0.8)):
        m = training(folder)["metrics"]
        assert m["holdout_accuracy"] > floor and m["cv_accuracy_mean"] > floor
        assert {"holdout_f1", "holdout_log_loss", "cv_f1_mean"} <= set(m)
    model = tabular.load(logistic)
    assert model.config.classes == ["no", "yes"] and model.config.task == "classification"
    rows = [{"usage": 2.0, "tenure": -1.0, "plan": "basic"}, {"usage": -2.0, "tenure": 1.0, "plan": "pro"}]
    assert model.predict(rows) == ["yes", "no"]
    proba = model.predict_proba(rows)
    assert [set(p) for p in proba] == [{"no", "yes"}] * 2
    assert all(sum(p.values()) == pytest.approx(1) for p in proba) and proba[0]["yes"] > 0.9


def test_validation_file_is_the_holdout(data, tmp_path):
    folder = train_tabular(data["houses"], {"target": "price", "estimator": "linear", "cv": 3}, tmp_path,
                           validation_path=data["houses_new"])
    t = training(folder)
    assert (t["metrics"]["train_rows"], t["metrics"]["holdout_rows"]) == (120, 80)
    assert t["data"]["validation"]["file"] == "houses-new.csv" and t["metrics"]["holdout_r2"] > 0.99


def test_task_auto_is_stated(data, tmp_path):
    events = []
    folder = train_tabular(data["churn"], {"target": "churned", "estimator": "logistic", "cv": 2}, tmp_path,
                           on_event=events.append)
    assert json.loads((folder / "config.json").read_text())["task"] == "classification"
    assert "task auto → classification" in events[0]["message"]


def test_grid_search_reports_each_candidate(data, tmp_path):
    events = []
    folder = train_tabular(data["houses"], {"target": "price", "estimator": "ridge", "cv": 3,
                                            "search": {"method": "grid", "space": {"alpha": [0.01, 1.0, 300.0]}}},
                           tmp_path, on_event=events.append)
    cands = [e for e in events if e["type"] == "candidate"]
    assert [c["params"] for c in cands] == [{"alpha": 0.01}, {"alpha": 1.0}, {"alpha": 300.0}]
    t = training(folder)
    assert [c["params"] for c in t["candidates"]] == [c["params"] for c in cands]
    assert all(len(c["folds"]) == 3 and "std" in c for c in t["candidates"])
    best = [c for c in t["candidates"] if c["best"]]
    assert len(best) == 1 and best[0]["mean"] == max(c["mean"] for c in t["candidates"])
    assert best[0]["params"] == {"alpha": 0.01} and t["params"] == {"alpha": 0.01}
    assert t["candidates"][2]["mean"] < t["candidates"][0]["mean"]  # heavy shrinkage hurts


def test_random_search_samples_n_iter_candidates(data, tmp_path):
    folder = train_tabular(data["houses"], {"target": "price", "estimator": "gradient_boosting", "cv": 2, "seed": 3,
                                            "search": {"method": "random", "n_iter": 3,
                                                       "space": {"n_estimators": [5, 10], "max_depth": [1, 2, 3]}}},
                           tmp_path)
    cands = training(folder)["candidates"]
    assert len(cands) == 3 and len({json.dumps(c["params"], sort_keys=True) for c in cands}) == 3
    assert all(set(c["params"]) == {"n_estimators", "max_depth"} for c in cands)


# -- fusion ---------------------------------------------------------------------------------


def test_fusion_regression(linear, boosted, data, tmp_path):
    members = [linear[0], boosted]
    refs = ["house-prices@1", "house-prices@2"]
    for method in ("voting", "stacking"):
        folder = fuse(members, method, data["houses_new"], {"cv": 3, "members": refs}, tmp_path / method)
        t = training(folder)
        member_r2 = [t["member_metrics"][r]["cv_r2_mean"] for r in refs]
        fused_r2 = t["metrics"]["cv_r2_mean"]
        assert len(t["folds"]) == 3
        if method == "voting":  # the average of a near-perfect and a rougher model: between the two
            assert min(member_r2) - 1e-9 <= fused_r2 <= max(member_r2) + 1e-9
        else:  # the meta-model learns to lean on the linear member
            assert fused_r2 >= max(member_r2) - 0.005
        config = json.loads((folder / "config.json").read_text())
        assert config["estimator"] == method and config["members"] == refs
        pred = tabular.load(folder).predict([{"sqft": 1.0, "age": 0.0, "zone": "north"}])
        assert pred[0] == pytest.approx(8, abs=1.0 if method == "voting" else 0.3)  # the truth is 8


def test_fusion_classification_voting(logistic, forest, data, tmp_path):
    folder = fuse([logistic, forest], "voting", data["churn_new"], {"cv": 3, "weights": [2, 1]}, tmp_path)
    t = training(folder)
    accs = [m["cv_accuracy_mean"] for m in t["member_metrics"].values()]
    assert t["metrics"]["cv_accuracy_mean"] >= min(accs) - 0.02
    proba = tabular.load(folder).predict_proba([{"usage": 2.0, "tenure": -1.0, "plan": "basic"}])
    assert proba[0]["yes"] > 0.8


def test_fusion_refuses_mismatched_members(linear, logistic, data, tmp_path):
    with pytest.raises(TabularError, match="members must share task") as e:
        fuse([linear[0], logistic], "voting", data["houses_new"], {}, tmp_path)
    assert e.value.param == "members"
    with pytest.raises(TabularError, match="method") as e:
        fuse([linear[0], linear[0]], "bagging", data["houses_new"], {}, tmp_path)


# -- skops: round trip and the allowlist ----------------------------------------------------


def test_skops_round_trip_gives_identical_predictions(data, tmp_path):
    table = load_table(data["churn"])
    features, kinds = ["usage", "tenure", "plan"], {"usage": "numeric", "tenure": "numeric", "plan": "categorical"}
    X = tabular.to_matrix(table.rows, features, kinds)
    y = np.array([r["churned"] for r in table.rows])
    pipe = make_pipeline(kinds, features, make_estimator("random_forest", "classification", {"n_estimators": 10}, 0),
                         scale=False).fit(X, y)
    config = tabular.TabularConfig("random_forest", "classification", features, kinds, "churned", ["no", "yes"])
    tabular.save(tmp_path, pipe, config)
    model = tabular.load(tmp_path)
    assert model.predict(table.rows) == pipe.predict(X).tolist()
    assert np.array_equal(np.array([[p["no"], p["yes"]] for p in model.predict_proba(table.rows)]),
                          pipe.predict_proba(X))


class Sneaky:  # a type of nobody's allowlist
    def fit(self, X, y):
        return self

    def predict(self, X):
        return X


@pytest.mark.parametrize("kind", ["function_transformer", "custom_class"])
def test_load_refuses_untrusted_types(kind, linear, tmp_path):
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    if kind == "function_transformer":  # sklearn's own, trusted by skops' defaults, but not ours
        evil, names = Pipeline([("f", FunctionTransformer(func=os.system))]), ["FunctionTransformer", "system"]
    else:
        evil, names = Pipeline([("s", Sneaky())]), ["test_tabular.Sneaky"]
    (tmp_path / "model.skops").write_bytes(sio.dumps(evil))
    (tmp_path / "config.json").write_text((linear[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="refusing to load") as e:
        tabular.load(tmp_path)
    assert all(n in str(e.value) for n in names)
    with pytest.raises(ValueError, match="refusing"):  # and we never write such a file
        tabular.save(tmp_path / "out", evil, tabular.load(linear[0]).config)


def test_every_estimator_type_is_allowlisted(data, tmp_path):
    """A tiny fit of each estimator and task: every type skops writes is in TRUSTED_TYPES."""
    import skops.io as sio

    rows = load_table(data["churn"]).rows[:60]
    features, kinds = ["usage", "plan"], {"usage": "numeric", "plan": "categorical"}
    X = tabular.to_matrix(rows, features, kinds)
    y_cls = np.array([r["churned"] for r in rows])
    y_reg = np.array([float(r["tenure"]) for r in rows])
    y_multi = np.array(["a", "b", "c"] * 20)
    for name, task in [("linear", "regression"), ("ridge", "regression"), ("logistic", "classification"),
                       ("random_forest", "regression"), ("random_forest", "classification"),
                       ("gradient_boosting", "regression"), ("gradient_boosting", "classification")]:
        params = {"n_estimators": 3} if name in ("random_forest", "gradient_boosting") else {}
        for y in ((y_reg,) if task == "regression" else (y_cls, y_multi)):
            pipe = make_pipeline(kinds, features, make_estimator(name, task, params, 0), scale=True).fit(X, y)
            assert tabular.file_types(sio.dumps(pipe)) <= tabular.TRUSTED_TYPES, (name, task)


# -- bad inputs -----------------------------------------------------------------------------


SMALL = "a,price\n" + "".join(f"{i},{3 * i}\n" for i in range(12))  # 12 distinct numbers: auto → regression


@pytest.mark.parametrize("content, hyper, param, message, line", [
    ("a,b\n1,2\n", {"target": "price"}, "target", "target column 'price' is not in", None),
    ("a,b\n1,2\n", {}, "target", "target is required", None),
    (SMALL, {"target": "price", "estimator": "svm"}, "estimator", "unknown estimator 'svm'", None),
    (SMALL, {"target": "price", "task": "regression", "estimator": "logistic"}, "estimator",
     "does not do regression", None),
    (SMALL + "1,cheap\n", {"target": "price", "task": "regression"}, "target",
     "line 14: target 'price' must be numeric", 14),
    ("a,price\n", {"target": "price"}, "training_file", "no data rows", None),
    ("", {"target": "price"}, "training_file", "is empty", 1),
    ("a,price\n1,2\n1,2,3\n", {"target": "price"}, "training_file", "line 3: expected 2 fields", 3),
    ("a,price\n" + "1,\n", {"target": "price"}, "training_file", "line 2: target 'price' is missing", 2),
    (SMALL, {"target": "price", "estimator": "ridge", "params": {"alpah": 1}}, "params",
     "no parameter 'alpah'", None),
    (SMALL, {"target": "price", "estimator": "ridge", "params": {"n_jobs": 8}}, "params",
     "no parameter 'n_jobs'", None),
    (SMALL, {"target": "price", "epochs": 3}, "epochs", "unknown hyperparameter", None),
    (SMALL, {"target": "price", "cv": 1}, "cv", "cv must be an integer from 2", None),
    (SMALL, {"target": "price", "estimator": "ridge", "search": {"method": "bayes", "space": {}}},
     "search.method", "not one of grid, random", None),
])
def test_bad_inputs_are_named(content, hyper, param, message, line, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(TabularError, match=message) as e:
        train_tabular(path, hyper, tmp_path / "work")
    assert (e.value.param, e.value.line) == (param, line)
    assert not (tmp_path / "work" / "model").exists()


def test_bad_jsonl_line_and_bad_param_value(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1, "y": 2}\n\n{"a": 2, "y": 3\n')
    with pytest.raises(TabularError, match="line 3: not valid JSON") as e:
        load_table(path)
    assert e.value.line == 3
    path.write_text('[{"a": 1, "y": 2}]')
    with pytest.raises(TabularError, match="JSON array"):
        load_table(path)
    path.write_text('{"a": 1, "y": 2}\n{"a": [1], "y": 3}\n')
    with pytest.raises(TabularError, match="line 2: values must be scalars"):
        load_table(path)
    csv_path = write_csv(tmp_path / "t.csv", ["a", "y"], [(i, i * 2) for i in range(20)])
    with pytest.raises(TabularError, match="max_depth") as e:
        train_tabular(csv_path, {"target": "y", "estimator": "random_forest", "params": {"max_depth": -1}}, tmp_path)
    assert e.value.param == "params"


def test_predict_validates_rows(linear):
    model = tabular.load(linear[0])
    with pytest.raises(ValueError, match="row 1 is missing feature columns 'age', 'zone'"):
        model.predict([{"sqft": 1, "age": 2, "zone": "east"}, {"sqft": 1}])
    with pytest.raises(ValueError, match="row 0, column 'sqft' \\(numeric\\): 'big' is not a number"):
        model.predict([{"sqft": "big", "age": 2, "zone": "east"}])
    # extra columns are ignored, missing values imputed, unseen categories one-hot to zeros
    assert len(model.predict([{"sqft": None, "age": 2, "zone": "west", "price": 1}])) == 1


# -- the API --------------------------------------------------------------------------------


def test_predict_route(server, http, linear, logistic):
    from atelier.storage.registry import register_version

    with server.app.state.sessions() as db:
        v = register_version(db, server.app.state.blobs, name="house-prices", family="sklearn", task="regression",
                             folder=linear[0], metrics=training(linear[0])["metrics"])
        ref = f"house-prices@{v.number}"
        register_version(db, server.app.state.blobs, name="churn", family="sklearn", task="classification",
                         folder=logistic)
    rows = [{"sqft": 0.0, "age": 0.0, "zone": "south"}, {"sqft": 1.0, "age": 1.0, "zone": "north"}]
    r = http.post("/api/models/house-prices/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == ref and "probabilities" not in body
    assert body["predictions"] == tabular.load(linear[0]).predict(rows)
    assert body["predictions"][1] - body["predictions"][0] == pytest.approx(6, abs=0.1)

    r = http.post("/api/models/churn:latest/predict", json={"rows": [{"usage": 2.0, "tenure": -1.0, "plan": "basic"}]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == ["yes"] and r.json()["probabilities"][0]["yes"] > 0.9

    def error(resp, status, param, code=None):
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
        assert code is None or err["code"] == code
        return err["message"]

    msg = error(http.post("/api/models/house-prices/predict", json={"rows": [{"sqft": 1.0}]}), 400, "rows")
    assert "missing feature columns 'age', 'zone'" in msg
    msg = error(http.post("/api/models/tang-poet/predict", json={"rows": rows}), 400, "model", "model_not_supported")
    assert "chargpt" in msg
    error(http.post("/api/models/no-such-model/predict", json={"rows": rows}), 404, "model", "model_not_found")
    error(http.post("/api/models/house-prices/predict", json={"rows": [{}] * 1001}), 400, "rows")
    error(http.post("/api/models/house-prices/predict", json={"rows": []}), 400, "rows")


# -- importances and explanations ----------------------------------------------------------


def test_importances_are_recorded(linear, forest, boosted, data, tmp_path):
    assert training(forest)["feature_importances_method"] == "impurity"
    assert list(training(forest)["feature_importances"])[-1] == "plan"  # usage and tenure carry the rule
    assert sum(training(boosted)["feature_importances"].values()) == pytest.approx(1, abs=1e-4)
    folder = fuse([linear[0], boosted], "voting", data["houses_new"], {"cv": 2}, tmp_path)
    t, config = training(folder), json.loads((folder / "config.json").read_text())
    assert t["feature_importances_method"] == "permutation" and config["feature_importances"] == t["feature_importances"]
    assert list(t["feature_importances"]) == ["sqft", "zone", "age"]  # variance explained: 9, 5.6, 4
    assert set(config["baseline"]) == {"sqft", "age", "zone"}


def test_explain_linear_is_exact_and_others_replace_with_the_baseline(linear, logistic):
    model = tabular.load(linear[0])
    rows = [{"sqft": 1.0, "age": -1.0, "zone": "north"}, {"sqft": 0.0, "age": 0.5, "zone": "east"}]
    out = model.explain(rows)
    assert out["method"] == "linear"
    for row, e, pred in zip(rows, out["explanations"], model.predict(rows)):
        assert e["base"] + sum(e["contributions"].values()) == pytest.approx(pred, abs=1e-6)
        assert e["contributions"]["sqft"] == pytest.approx(3 * (row["sqft"] - model.config.baseline["sqft"]),
                                                           abs=0.05)
    clf = tabular.load(logistic)
    row = {"usage": 2.0, "tenure": -1.0, "plan": "basic"}
    out = clf.explain([row, dict(clf.config.baseline)])
    assert out["method"] == "baseline-replacement"
    first, at_baseline = out["explanations"]
    assert first["class"] == "yes" and 0 <= first["base"] <= 1
    assert first["contributions"]["usage"] > 0 and first["contributions"]["tenure"] > 0  # both push toward "yes"
    assert all(v == 0 for v in at_baseline["contributions"].values())


def test_importances_and_explain_through_the_api(server, http, data, linear, tmp_path):
    import time

    from atelier.storage.registry import register_version

    # trained through the API: a job on an uploaded table
    f = http.post("/v1/files", files={"file": ("houses.csv", data["houses"].read_bytes())},
                  data={"purpose": "fine-tune"}).json()
    job = http.post("/v1/fine_tuning/jobs", json={
        "model": "sklearn", "training_file": f["id"], "suffix": "house-explained",
        "hyperparameters": {"target": "price", "estimator": "gradient_boosting", "cv": 2,
                            "params": {"n_estimators": 20, "max_depth": 2}}}).json()
    deadline = time.time() + 120
    while (job := http.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.time() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    listed = http.get("/v1/models/house-explained").json()
    assert listed["feature_importances_method"] == "impurity" and listed["explainable"] is True
    assert set(listed["feature_importances"]) == {"sqft", "age", "zone"}
    values = list(listed["feature_importances"].values())
    assert values == sorted(values, reverse=True)

    rows = [{"sqft": 1.0, "age": -1.0, "zone": "north"}, {"sqft": -1.0, "age": 0.0, "zone": "east"}]
    plain = http.post("/api/models/house-explained/predict", json={"rows": rows}).json()
    assert set(plain) == {"model", "predictions"}  # without explain: the response of before
    r = http.post("/api/models/house-explained/predict", json={"rows": rows, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"] == plain["predictions"] and body["explain_method"] == "baseline-replacement"
    assert [set(e["contributions"]) for e in body["explanations"]] == [{"sqft", "age", "zone"}] * 2
    assert body["explanations"][0]["contributions"]["sqft"] > 0  # price rises with sqft

    # a version trained before baselines were recorded: served as before, explain refused by name
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.skops").write_bytes((linear[0] / "model.skops").read_bytes())
    config = json.loads((linear[0] / "config.json").read_text())
    for key in ("feature_importances", "feature_importances_method", "baseline", "transformed_mean"):
        config.pop(key)
    (old / "config.json").write_text(json.dumps(config))
    with server.app.state.sessions() as db:
        register_version(db, server.app.state.blobs, name="house-old", family="sklearn", task="regression", folder=old)
    r = http.post("/api/models/house-old/predict", json={"rows": rows})
    assert r.status_code == 200 and set(r.json()) == {"model", "predictions"}
    assert http.get("/v1/models/house-old").json()["explainable"] is False
    r = http.post("/api/models/house-old/predict", json={"rows": rows, "explain": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "explain", r.text
    assert "retrain" in r.json()["error"]["message"]
    r = http.post("/api/models/house-old/predict", json={"inputs": {"x": [[1.0]]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "inputs", r.text
