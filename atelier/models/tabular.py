"""sklearn: classical models over tables (regression and classification), stored with skops.

Read top to bottom: config → raw rows to a feature matrix → the skops allowlist → saving →
loading → TabularModel (predict, predict_proba).

A version folder holds `config.json` (the features and their kinds, the target, the task,
the classes) and `model.skops`: a fitted sklearn Pipeline whose first step one-hot encodes
the categorical columns, so it takes raw values. It is never pickled: skops files are a
zip of JSON plus arrays, and `load` refuses a file holding any type outside TRUSTED_TYPES
(a closed list of what our own estimators are made of) before a single object is built.

    >>> model = load(Path("versions/house-prices/1"))
    >>> model.predict([{"sqft": 120, "zone": "north"}])
    [312000.5]
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from atelier.common.files import atomic_write_bytes

FAMILY = "sklearn"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.skops"
MISSING = "(missing)"  # the category a missing categorical value becomes
TASKS = ("regression", "classification")
KINDS = ("numeric", "categorical")


@dataclass
class TabularConfig:
    estimator: str  # linear | ridge | logistic | random_forest | gradient_boosting | voting | stacking
    task: str  # regression | classification
    features: list[str]  # the columns the model reads, in matrix order
    feature_kinds: dict[str, str]  # column → numeric | categorical
    target: str
    classes: list | None = None  # classification: the labels, in predict_proba column order
    members: list[str] | None = None  # voting / stacking: the fused versions' references
    # what the model relies on, per feature column, largest first (older versions: None)
    feature_importances: dict[str, float] | None = None
    feature_importances_method: str | None = None  # impurity | coefficients | permutation
    # explanations' reference row: per feature, the training mean (numeric) or most frequent value
    baseline: dict | None = None
    # linear regressors: the mean of the training rows after preprocessing, one value per column
    transformed_mean: list[float] | None = None
    family: str = FAMILY

    def to_dict(self) -> dict:
        out = asdict(self)
        out = {"family": out.pop("family"), **out}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "TabularConfig":
        if d.get("family") != FAMILY:
            raise ValueError(f"config family is {d.get('family')!r}, not {FAMILY!r}")
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if cfg.task not in TASKS:
            raise ValueError(f"config task {cfg.task!r} is not one of {', '.join(TASKS)}")
        bad = {c: k for c, k in cfg.feature_kinds.items() if k not in KINDS}
        if bad or set(cfg.feature_kinds) != set(cfg.features):
            raise ValueError(f"config feature_kinds must give numeric or categorical for each of {cfg.features}")
        if cfg.baseline is not None and set(cfg.baseline) != set(cfg.features):
            raise ValueError(f"config baseline must give a value for each of {cfg.features}")
        return cfg


# -- raw rows → matrix -------------------------------------------------------------------


def numeric_value(v) -> float:
    """A number, a numeric string, or missing (None, "") → float (missing → nan)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return math.nan
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is a boolean, not a number")
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            raise ValueError(f"{v!r} is not a number") from None
    else:
        raise ValueError(f"{v!r} is not a number")
    if math.isinf(x):
        raise ValueError(f"{v!r} is not a finite number")
    return x


