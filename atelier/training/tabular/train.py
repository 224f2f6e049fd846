"""6. training: `train_tabular`, one estimator from a table to a version folder.

Also the helpers fusion shares: _Run (events), _int, _min_class_count, _jsonable, _save.

Without a `validation_path`, a seeded 20% of the rows is held out for the
final evaluation and the model is fitted on the other 80%.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from atelier.models.tabular import MODEL_FILE, TabularConfig, baseline_row, save, to_matrix
from atelier.common.files import atomic_write_json
from atelier.training.tabular.common import HOLDOUT_FRACTION, HYPER_KEYS, MIN_ROWS, TabularError
from atelier.training.tabular.tables import Table, load_table
from atelier.training.tabular.prepare import choose_task, column_kinds, target_values
from atelier.training.tabular.estimators import make_estimator, make_pipeline
from atelier.training.tabular.scoring import (
    PRIMARY, _fmt, cross_validate, feature_importances, folds, scores, summarize,
)
from atelier.training.tabular.search import candidates


@dataclass
class _Run:
    """Events go to on_event and into training.json's log."""

    on_event: Callable[[dict], None] | None
    log: list = field(default_factory=list)

    def emit(self, event: dict) -> None:
        event = {"time": round(time.time(), 3), **event}
        self.log.append(event)
        if self.on_event:
            self.on_event(event)

    def stage(self, stage: str, message: str, **extra) -> None:
        self.emit({"type": "stage", "stage": stage, "message": message, **extra})


