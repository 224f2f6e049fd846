"""Validating uploaded training files before anything is stored.

Accepted, by file name:
- `.jsonl`: one JSON object per line, all of one kind: `{"text"}`, `{"prompt", "completion"}`
  or chat `{"messages": [{"role", "content"}, …]}`; or flat rows (a table for `sklearn`)
- `.txt`: UTF-8 text (documents separated by blank lines)
- `.csv`: UTF-8 with a header row (a table)
- `.npz`: image arrays (`images`: uint8 N×H×W×3, optional `names`), checked from the .npy headers
  before anything is inflated (bounded like archives, no object dtypes)
- `.abc`: folk tunes in ABC notation, every tune read (errors name the tune, line and column)
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
    """Validate an upload; raise UploadError naming what is wrong (`max_zip_bytes` bounds what a .zip or
    .npz may inflate to)."""
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
        return _check_npz(data, max_zip_bytes)
    if suffix == ".zip":
        return _check_zip(data, max_zip_bytes)
    if suffix == ".abc":
        return _check_abc(_utf8(data))
    raise UploadError(f"file name {filename!r}: accepted types are .jsonl, .txt, .csv, .npz, .zip and .abc")


def _check_abc(text: str) -> Checked:
    """Every tune must parse; bars that do not scan are tolerated in a training file (the corpus
    reader skips those tunes), a parse error is not."""
    from atelier.music.abc import AbcError, parse_many

    try:
        tunes = parse_many(text)
    except AbcError as e:
        raise UploadError(str(e)) from None
    return Checked("abc", len(tunes))


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


def npz_arrays(source, *, max_bytes: int | None = None) -> dict:
    """Each array's declared (shape, dtype) in an .npz, from the .npy headers, without inflating the data.

    An .npz is a zip of .npy files, and a 1 MB upload can inflate to gigabytes, so nothing is
    loaded until the headers add up:
      1. every member is a `.npy` (np.load would hand back any other member's bytes in full)
      2. its header gives shape and dtype; object dtypes (pickles) are refused
      3. header + prod(shape) × itemsize must equal the zip entry's declared size
      4. the declared sizes together must stay within `max_bytes` (when given)

        npz_arrays(data, max_bytes=4 * settings.max_upload_bytes)
        → {'images': ((10, 32, 32, 3), dtype('uint8')), 'names': ((10,), dtype('<U12'))}
    """
    from numpy.lib import format as npy

    try:
        z = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UploadError("not a readable .npz (an .npz is a zip of .npy arrays)") from None
    arrays, total = {}, 0
    with z:
        for info in z.infolist():
            name = info.filename
            if not name.endswith(".npy") or info.is_dir():
                raise UploadError(f".npz member {name!r} is not a .npy array")
            total += info.file_size
            if max_bytes is not None and total > max_bytes:
                raise UploadError(f"the .npz inflates to more than {max_bytes} bytes (4 × ATELIER_MAX_UPLOAD_BYTES)")
            try:
                with z.open(info) as f:
                    version = npy.read_magic(f)
                    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _fortran, dtype = read_header(f)
                    header_len = f.tell()
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
                raise UploadError(f".npz member {name!r} has no readable .npy header: {e}") from None
            if dtype.hasobject:
                raise UploadError(f"an .npz must hold arrays without pickles: {name[:-4]!r} has dtype {dtype} "
                                  "(Python objects)")
            declared = header_len + dtype.itemsize * _prod(shape)
            if declared != info.file_size:
                raise UploadError(f"array {name[:-4]!r}: its header says {tuple(shape)} {dtype} "
                                  f"({declared} bytes) but the zip entry holds {info.file_size} bytes")
            arrays[name[:-4]] = (tuple(shape), dtype)
    return arrays


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _check_npz(data: bytes, max_bytes: int) -> Checked:
    import numpy as np

    # 1. headers first: shapes, dtypes and declared sizes, nothing inflated
    arrays = npz_arrays(data, max_bytes=max_bytes)
    if "images" not in arrays:
        raise UploadError("an .npz file needs an 'images' array")
    shape, dtype = arrays["images"]
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise UploadError(f"'images' must be uint8 N×H×W×3, got {dtype} {shape}")
    if "names" in arrays:
        n_shape, n_dtype = arrays["names"]
        if n_dtype.kind not in "US" or n_shape != shape[:1]:
            raise UploadError(f"'names' must be N strings (N = {shape[0]}), got {n_dtype} {n_shape}")
    # 2. then the data, streamed in chunks (bounded memory) so a bad CRC is caught here, not in training
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    while f.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UploadError(f"not a readable .npz: {e}") from None
    return Checked("npz", int(shape[0]))


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
