"""Shared by every stage: TabularError and the constants (estimator names, hyper-parameter keys, limits)."""

from __future__ import annotations

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
