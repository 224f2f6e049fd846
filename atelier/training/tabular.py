"""Train sklearn models on tables: prepare → build → search → cross-validate → fit → evaluate → save.

The job runner calls `train_tabular` (one estimator, optional hyper-parameter search) or
`fuse` (voting / stacking over versions already trained); both return a version folder
ready for `registry.store.register_version(family="sklearn", ...)`, holding config.json,
model.skops and training.json (metrics, every search candidate, data provenance).

    >>> folder = train_tabular("houses.csv", {"target": "price", "estimator": "ridge",
    ...                                       "search": {"method": "grid", "space": {"alpha": [0.1, 1, 10]}}},
    ...                        workdir="runs/houses", on_event=print)

A table is a CSV file with a header row, or JSONL (one flat JSON object a line). Columns
whose every value is a number are numeric (missing values → the column's median);
the rest are categorical (one-hot encoded; unseen categories at prediction time → all
zeros). Without a `validation_path`, a seeded 20% of the rows is held out for the
final evaluation and the model is fitted on the other 80%.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from atelier.models.tabular import (
    MODEL_FILE, TabularConfig, TabularModel, category_value, load, numeric_value, save, to_matrix,
)
from atelier.common.files import atomic_write_json

ESTIMATORS = ("linear", "ridge", "logistic", "random_forest", "gradient_boosting")
# which estimators serve which task (the others are refused with a message naming these)
TASK_ESTIMATORS = {"regression": ("linear", "ridge", "random_forest", "gradient_boosting"),
                   "classification": ("logistic", "random_forest", "gradient_boosting")}
HYPER_KEYS = ("target", "task", "estimator", "params", "cv", "search", "seed")
FUSE_KEYS = ("target", "cv", "seed", "weights", "members")
# params the server decides: one core per job, no console output, no state between fits
RESERVED_PARAMS = ("n_jobs", "verbose", "warm_start", "random_state")
MAX_ROWS = 200_000
MAX_COLUMNS = 500
MAX_CANDIDATES = 50
MIN_ROWS = 10
HOLDOUT_FRACTION = 0.2


class TabularError(ValueError):
    """A bad table or hyper-parameter: `param` names the field, `line` the first bad record (1-based)."""

    def __init__(self, message: str, *, param: str | None = None, line: int | None = None):
        super().__init__(message)
        self.param, self.line = param, line


# -- 1. tables -----------------------------------------------------------------------------


@dataclass
class Table:
    columns: list[str]
    rows: list[dict]  # raw values: strings (CSV), JSON scalars (JSONL); missing → None
    lines: list[int]  # the file line each row starts on, for error messages
    name: str
    sha256: str

    def provenance(self) -> dict:
        return {"file": self.name, "sha256": self.sha256, "rows": len(self.rows), "columns": len(self.columns)}


def load_table(path: str | Path, param: str = "training_file") -> Table:
    """A CSV (header row) or JSONL file → Table; TabularError names the first bad line.

    The format comes from the suffix (.csv; .jsonl / .ndjson), else from the first character.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TabularError(f"cannot read {path.name}: {e.strerror}", param=param) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise TabularError(f"{path.name} line {line}: not UTF-8 text", param=param, line=line) from None
    suffix = path.suffix.lower()
    if text.lstrip().startswith("["):
        raise TabularError(f"{path.name} is a JSON array; send JSONL instead (one flat object a line) or CSV",
                           param=param, line=1)
    if suffix in (".jsonl", ".ndjson") or (suffix != ".csv" and text.lstrip().startswith("{")):
        columns, rows, lines = _read_jsonl(text, path.name, param)
    else:
        columns, rows, lines = _read_csv(text, path.name, param)
    if not rows:
        raise TabularError(f"{path.name} has no data rows", param=param)
    if len(rows) > MAX_ROWS:
        raise TabularError(f"{path.name} has {len(rows)} rows; at most {MAX_ROWS} are allowed", param=param)
    if len(columns) > MAX_COLUMNS:
        raise TabularError(f"{path.name} has {len(columns)} columns; at most {MAX_COLUMNS} are allowed", param=param)
    return Table(columns, rows, lines, path.name, hashlib.sha256(data).hexdigest())


