"""5. search: the hyper-parameter candidates (grid or random) of a search spec.

train_tabular cross-validates each candidate on the same folds; the best mean wins.
"""

from __future__ import annotations

import math
import warnings

from atelier.training.tabular.common import MAX_CANDIDATES, TabularError
from atelier.training.tabular.estimators import check_params


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
