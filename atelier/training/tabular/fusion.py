"""7. fusion: `fuse` trained versions into a voting or stacking ensemble, saved like a trained version."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from atelier.models.tabular import TabularConfig, TabularModel, baseline_row, load, to_matrix
from atelier.training.tabular.common import FUSE_KEYS, TabularError
from atelier.training.tabular.tables import load_table
from atelier.training.tabular.prepare import target_values
from atelier.training.tabular.scoring import PRIMARY, cross_validate, feature_importances, folds, summarize
from atelier.training.tabular.train import _Run, _int, _jsonable, _min_class_count, _save


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

    # 7. explain: permutation importances on the fusion table (an ensemble has no importances of its
    #    own), and the reference row for per-row explanations
    importances, importance_method = feature_importances(ensemble, features, X, y, seed)
    run.stage("explain", "feature importances (" + importance_method + "): " +
              ", ".join(f"{f} {v:.3g}" for f, v in list(importances.items())[:5]),
              feature_importances=importances, method=importance_method)

    # 8. save
    config = TabularConfig(estimator=method, task=task, features=features, feature_kinds=first.feature_kinds,
                           target=target, classes=first.classes, members=list(refs),
                           feature_importances=importances, feature_importances_method=importance_method,
                           baseline=baseline_row(X, features, first.feature_kinds))
    record = {"family": "sklearn", "estimator": method, "task": task, "members": list(refs),
              "hyperparameters": _jsonable(hyper), "metrics": metrics, "folds": fold_scores,
              "member_metrics": member_scores, "candidates": [], "feature_importances": importances,
              "feature_importances_method": importance_method,
              "data": {"training": table.provenance(), "evaluation": f"{k}-fold cross-validation, seed {seed}"},
              "warnings": caught}
    return _save(workdir, ensemble, config, record, run, started)