def _read_csv(text: str, name: str, param: str) -> tuple[list[str], list[dict], list[int]]:
    reader = csv.reader(text.splitlines(keepends=True))
    rows, lines = [], []
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise TabularError(f"{name} is empty: expected a header row of column names", param=param, line=1)
        columns = [h.strip() for h in header]
        blank = [i + 1 for i, c in enumerate(columns) if not c]
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if blank or dupes:
            what = f"empty column name(s) at position {blank}" if blank else f"duplicate column(s) {dupes}"
            raise TabularError(f"{name} line 1: {what}", param=param, line=1)
        start = reader.line_num + 1
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record or not any(v.strip() for v in record):
                continue  # blank line
            if len(record) != len(columns):
                raise TabularError(f"{name} line {line}: expected {len(columns)} fields (as in the header), "
                                   f"got {len(record)}", param=param, line=line)
            rows.append({c: (v.strip() or None) for c, v in zip(columns, record)})
            lines.append(line)
    except csv.Error as e:
        raise TabularError(f"{name} line {reader.line_num}: bad CSV: {e}", param=param, line=reader.line_num) from None
    return columns, rows, lines


def _read_jsonl(text: str, name: str, param: str) -> tuple[list[str], list[dict], list[int]]:
    columns: dict[str, None] = {}  # insertion-ordered set: columns in order of first appearance
    rows, lines = [], []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TabularError(f"{name} line {n}: not valid JSON: {e.msg}", param=param, line=n) from None
        if not isinstance(obj, dict):
            raise TabularError(f"{name} line {n}: expected a JSON object, got {type(obj).__name__}",
                               param=param, line=n)
        nested = [k for k, v in obj.items() if isinstance(v, (dict, list))]
        if nested:
            raise TabularError(f"{name} line {n}: values must be scalars; {nested[0]!r} is nested",
                               param=param, line=n)
        columns.update(dict.fromkeys(obj))
        rows.append(obj)
        lines.append(n)
    # rows missing a column hold None there (a missing value)
    rows = [{c: r.get(c) for c in columns} for r in rows]
    return list(columns), rows, lines


# -- 2. preparing: kinds, target, task -----------------------------------------------------


def column_kinds(table: Table, features: list[str]) -> dict[str, str]:
    """numeric when every present value parses as a number, else categorical."""
    kinds = {}
    for c in features:
        present = [r[c] for r in table.rows if r[c] is not None and r[c] != ""]
        if not present:
            raise TabularError(f"column {c!r} of {table.name} has no values", param="training_file")
        try:
            for v in present:
                numeric_value(v)
            kinds[c] = "numeric"
        except ValueError:
            kinds[c] = "categorical"
    return kinds


def target_values(table: Table, target: str, task: str, param: str = "training_file") -> list:
    """The target column as floats (regression) or labels (classification: ints if all integral, else strings)."""
    raw = []
    for row, line in zip(table.rows, table.lines):
        v = row[target]
        if v is None or (isinstance(v, str) and not v.strip()):
            raise TabularError(f"{table.name} line {line}: target {target!r} is missing", param=param, line=line)
        raw.append((v, line))
    if task == "regression":
        out = []
        for v, line in raw:
            try:
                out.append(numeric_value(v))
            except ValueError as e:
                raise TabularError(f"{table.name} line {line}: target {target!r} must be numeric for regression: {e}",
                                   param="target", line=line) from None
        return out
    labels = []
    for v, line in raw:
        try:
            labels.append(category_value(v))
        except ValueError as e:
            raise TabularError(f"{table.name} line {line}: target {target!r}: {e}", param=param, line=line) from None
    if all(_is_int(s) for s in labels):
        return [int(float(s)) for s in labels]
    return labels


def _is_int(s: str) -> bool:
    try:
        x = float(s)
    except ValueError:
        return False
    return math.isfinite(x) and x == int(x)


