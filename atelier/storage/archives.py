"""Model archives: one zip of a version's files plus a manifest with every file's sha256.

Export writes it; import verifies names, types, sizes and hashes before registering
anything, so a bad archive registers nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from atelier.storage.blobs import BlobStore
from atelier.storage.db import Model, Version
from atelier.storage.registry import Conflict, register_version


ARCHIVE_FORMAT = "atelier-model/1"
# Only these ever travel in an archive: weights as safetensors (or skops for sklearn, which
# loads with an explicit list of trusted types), JSON, and text. Never pickle.
ARCHIVE_SUFFIXES = (".safetensors", ".json", ".skops", ".md", ".txt")


def export_archive(blobs: BlobStore, version: Version) -> bytes:
    """One zip: the version's files plus manifest.json (metadata and every file's sha256)."""
    import io
    import zipfile

    manifest = {"format": ARCHIVE_FORMAT, "name": version.model.name, "family": version.model.family,
                "task": version.model.task, "version": version.number, "metrics": version.metrics,
                "training": version.training, "files": version.files}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2))
        for fname, digest in sorted(version.files.items()):
            z.writestr(fname, blobs.get_bytes(digest))
    return buf.getvalue()


def import_archive(db: Session, blobs: BlobStore, data: bytes, *, name: str | None = None,
                   max_unpacked: int = 1 << 30, owner: str = "atelier", may_add_to=lambda model: True) -> Version:
    """Verify an exported archive (names, types, sizes, hashes) and register it as a new version
    (of a new model owned by `owner`, or of an existing one `may_add_to` allows: Conflict otherwise)."""
    import io
    import tempfile
    import zipfile

    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ValueError("not a zip archive") from None
    entries = {i.filename: i for i in z.infolist()}
    if "manifest.json" not in entries:
        raise ValueError("the archive has no manifest.json")
    for entry, info in entries.items():
        if "/" in entry or "\\" in entry or entry.startswith(".") or ".." in entry:
            raise ValueError(f"archive entry {entry!r} has an unsafe path")
        if not entry.endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"archive entry {entry!r}: only {', '.join(ARCHIVE_SUFFIXES)} files are accepted "
                             "(no pickle, ever)")
    if sum(i.file_size for i in entries.values()) > max_unpacked:
        raise ValueError(f"the archive unpacks to more than {max_unpacked} bytes")
    manifest = _read_manifest(z)
    files = manifest["files"]
    if set(files) != set(entries) - {"manifest.json"}:
        raise ValueError("the archive's files do not match its manifest")
    with tempfile.TemporaryDirectory() as tmp:
        for fname, digest in files.items():
            content = z.read(fname)
            if hashlib.sha256(content).hexdigest() != digest:
                raise ValueError(f"{fname}: sha256 does not match the manifest")
            (Path(tmp) / fname).write_bytes(content)
        target = name or manifest["name"]
        existing = db.scalar(select(Model).where(Model.name == target))
        if existing is not None and not may_add_to(existing):
            raise Conflict(f"the name {target!r} is taken by a model this key does not own; choose another name")
        return register_version(db, blobs, name=target, owner=owner, family=manifest["family"],
                                task=manifest["task"], folder=Path(tmp), metrics=manifest["metrics"],
                                training=manifest["training"] | {"imported_from": f"{manifest['name']}@"
                                                                        f"{manifest['version']}"})


# manifest key → the JSON type it must have (metrics and training may be absent)
MANIFEST_KEYS = {"format": str, "name": str, "version": int, "family": str, "task": str, "files": dict}
MANIFEST_OPTIONAL = {"metrics": dict, "training": dict}


def _read_manifest(z) -> dict:
    """manifest.json as a dict with every key of MANIFEST_KEYS, of the right type (ValueError naming it)."""
    try:
        manifest = json.loads(z.read("manifest.json"))
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply to be a manifest
        raise ValueError(f"manifest.json is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest.json must be a JSON object, not {type(manifest).__name__}")
    if manifest.get("format") != ARCHIVE_FORMAT:
        raise ValueError(f"manifest format {manifest.get('format')!r} is not {ARCHIVE_FORMAT}")
    for key, kind in MANIFEST_KEYS.items():
        if key not in manifest:
            raise ValueError(f"manifest.json has no {key!r}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ValueError(f"manifest.json: {key!r} must be a JSON {_JSON_NAMES[kind]}, "
                             f"not {type(manifest[key]).__name__}")
    for key, kind in MANIFEST_OPTIONAL.items():
        value = manifest.get(key) or {}  # absent or null: none
        if not isinstance(value, kind):
            raise ValueError(f"manifest.json: {key!r} must be a JSON {_JSON_NAMES[kind]}")
        manifest[key] = value
    if not all(isinstance(d, str) for d in manifest["files"].values()):
        raise ValueError("manifest.json: 'files' must map each file name to its sha256 (a string)")
    return manifest


_JSON_NAMES = {str: "string", int: "integer", dict: "object"}
