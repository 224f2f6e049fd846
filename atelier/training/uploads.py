"""Validating uploaded training files before anything is stored.

Accepted, by file name:
- `.jsonl`: one JSON object per line, all of one kind: `{"text"}`, `{"prompt", "completion"}`
  or chat `{"messages": [{"role", "content"}, …]}`; or flat rows (a table for `sklearn`)
- `.txt`: UTF-8 text (documents separated by blank lines)
- `.csv`: UTF-8 with a header row (a table)
- `.npz`: image arrays, loaded with allow_pickle=False (`images`: uint8 N×H×W×3)
- `.zip`: images only (png, jpg, jpeg, webp), no absolute or `..` paths, bounded size
Errors name the line of the first bad record.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

PURPOSES = ("fine-tune",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CHAT_ROLES = {"system", "developer", "user", "assistant"}


class UploadError(ValueError):
    def __init__(self, message: str, param: str = "file"):
        super().__init__(message)
        self.param = param


@dataclass
class Checked:
    format: str
    records: int


def check_upload(filename: str, data: bytes, *, max_zip_bytes: int) -> Checked:
    """Validate an upload; raise UploadError naming what is wrong."""
    if not data:
        raise UploadError("the file is empty")
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix == ".jsonl":
        return _check_jsonl(_utf8(data))
    if suffix == ".txt":
        text = _utf8(data)
        if not text.strip():
            raise UploadError("the file has no text")
        return Checked("text", sum(1 for d in text.split("\n\n") if d.strip()))
    if suffix == ".csv":
        return _check_csv(_utf8(data))
    if suffix == ".npz":
        return _check_npz(data)
    if suffix == ".zip":
        return _check_zip(data, max_zip_bytes)
    raise UploadError(f"file name {filename!r}: accepted types are .jsonl, .txt, .csv, .npz and .zip")


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UploadError(f"the file is not UTF-8 (line {line}, byte {e.start})") from None


def _record_kind(rec, n: int) -> str:
    if not isinstance(rec, dict):
        raise UploadError(f"line {n}: each line must be a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UploadError(f"line {n}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise UploadError(f"line {n}: each message needs a role ({', '.join(sorted(CHAT_ROLES))}) "
                                  "and a string content")
        return "jsonl-chat"
    if "prompt" in rec or "completion" in rec:
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
            raise UploadError(f"line {n}: 'prompt' and 'completion' must both be strings")
        return "jsonl-prompt"
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise UploadError(f"line {n}: 'text' must be a non-empty string")
        return "jsonl-text"
    if rec and all(isinstance(v, (int, float, str, bool)) or v is None for v in rec.values()):
        return "jsonl-table"
    raise UploadError(f"line {n}: a record needs 'text', 'prompt'+'completion', 'messages', or flat columns")


def _check_jsonl(text: str) -> Checked:
    kind, n_records = None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UploadError(f"line {n}: not valid JSON ({e.msg})") from None
        k = _record_kind(rec, n)
        if kind is None:
            kind = k
        elif k != kind:
            raise UploadError(f"line {n}: record kind {k} differs from the file's first record ({kind})")
        n_records += 1
    if not n_records:
        raise UploadError("the file has no records")
    return Checked(kind, n_records)


def _check_csv(text: str) -> Checked:
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2:
        raise UploadError("a CSV file needs a header row and at least one data row")
    width = len(rows[0])
    for n, row in enumerate(rows[1:], 2):
        if row and len(row) != width:
            raise UploadError(f"line {n}: {len(row)} columns, the header has {width}")
    return Checked("csv", sum(1 for r in rows[1:] if r))


def _check_npz(data: bytes) -> Checked:
    import numpy as np

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if "images" not in z.files:
                raise UploadError("an .npz file needs an 'images' array")
            images = z["images"]
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        if isinstance(e, UploadError):
            raise
        raise UploadError(f"not a readable .npz without pickles: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UploadError(f"'images' must be uint8 N×H×W×3, got {images.dtype} {tuple(images.shape)}")
    return Checked("npz", int(images.shape[0]))


def _check_zip(data: bytes, max_bytes: int) -> Checked:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UploadError("not a zip archive") from None
    total, count = 0, 0
    for info in zf.infolist():
        name = info.filename
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or "\\" in name:
            raise UploadError(f"archive entry {name!r} has an unsafe path")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UploadError(f"archive entry {name!r} is a symbolic link")
        if info.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise UploadError(f"archive entry {name!r}: only images ({', '.join(IMAGE_SUFFIXES)}) are accepted")
        total += info.file_size
        if total > max_bytes:
            raise UploadError(f"the archive unpacks to more than {max_bytes} bytes")
        count += 1
    if not count:
        raise UploadError("the archive holds no images")
    return Checked("zip", count)