def choose_task(table: Table, target: str) -> tuple[str, str]:
    """task "auto": (task, why). Non-numeric → classification; integers with ≤ 10 values → classification."""
    values = [r[target] for r in table.rows if r[target] is not None]
    try:
        nums = [numeric_value(v) for v in values]
    except ValueError:
        return "classification", f"target {target!r} is not numeric"
    distinct = set(nums)
    if all(x == int(x) for x in nums if not math.isnan(x)) and len(distinct) <= 10:
        return "classification", f"target {target!r} holds {len(distinct)} distinct integers (≤ 10)"
    return "regression", f"target {target!r} is numeric with {len(distinct)} distinct values"


# -- 3. building ---------------------------------------------------------------------------


def make_estimator(name: str, task: str, params: dict, seed: int):
    from sklearn.ensemble import (
        GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier, RandomForestRegressor,
    )
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge

    classes = {("linear", "regression"): LinearRegression, ("ridge", "regression"): Ridge,
               ("logistic", "classification"): LogisticRegression,
               ("random_forest", "regression"): RandomForestRegressor,
               ("random_forest", "classification"): RandomForestClassifier,
               ("gradient_boosting", "regression"): GradientBoostingRegressor,
               ("gradient_boosting", "classification"): GradientBoostingClassifier}
    if name not in ESTIMATORS:
        raise TabularError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}", param="estimator")
    if (name, task) not in classes:
        raise TabularError(f"estimator {name!r} does not do {task}; for {task} choose one of "
                           f"{', '.join(TASK_ESTIMATORS[task])}", param="estimator")
    est = classes[name, task]()
    defaults = {"random_state": seed, "n_jobs": 1 if name == "random_forest" else None,
                "max_iter": 1000 if name == "logistic" else None}
    est.set_params(**{k: v for k, v in defaults.items() if v is not None and k in est.get_params()})
    check_params(est, params, "params")
    return est.set_params(**params)


def check_params(est, params: dict, param: str) -> None:
    if not isinstance(params, dict):
        raise TabularError(f"{param} must be an object of estimator parameters", param=param)
    allowed = sorted(k for k in est.get_params() if k not in RESERVED_PARAMS)
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise TabularError(f"{type(est).__name__} has no parameter {unknown[0]!r} (set by the server: "
                           f"{', '.join(RESERVED_PARAMS)}); parameters: {', '.join(allowed)}", param=param)


def make_pipeline(kinds: dict[str, str], features: list[str], estimator, scale: bool):
    """(raw matrix from to_matrix) → impute / scale numeric, one-hot categorical → estimator."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = [i for i, f in enumerate(features) if kinds[f] == "numeric"]
    categorical = [i for i, f in enumerate(features) if kinds[f] == "categorical"]
    parts = []
    if numeric:
        steps = [("impute", SimpleImputer(strategy="median"))]
        if scale:  # linear models: comparable coefficients and a well-conditioned solve
            steps.append(("scale", StandardScaler()))
        parts.append(("numeric", Pipeline(steps), numeric))
    if categorical:
        parts.append(("categorical", OneHotEncoder(handle_unknown="ignore"), categorical))
    return Pipeline([("prepare", ColumnTransformer(parts)), ("model", estimator)])


# -- 4. scoring and cross-validation -------------------------------------------------------


def scores(task: str, y_true, y_pred, proba=None, classes=None) -> dict:
    """regression: r2, mae, rmse; classification: accuracy, f1 (macro), log_loss (when proba is given)."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, mean_absolute_error, mean_squared_error, r2_score

    if task == "regression":
        out = {"r2": r2_score(y_true, y_pred), "mae": mean_absolute_error(y_true, y_pred),
               "rmse": math.sqrt(mean_squared_error(y_true, y_pred))}
    else:
        out = {"accuracy": accuracy_score(y_true, y_pred), "f1": f1_score(y_true, y_pred, average="macro")}
        if proba is not None:
            out["log_loss"] = log_loss(y_true, proba, labels=classes)
    return {k: float(v) for k, v in out.items()}


