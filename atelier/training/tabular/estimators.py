"""3. building: the sklearn estimator and the preprocessing pipeline in front of it.

Numeric columns: missing values → the column's median. Categorical columns: one-hot
encoded; unseen categories at prediction time → all zeros.
"""

from __future__ import annotations

from atelier.training.tabular.common import ESTIMATORS, RESERVED_PARAMS, TASK_ESTIMATORS, TabularError


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
