"""4. scoring and cross-validation: metrics per task, folds, per-fold scores and their summary."""

from __future__ import annotations

import math

import numpy as np


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


def feature_importances(estimator, features: list[str], X_eval, y_eval, seed: int) -> tuple[dict, str]:
    """What the fitted model relies on, per original feature column, largest first, and how it was measured:

      impurity      the trees' own feature_importances_ (one-hot columns summed back to their column)
      coefficients  |coef_| of a linear model over scaled / one-hot columns (classes averaged, one-hot summed)
      permutation   otherwise (fusions): the drop in score when a column is shuffled in X_eval,
                    averaged over 3 seeded repeats
    """
    from sklearn.inspection import permutation_importance

    from atelier.models.tabular import column_sources

    model = getattr(estimator, "named_steps", {}).get("model")
    sources = column_sources(estimator, features)
    per_column, method = None, "permutation"
    if sources is not None and hasattr(model, "feature_importances_"):
        per_column, method = np.asarray(model.feature_importances_, dtype=np.float64), "impurity"
    elif sources is not None and hasattr(model, "coef_"):
        coef = np.abs(np.asarray(model.coef_, dtype=np.float64))
        per_column, method = (coef.mean(axis=0) if coef.ndim == 2 else coef), "coefficients"
    if per_column is not None and len(per_column) == len(sources):
        values = {f: 0.0 for f in features}
        for source, v in zip(sources, per_column):
            values[source] += float(v)
    else:
        method = "permutation"
        result = permutation_importance(estimator, X_eval, np.asarray(y_eval), n_repeats=3, random_state=seed)
        values = {f: float(v) for f, v in zip(features, result.importances_mean)}
    ranked = sorted(values.items(), key=lambda kv: -kv[1])
    return {f: round(v, 6) for f, v in ranked}, method