PRIMARY = {"regression": "r2", "classification": "accuracy"}  # what search maximises


def folds(task: str, k: int, seed: int, X, y):
    from sklearn.model_selection import KFold, StratifiedKFold

    splitter = StratifiedKFold if task == "classification" else KFold
    return list(splitter(n_splits=k, shuffle=True, random_state=seed).split(X, y))


def cross_validate(pipeline, X, y, task: str, splits, emit=None, fit: bool = True) -> list[dict]:
    """Fit a clone on each training fold, score it on the held-out fold; one dict of scores per fold."""
    from sklearn.base import clone

    out = []
    y = np.asarray(y)
    for i, (tr, te) in enumerate(splits):
        model = clone(pipeline).fit(X[tr], y[tr]) if fit else pipeline
        out.append(scores(task, y[te], model.predict(X[te])))
        if emit:
            emit({"type": "cv", "fold": i + 1, "folds": len(splits), "scores": out[-1],
                  "message": f"fold {i + 1}/{len(splits)}: " + _fmt(out[-1])})
    return out


def summarize(fold_scores: list[dict], prefix: str = "cv_") -> dict:
    """[{r2: ..}, ..] → {cv_r2_mean, cv_r2_std, ..}."""
    out = {}
    for name in fold_scores[0]:
        vals = np.array([f[name] for f in fold_scores])
        out[f"{prefix}{name}_mean"] = float(vals.mean())
        out[f"{prefix}{name}_std"] = float(vals.std())
    return out


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in d.items())


# -- 5. search -----------------------------------------------------------------------------


def candidates(search: dict, est, seed: int) -> tuple[str, list[dict]]:
    """{"method": "grid"|"random", "space": {param: [values]}, "n_iter": n} → (method, [params, ...])."""
    from sklearn.model_selection import ParameterGrid, ParameterSampler

    if not isinstance(search, dict):
        raise TabularError('search must be an object like {"method": "grid", "space": {"alpha": [0.1, 1]}}',
                           param="search")
    unknown = set(search) - {"method", "space", "n_iter"}
    if unknown:
        raise TabularError(f"search has no field {sorted(unknown)[0]!r}; fields: method, space, n_iter", param="search")
    method = search.get("method", "grid")
    if method not in ("grid", "random"):
        raise TabularError(f"search method {method!r} is not one of grid, random", param="search.method")
    space = search.get("space")
    if not isinstance(space, dict) or not space:
        raise TabularError("search.space must be a non-empty object {param: [values]}", param="search.space")
    for k, v in space.items():
        if not isinstance(v, list) or not v:
            raise TabularError(f"search.space[{k!r}] must be a non-empty list of values", param="search.space")
    check_params(est, space, "search.space")
    if method == "grid":
        grid = list(ParameterGrid(space))
        if len(grid) > MAX_CANDIDATES:
            raise TabularError(f"the grid has {len(grid)} candidates; at most {MAX_CANDIDATES} are allowed "
                               f"(use method random with n_iter)", param="search.space")
        return method, grid
    n_iter = search.get("n_iter", 10)
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or not 1 <= n_iter <= MAX_CANDIDATES:
        raise TabularError(f"search.n_iter must be an integer from 1 to {MAX_CANDIDATES}, got {n_iter!r}",
                           param="search.n_iter")
    size = math.prod(len(v) for v in space.values())
    with warnings.catch_warnings():  # n_iter above the grid's size: sklearn warns and returns the grid
        warnings.simplefilter("ignore", UserWarning)
        return method, list(ParameterSampler(space, n_iter=min(n_iter, size), random_state=seed))