def category_value(v) -> str:
    """Any scalar → its category string; missing (None, "") → MISSING."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return MISSING
    if isinstance(v, bool):  # JSON true and CSV "true" are the same category
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return str(v).strip()
    raise ValueError(f"{v!r} is not a scalar (expected a string, number, boolean or null)")


def to_matrix(rows: list[dict], features: list[str], kinds: dict[str, str]) -> np.ndarray:
    """Rows of raw values → an object array (n_rows, n_features): floats and category strings.

    Raises ValueError naming the row index (0-based) and column of the first bad value.
    """
    X = np.empty((len(rows), len(features)), dtype=object)
    for j, name in enumerate(features):
        convert = numeric_value if kinds[name] == "numeric" else category_value
        for i, row in enumerate(rows):
            try:
                X[i, j] = convert(row.get(name))
            except ValueError as e:
                raise ValueError(f"row {i}, column {name!r} ({kinds[name]}): {e}") from None
    return X


# -- explanations ------------------------------------------------------------------------


def baseline_row(X: np.ndarray, features: list[str], kinds: dict[str, str]) -> dict:
    """The reference row explanations compare against: per column, the mean (numeric) or the mode."""
    out = {}
    for j, name in enumerate(features):
        col = X[:, j]
        if kinds[name] == "numeric":
            values = np.asarray(col, dtype=np.float64)
            out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else None
        else:
            values, counts = np.unique(col.astype(str), return_counts=True)
            out[name] = str(values[np.argmax(counts)])  # ties: the first in sorted order
    return out


def column_sources(pipeline, features: list[str]) -> list[str] | None:
    """The source feature of each column the pipeline's `prepare` step outputs (one-hot columns → their
    column), or None when the pipeline is not ours (a fusion) or drops a column (all missing)."""
    steps = getattr(pipeline, "named_steps", {})
    prepare = steps.get("prepare")
    if prepare is None or not hasattr(prepare, "output_indices_"):
        return None
    sources: dict[int, str] = {}
    for name, transformer, cols in prepare.transformers_:
        if name == "remainder" or transformer == "drop":
            continue
        span = prepare.output_indices_[name]
        widths = ([len(c) for c in transformer.categories_] if hasattr(transformer, "categories_")
                  else [1] * len(cols))
        if sum(widths) != span.stop - span.start:
            return None
        at = span.start
        for col, width in zip(cols, widths):
            for k in range(at, at + width):
                sources[k] = features[col]
            at += width
    n = max(sources, default=-1) + 1
    return [sources[k] for k in range(n)] if len(sources) == n else None


def replace_one_contributions(rows: list[dict], features: list[str], baseline: dict, score) -> list[dict]:
    """Model-agnostic explanations: contribution of f = score(row) − score(row with f set to its baseline).

    score(rows) → ((n, k) array, k class names or None): one column (regression) or one per class
    (classification; the predicted class, argmax of the row's own scores, is the one explained).
    base = the score of the all-baseline row. Contributions need not add up to score − base when
    features interact.
    """
    n = len(rows)
    own, classes = score(rows)  # (n, k)
    target = own.argmax(axis=1) if classes is not None else np.zeros(n, dtype=int)
    base, _ = score([{**rows[0], **baseline}])  # (1, k)
    contributions = [{} for _ in range(n)]
    for name in features:
        changed, _ = score([{**row, name: baseline[name]} for row in rows])
        for i in range(n):
            contributions[i][name] = float(own[i, target[i]] - changed[i, target[i]])
    out = []
    for i in range(n):
        item = {"base": float(base[0, target[i]]), "contributions": contributions[i]}
        if classes is not None:
            item["class"] = classes[target[i]]
        out.append(item)
    return out


# -- the skops allowlist -----------------------------------------------------------------

# Every type that our pipelines, estimators and ensembles are made of (as "module.Class",
# the way skops names them in schema.json). A file naming anything else is refused.
TRUSTED_TYPES = frozenset({
    # containers and scalars
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int", "builtins.float",
    "builtins.bool", "builtins.NoneType", "builtins.slice",
    "numpy.ndarray", "numpy.dtype", "numpy.float64", "numpy.float32", "numpy.int64", "numpy.int32",
    "numpy.bool", "numpy.bool_", "numpy.str_", "numpy.random.mtrand.RandomState",
    # preprocessing
    "sklearn.pipeline.Pipeline", "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.impute._base.SimpleImputer", "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._encoders.OneHotEncoder", "sklearn.preprocessing._label.LabelEncoder",
    # estimators
    "sklearn.linear_model._base.LinearRegression", "sklearn.linear_model._ridge.Ridge",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.ensemble._forest.RandomForestRegressor", "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeRegressor", "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._gb.GradientBoostingRegressor", "sklearn.ensemble._gb.GradientBoostingClassifier",
    "sklearn.dummy.DummyRegressor", "sklearn.dummy.DummyClassifier",  # gradient boosting's init_
    "sklearn._loss.loss.HalfSquaredError", "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfMultinomialLoss", "sklearn._loss._loss.CyHalfSquaredError",
    "sklearn._loss._loss.CyHalfBinomialLoss", "sklearn._loss._loss.CyHalfMultinomialLoss",
    "sklearn._loss.link.IdentityLink", "sklearn._loss.link.LogitLink", "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.link.Interval",
    # fusion
    "sklearn.ensemble._voting.VotingRegressor", "sklearn.ensemble._voting.VotingClassifier",
    "sklearn.ensemble._stacking.StackingRegressor", "sklearn.ensemble._stacking.StackingClassifier",
    "sklearn.frozen._frozen.FrozenEstimator", "sklearn.utils._bunch.Bunch",
})


def file_types(data: bytes) -> set[str]:
    """Every "module.Class" named anywhere in a skops file's schema (objects, types, functions)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            schema = json.loads(z.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"not a skops file: {e}") from None
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__module__" in node:
                found.add(f"{node.get('__module__')}.{node.get('__class__')}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def check_types(data: bytes) -> None:
    untrusted = file_types(data) - TRUSTED_TYPES
    if untrusted:
        raise ValueError(f"refusing to load: the file holds types outside the allowlist: "
                         f"{', '.join(sorted(untrusted))}")


# -- saving and loading ------------------------------------------------------------------


def save(folder: Path, estimator, config: TabularConfig) -> None:
    """Write model.skops and config.json atomically; refuse to write what `load` would refuse."""
    import skops.io as sio  # slow import (it enumerates sklearn), so only where used

    data = sio.dumps(estimator)
    check_types(data)
    atomic_write_bytes(Path(folder) / MODEL_FILE, data)
    atomic_write_bytes(Path(folder) / CONFIG_FILE,
                       (json.dumps(config.to_dict(), ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def load_estimator(path: Path):
    """A skops file → the fitted estimator, only if every type in it is in TRUSTED_TYPES."""
    import skops.io as sio

    data = Path(path).read_bytes()
    check_types(data)
    # Our walk of the schema found nothing outside the allowlist; skops checks again, trusting
    # exactly the allowlisted types it would otherwise flag.
    trusted = [t for t in sio.get_untrusted_types(data=data) if t in TRUSTED_TYPES]
    return sio.loads(data, trusted=trusted)


@dataclass
class TabularModel:
    estimator: object  # a fitted Pipeline, Voting* or Stacking* taking to_matrix's output
    config: TabularConfig
    folder: Path | None = None

    def matrix(self, rows: list[dict]) -> np.ndarray:
        """Validate raw rows (every feature column present; extra columns ignored) → matrix."""
        if not isinstance(rows, list) or not rows:
            raise ValueError("rows must be a non-empty list of objects")
        missing: list[str] = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"row {i} is a {type(row).__name__}, not an object")
            missing = [f for f in self.config.features if f not in row]
            if missing:
                raise ValueError(f"row {i} is missing feature column{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(repr(m) for m in missing)}; the model reads "
                                 f"{', '.join(self.config.features)}")
        return to_matrix(rows, self.config.features, self.config.feature_kinds)

    def predict(self, rows: list[dict]) -> list:
        """Rows → one prediction each: a float (regression) or a class label (classification)."""
        y = self.estimator.predict(self.matrix(rows))
        if self.config.task == "regression":
            return [float(v) for v in y]
        return [v.item() if hasattr(v, "item") else v for v in y]

    def predict_proba(self, rows: list[dict]) -> list[dict]:
        """Rows → {class label (as a string): probability} each; classifiers only."""
        if self.config.task != "classification":
            raise ValueError(f"predict_proba needs a classifier; this model does {self.config.task}")
        P = self.estimator.predict_proba(self.matrix(rows))  # (n_rows, n_classes)
        labels = [str(c) for c in self.estimator.classes_.tolist()]
        return [{c: float(p) for c, p in zip(labels, row)} for row in P]

    @property
    def cannot_explain(self) -> str | None:
        """Why `explain` would fail (None: it works)."""
        if self.config.baseline is None:
            return ("this version was trained before explanations were recorded (its config.json has no "
                    "baseline); retrain to get explanations")
        return None

    def explain(self, rows: list[dict]) -> dict:
        """Per row, each feature's contribution to the prediction (classification: to the predicted
        class's probability), and the base they start from.

        Linear regressors are explained exactly: coef · (z − z̄) in the preprocessed space (z̄ the
        training mean), summed back over each column's one-hot columns; base = intercept + coef · z̄,
        and base + Σ contributions = the prediction. Every other model: replace_one_contributions
        with the training baseline row.
        """
        X = self.matrix(rows)
        sources = column_sources(self.estimator, self.config.features)
        model = getattr(self.estimator, "named_steps", {}).get("model")
        if (self.config.task == "regression" and self.config.transformed_mean is not None and sources
                and hasattr(model, "coef_") and len(self.config.transformed_mean) == len(sources)):
            Z = self.estimator.named_steps["prepare"].transform(X)
            Z = Z.toarray() if hasattr(Z, "toarray") else np.asarray(Z, dtype=np.float64)
            coef = np.ravel(model.coef_)
            mean = np.asarray(self.config.transformed_mean)
            parts = coef * (Z - mean)  # (n_rows, n_columns)
            base = float(np.ravel(model.intercept_)[0] + coef @ mean)
            explanations = [{"base": base, "contributions": {
                f: float(sum(parts[i, k] for k, s in enumerate(sources) if s == f)) for f in self.config.features}}
                for i in range(len(rows))]
            return {"method": "linear", "explanations": explanations}

        def score(batch: list[dict]):
            if self.config.task == "regression":
                return np.asarray(self.estimator.predict(self.matrix(batch)), dtype=np.float64)[:, None], None
            return (self.estimator.predict_proba(self.matrix(batch)),
                    [str(c) for c in self.estimator.classes_.tolist()])

        return {"method": "baseline-replacement",
                "explanations": replace_one_contributions(rows, self.config.features, self.config.baseline, score)}


def load(folder: str | Path) -> TabularModel:
    """A version folder (config.json + model.skops) → a TabularModel ready to predict."""
    folder = Path(folder)
    config = TabularConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    estimator = load_estimator(folder / MODEL_FILE)
    if not hasattr(estimator, "predict"):
        raise ValueError(f"{folder / MODEL_FILE} holds a {type(estimator).__name__}, not an estimator")
    return TabularModel(estimator, config, folder)
