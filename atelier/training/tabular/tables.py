"""1. tables: read a training or validation file into a Table.

A table is a CSV file with a header row, or JSONL (one flat JSON object a line).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from atelier.training.tabular.common import MAX_COLUMNS, MAX_ROWS, TabularError


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