# -- 6. training ---------------------------------------------------------------------------


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

    # 7. save
    config = TabularConfig(estimator=estimator_name, task=task, features=features, feature_kinds=kinds,
                           target=target, classes=classes)
    data = {"training": table.provenance(), **({"validation": validation.provenance()} if validation else {}),
            "holdout": "validation file" if validation else f"{HOLDOUT_FRACTION:.0%} of the training file, seed {seed}"}
    record = {"family": "sklearn", "estimator": estimator_name, "task": task, "params": _jsonable(params),
              "hyperparameters": _jsonable(hyper), "metrics": metrics, "folds": fold_scores,
              "candidates": _jsonable(candidate_log),
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


# -- 7. fusion -----------------------------------------------------------------------------


def fuse(version_folders: list[Path], method: str, data_path: str | Path, hyper: dict, workdir: str | Path,
         on_event: Callable[[dict], None] | None = None) -> Path:
    """Voting (average / soft vote) or stacking (a ridge / logistic meta-model) over trained versions.

    The members are used as fitted (frozen); `data_path` should be rows they were not
    trained on: it is where stacking's meta-model is fitted and where the ensemble and each
    member are cross-validated on the same folds. hyper: cv, seed, weights (voting),
    members (their references, for config.json), target (optional check).

    >>> fuse([Path("versions/house-prices/1"), Path("versions/house-prices/2")], "voting",
    ...      "houses-2024.csv", {"members": ["house-prices@1", "house-prices@2"]}, "runs/fused")
    """
    from sklearn.ensemble import StackingClassifier, StackingRegressor, VotingClassifier, VotingRegressor
    from sklearn.frozen import FrozenEstimator
    from sklearn.linear_model import LogisticRegression, Ridge

    run = _Run(on_event)
    started = time.time()
    hyper = hyper or {}
    unknown = [k for k in hyper if k not in FUSE_KEYS]
    if unknown:
        raise TabularError(f"unknown hyperparameter {unknown[0]!r} for fusion; known: {', '.join(FUSE_KEYS)}",
                           param=unknown[0])
    if method not in ("voting", "stacking"):
        raise TabularError(f"fusion method {method!r} is not one of voting, stacking", param="method")
    if len(version_folders) < 2:
        raise TabularError(f"fusion needs at least 2 member versions, got {len(version_folders)}", param="members")
    refs = hyper.get("members") or [str(f) for f in version_folders]
    if len(refs) != len(version_folders):
        raise TabularError(f"members names {len(refs)} versions but {len(version_folders)} folders were given",
                           param="members")
    seed = _int(hyper, "seed", 0, 0, 2**32 - 1)
    k = _int(hyper, "cv", 5, 2, 20)

    # 1. load the members: they must agree on target, task, features (same order) and classes
    run.stage("prepare", f"loading {len(version_folders)} members: {', '.join(refs)}")
    members: list[TabularModel] = []
    for ref, folder in zip(refs, version_folders):
        try:
            members.append(load(folder))
        except (OSError, ValueError) as e:
            raise TabularError(f"member {ref} cannot be loaded: {e}", param="members") from None
    first = members[0].config
    for ref, m in zip(refs[1:], members[1:]):
        c = m.config
        for what, a, b in (("task", first.task, c.task), ("target", first.target, c.target),
                           ("features", first.features, c.features),
                           ("feature kinds", first.feature_kinds, c.feature_kinds),
                           ("classes", first.classes, c.classes)):
            if a != b:
                raise TabularError(f"members must share {what}: {refs[0]} has {a!r}, {ref} has {b!r}",
                                   param="members")
    if hyper.get("target") not in (None, first.target):
        raise TabularError(f"target {hyper['target']!r} differs from the members' target {first.target!r}",
                           param="target")
    task, target, features = first.task, first.target, first.features

    # 2. the data: same columns as the members; values typed as the members expect
    table = load_table(data_path, "training_file")
    missing = [c for c in [target, *features] if c not in table.columns]
    if missing:
        raise TabularError(f"{table.name} lacks the members' column(s) {', '.join(missing)}", param="training_file")
    y = target_values(table, target, task)
    try:
        X = to_matrix(table.rows, features, first.feature_kinds)
    except ValueError as e:
        raise TabularError(f"{table.name}: {e}", param="training_file") from None
    if len(y) < 2 * k:
        raise TabularError(f"{len(y)} rows are too few for {k}-fold cross-validation", param="cv")
    if task == "classification":
        _min_class_count(y, k, table.name)
        if set(y) != set(first.classes):  # the ensemble's label encoder must match the members' columns
            raise TabularError(f"{table.name} has classes {sorted(set(y), key=str)}; the members know "
                               f"{first.classes}: every class must appear", param="training_file")
    run.stage("prepare", f"{table.name}: {len(y)} rows, target {target!r}, {len(features)} features")

    # 3. build the ensemble over frozen members (fit() leaves them as they are)
    named = [(f"m{i}", FrozenEstimator(m.estimator)) for i, m in enumerate(members)]
    weights = hyper.get("weights")
    if weights is not None and (method != "voting" or not isinstance(weights, list) or len(weights) != len(named)
                                or not all(isinstance(w, (int, float)) and w >= 0 for w in weights)):
        raise TabularError(f"weights must be a list of {len(named)} non-negative numbers, for voting only",
                           param="weights")
    splits = folds(task, k, seed, X, y)
    if method == "voting" and task == "regression":
        ensemble = VotingRegressor(named, weights=weights)
    elif method == "voting":
        ensemble = VotingClassifier(named, voting="soft", weights=weights)  # averages predict_proba
    elif task == "regression":
        ensemble = StackingRegressor(named, final_estimator=Ridge(alpha=1.0), cv=k)
    else:
        ensemble = StackingClassifier(named, final_estimator=LogisticRegression(max_iter=1000),
                                      cv=k)
    run.stage("build", f"{type(ensemble).__name__} over {len(named)} frozen members"
                       f"{f', weights {weights}' if weights else ''}", estimator=method)

    # 4. cross-validate the ensemble; members are scored on the same held-out folds
    run.stage("cross-validate", f"{k}-fold cross-validation of the {method} ensemble")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fold_scores = cross_validate(ensemble, X, y, task, splits, run.emit)
        metrics = {"cv_folds": k, **summarize(fold_scores)}
        member_scores = {}
        for ref, (_, frozen) in zip(refs, named):
            member_scores[ref] = summarize(cross_validate(frozen, X, y, task, splits, fit=False))
        primary = PRIMARY[task]
        for ref, s in member_scores.items():
            value = s[f"cv_{primary}_mean"]
            run.emit({"type": "metric", "name": f"member_cv_{primary}_mean", "member": ref, "value": value,
                      "message": f"member {ref}: {primary} {value:.4g}"})

        # 5. fit: stacking fits its meta-model on all rows; voting only records the classes
        run.stage("fit", f"fitting on {len(y)} rows")
        ensemble.fit(X, np.asarray(y))
        caught = sorted({str(x.message) for x in w})

    # 6. evaluate: the ensemble against its best member
    best_ref = max(member_scores, key=lambda r: member_scores[r][f"cv_{primary}_mean"])
    metrics["best_member_cv_" + primary + "_mean"] = member_scores[best_ref][f"cv_{primary}_mean"]
    metrics["rows"] = len(y)
    run.stage("evaluate", f"{method}: {primary} {metrics[f'cv_{primary}_mean']:.4g}; best member {best_ref}: "
                          f"{member_scores[best_ref][f'cv_{primary}_mean']:.4g}")
    for name, value in metrics.items():
        if name.startswith("cv_") and name != "cv_folds":
            run.emit({"type": "metric", "name": name, "value": value, "message": f"{name} = {value:.4g}"})

    # 7. save
    config = TabularConfig(estimator=method, task=task, features=features, feature_kinds=first.feature_kinds,
                           target=target, classes=first.classes, members=list(refs))
    record = {"family": "sklearn", "estimator": method, "task": task, "members": list(refs),
              "hyperparameters": _jsonable(hyper), "metrics": metrics, "folds": fold_scores,
              "member_metrics": member_scores, "candidates": [],
              "data": {"training": table.provenance(), "evaluation": f"{k}-fold cross-validation, seed {seed}"},
              "warnings": caught}
    return _save(workdir, ensemble, config, record, run, started)

