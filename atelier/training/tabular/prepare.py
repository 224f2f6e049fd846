"""2. preparing: the kind of each feature column, the target's values, the task.

Columns whose every value is a number are numeric; the rest are categorical.
"""

from __future__ import annotations

import math

from atelier.models.tabular import category_value, numeric_value
from atelier.training.tabular.common import TabularError
from atelier.training.tabular.tables import Table


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