def _int(hyper: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = hyper.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise TabularError(f"{key} must be an integer from {lo} to {hi}, got {v!r}", param=key)
    return v


def _check_target(hyper: dict, table: Table) -> str:
    target = hyper.get("target")
    if not isinstance(target, str) or not target:
        raise TabularError("target is required: the name of the column to predict", param="target")
    if target not in table.columns:
        raise TabularError(f"target column {target!r} is not in {table.name}; columns: {', '.join(table.columns)}",
                           param="target")
    if len(table.columns) < 2:
        raise TabularError(f"{table.name} has no feature columns besides the target {target!r}", param="training_file")
    return target


def _min_class_count(y: list, k: int, where: str) -> None:
    counts = {c: y.count(c) for c in set(y)}
    if len(counts) < 2:
        raise TabularError(f"classification needs at least 2 classes; {where} has only {sorted(counts)}",
                           param="target")
    few = {c: n for c, n in counts.items() if n < k}
    if few:
        raise TabularError(f"{k}-fold cross-validation needs at least {k} rows of each class in {where}; "
                           f"too few: {few} (lower cv or add rows)", param="cv")


def train_tabular(data_path: str | Path, hyper: dict, workdir: str | Path,
                  on_event: Callable[[dict], None] | None = None, validation_path: str | Path | None = None) -> Path:
    """Train one estimator (optionally searching its hyper-parameters) and return the version folder.

    hyper: target (required), task (regression | classification | auto), estimator (linear |
    ridge | logistic | random_forest | gradient_boosting; default random_forest), params,
    cv (folds, default 5), search ({"method", "space", "n_iter"}), seed (default 0).
    """
    from sklearn.model_selection import train_test_split

    run = _Run(on_event)
    started = time.time()
    if not isinstance(hyper, dict):
        raise TabularError("hyperparameters must be an object", param="hyperparameters")
    unknown = [k for k in hyper if k not in HYPER_KEYS]
    if unknown:
        raise TabularError(f"unknown hyperparameter {unknown[0]!r}; known: {', '.join(HYPER_KEYS)}", param=unknown[0])
    seed = _int(hyper, "seed", 0, 0, 2**32 - 1)
    k = _int(hyper, "cv", 5, 2, 20)
    params = hyper.get("params") or {}

    # 1. prepare data: read, type the columns, decide the task, hold out rows
    table = load_table(data_path, "training_file")
    target = _check_target(hyper, table)
    features = [c for c in table.columns if c != target]
    task = hyper.get("task", "auto")
    if task == "auto":
        task, why = choose_task(table, target)
        why = f"task auto → {task}: {why}"
    elif task in ("regression", "classification"):
        why = f"task {task}"
    else:
        raise TabularError(f"task {task!r} is not one of regression, classification, auto", param="task")
    # the estimator, its params and the search space are checked before any data-dependent check
    estimator_name = hyper.get("estimator", "random_forest")
    try:
        est = make_estimator(estimator_name, task, params, seed)
    except TabularError as e:
        if e.param == "estimator" and hyper.get("task", "auto") == "auto":
            raise TabularError(f"{e} ({why}; set task to override)", param="estimator") from None
        raise
    method, cands = candidates(hyper["search"], est, seed) if hyper.get("search") is not None else (None, [])
    kinds = column_kinds(table, features)
    y = target_values(table, target, task)
    X = to_matrix(table.rows, features, kinds)
    n_num = sum(v == "numeric" for v in kinds.values())
    run.stage("prepare", f"{table.name}: {len(table.rows)} rows, {n_num} numeric and {len(features) - n_num} "
                         f"categorical features; {why}", task=task, features=features, kinds=kinds)
    validation = None
    if validation_path is not None:
        validation = load_table(validation_path, "validation_file")
        missing = [c for c in [target, *features] if c not in validation.columns]
        if missing:
            raise TabularError(f"{validation.name} lacks column(s) {', '.join(missing)}", param="validation_file")
        y_test = target_values(validation, target, task, "validation_file")
        try:
            X_test = to_matrix(validation.rows, features, kinds)
        except ValueError as e:
            raise TabularError(f"{validation.name}: {e}", param="validation_file") from None
        X_train, y_train = X, y
    else:
        if len(table.rows) < MIN_ROWS:
            raise TabularError(f"{table.name} has {len(table.rows)} rows; at least {MIN_ROWS} are needed",
                               param="training_file")
        if task == "classification":
            _min_class_count(y, 2, table.name)
        idx = np.arange(len(y))
        tr, te = train_test_split(idx, test_size=HOLDOUT_FRACTION, random_state=seed,
                                  stratify=y if task == "classification" else None)
        X_train, X_test = X[tr], X[te]
        y_train, y_test = [y[i] for i in tr], [y[i] for i in te]
    if len(y_train) < 2 * k:
        raise TabularError(f"{len(y_train)} training rows are too few for {k}-fold cross-validation", param="cv")
    if task == "classification":
        _min_class_count(y_train, k, "the training rows")
    classes = sorted(set(y_train)) if task == "classification" else None
    if classes is not None and validation is not None:
        unseen = sorted(set(y_test) - set(classes), key=str)
        if unseen:
            raise TabularError(f"{validation.name} has classes the training data lacks: {unseen}",
                               param="validation_file")
    run.stage("prepare", f"{len(y_train)} rows to train on, {len(y_test)} held out"
                         f"{' (validation file)' if validation else ''}")

    # 2. build: preprocessing + estimator
    scale = estimator_name in ("linear", "ridge", "logistic")
    pipeline = make_pipeline(kinds, features, est, scale=scale)
    run.stage("build", f"{type(est).__name__} with {_fmt_params(params) or 'default parameters'}; "
                       f"numeric: impute median{', scale' if scale else ''}; categorical: one-hot",
              estimator=estimator_name)
    splits = folds(task, k, seed, X_train, y_train)
    caught: list[str] = []

    # 3. search: each candidate is cross-validated on the same folds; the best mean wins
    primary = PRIMARY[task]
    candidate_log = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if cands:
            run.stage("search", f"{method} search over {len(cands)} candidates, {k} folds each")
            for i, cand in enumerate(cands):
                folds_i = _fit_or_fail(lambda: cross_validate(pipeline.set_params(**_prefixed(params | cand)),
                                                              X_train, y_train, task, splits), "search.space")
                summ = summarize(folds_i, "")
                candidate_log.append({"index": i, "params": cand, "mean": summ[f"{primary}_mean"],
                                      "std": summ[f"{primary}_std"], "scores": summ, "folds": folds_i})
                run.emit({"type": "candidate", "index": i + 1, "of": len(cands), "params": cand,
                          "mean": summ[f"{primary}_mean"], "std": summ[f"{primary}_std"],
                          "message": f"candidate {i + 1}/{len(cands)} {_fmt_params(cand)}: {primary} "
                                     f"{summ[f'{primary}_mean']:.4g} ± {summ[f'{primary}_std']:.3g}"})
            best = max(candidate_log, key=lambda c: c["mean"])  # first of equals: the earliest candidate
            for c in candidate_log:
                c["best"] = c is best
            params = params | best["params"]
            pipeline.set_params(**_prefixed(params))
            run.stage("search", f"best: {_fmt_params(best['params'])} ({primary} {best['mean']:.4g})",
                      params=best["params"])

        # 4. cross-validate the chosen parameters (the search already did: report its folds)
        run.stage("cross-validate", f"{k}-fold cross-validation of {type(est).__name__}")
        if candidate_log:
            fold_scores = best["folds"]
            for i, f in enumerate(fold_scores):
                run.emit({"type": "cv", "fold": i + 1, "folds": k, "scores": f,
                          "message": f"fold {i + 1}/{k}: {_fmt(f)}"})
        else:
            fold_scores = _fit_or_fail(lambda: cross_validate(pipeline, X_train, y_train, task, splits, run.emit),
                                       "params")
        metrics = {"cv_folds": k, **summarize(fold_scores)}

        # 5. fit on the training rows
        run.stage("fit", f"fitting on {len(y_train)} rows")
        pipeline = _fit_or_fail(lambda: pipeline.fit(X_train, np.asarray(y_train)), "params")
        caught = sorted({str(x.message) for x in w})

    # 6. evaluate on the held-out rows
    run.stage("evaluate", f"scoring {len(y_test)} held-out rows")
    proba = pipeline.predict_proba(X_test) if task == "classification" else None
    holdout = scores(task, y_test, pipeline.predict(X_test), proba, classes)
    metrics |= {f"holdout_{n}": v for n, v in holdout.items()}
    metrics |= {"train_rows": len(y_train), "holdout_rows": len(y_test)}
    for name, value in metrics.items():
        if name.startswith(("cv_", "holdout_")) and name not in ("cv_folds", "holdout_rows"):
            run.emit({"type": "metric", "name": name, "value": value, "message": f"{name} = {value:.4g}"})

    # 7. explain: feature importances, and the reference row (and, for linear regressors, the
    #    preprocessed training mean) that per-row explanations are measured from
    importances, importance_method = feature_importances(pipeline, features, X_test, y_test, seed)
    run.stage("explain", "feature importances (" + importance_method + "): " +
              ", ".join(f"{f} {v:.3g}" for f, v in list(importances.items())[:5]),
              feature_importances=importances, method=importance_method)
    transformed_mean = None
    if task == "regression" and scale:  # linear, ridge: exact explanations need z̄
        Z = pipeline.named_steps["prepare"].transform(X_train)
        Z = Z.toarray() if hasattr(Z, "toarray") else np.asarray(Z, dtype=np.float64)
        transformed_mean = [float(v) for v in Z.mean(axis=0)]

    # 8. save
    config = TabularConfig(estimator=estimator_name, task=task, features=features, feature_kinds=kinds,
                           target=target, classes=classes, feature_importances=importances,
                           feature_importances_method=importance_method,
                           baseline=baseline_row(X_train, features, kinds), transformed_mean=transformed_mean)
    data = {"training": table.provenance(), **({"validation": validation.provenance()} if validation else {}),
            "holdout": "validation file" if validation else f"{HOLDOUT_FRACTION:.0%} of the training file, seed {seed}"}
    record = {"family": "sklearn", "estimator": estimator_name, "task": task, "params": _jsonable(params),
              "hyperparameters": _jsonable(hyper), "metrics": metrics, "folds": fold_scores,
              "candidates": _jsonable(candidate_log), "feature_importances": importances,
              "feature_importances_method": importance_method,
              "data": data, "warnings": caught}
    return _save(workdir, pipeline, config, record, run, started)


def _fit_or_fail(fn, param: str):
    # The table was validated already: a ValueError while fitting is a bad estimator parameter
    # (sklearn names it and the allowed values), e.g. "The 'max_depth' parameter ... Got -1".
    try:
        return fn()
    except (ValueError, TypeError) as e:
        raise TabularError(f"fitting failed: {e}", param=param) from None


def _prefixed(params: dict) -> dict:
    return {f"model__{k}": v for k, v in params.items()}


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _save(workdir, estimator, config: TabularConfig, record: dict, run: _Run, started: float) -> Path:
    """Build the folder beside its final place, then rename: the folder appears whole or not at all."""
    import sklearn
    import skops

    workdir = Path(workdir)
    out = workdir / "model"
    tmp = workdir / f".model.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run.stage("save", f"writing {MODEL_FILE}, config.json and training.json")
    save(tmp, estimator, config)
    record["environment"] = {"sklearn": sklearn.__version__, "skops": skops.__version__,
                             "python": platform.python_version(), "wall_seconds": round(time.time() - started, 2)}
    run.emit({"type": "done", "metrics": record["metrics"], "folder": str(out),
              "message": f"done in {time.time() - started:.1f}s: " +
                         _fmt({k: v for k, v in record["metrics"].items() if k.endswith("_mean")})})
    record["events"] = run.log
    atomic_write_json(tmp / "training.json", record)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
