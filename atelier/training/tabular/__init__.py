"""Train sklearn models on tables: prepare → build → search → cross-validate → fit → evaluate → save.

The job runner calls `train_tabular` (one estimator, optional hyper-parameter search) or
`fuse` (voting / stacking over versions already trained); both return a version folder
ready for `registry.store.register_version(family="sklearn", ...)`, holding config.json,
model.skops and training.json (metrics, every search candidate, data provenance).

    >>> folder = train_tabular("houses.csv", {"target": "price", "estimator": "ridge",
    ...                                       "search": {"method": "grid", "space": {"alpha": [0.1, 1, 10]}}},
    ...                        workdir="runs/houses", on_event=print)

The stages, one module each; a module imports only from those above it:

       common.py      TabularError; estimator names, hyper-parameter keys, limits
    1. tables.py      Table, load_table: a CSV or JSONL file → rows
    2. prepare.py     column_kinds, target_values, choose_task (task "auto")
    3. estimators.py  make_estimator, check_params, make_pipeline
    4. scoring.py     scores, folds, cross_validate, summarize
    5. search.py      candidates (grid / random hyper-parameter search)
    6. train.py       train_tabular
    7. fusion.py      fuse (voting / stacking over trained versions)

A table is a CSV file with a header row, or JSONL (one flat JSON object a line). Columns
whose every value is a number are numeric (missing values → the column's median);
the rest are categorical (one-hot encoded; unseen categories at prediction time → all
zeros). Without a `validation_path`, a seeded 20% of the rows is held out for the
final evaluation and the model is fitted on the other 80%.
"""

from __future__ import annotations

from atelier.training.tabular.common import (
    ESTIMATORS, FUSE_KEYS, HOLDOUT_FRACTION, HYPER_KEYS, MAX_CANDIDATES, MAX_COLUMNS, MAX_ROWS, MIN_ROWS,
    RESERVED_PARAMS, TASK_ESTIMATORS, TabularError,
)
from atelier.training.tabular.tables import Table, load_table
from atelier.training.tabular.prepare import choose_task, column_kinds, target_values
from atelier.training.tabular.estimators import check_params, make_estimator, make_pipeline
from atelier.training.tabular.scoring import PRIMARY, cross_validate, folds, scores, summarize
from atelier.training.tabular.search import candidates
from atelier.training.tabular.train import train_tabular
from atelier.training.tabular.fusion import fuse

__all__ = [
    "ESTIMATORS", "FUSE_KEYS", "HOLDOUT_FRACTION", "HYPER_KEYS", "MAX_CANDIDATES", "MAX_COLUMNS", "MAX_ROWS",
    "MIN_ROWS", "PRIMARY", "RESERVED_PARAMS", "TASK_ESTIMATORS", "Table", "TabularError", "candidates",
    "check_params", "choose_task", "column_kinds", "cross_validate", "folds", "fuse", "load_table",
    "make_estimator", "make_pipeline", "scores", "summarize", "target_values", "train_tabular",
]
