"""Bring your own model: a folder or file a user has becomes a version, served like the shipped ones.

  1. unpack     an upload (a .zip of the folder, or one .onnx file) into a private folder,
                refusing unsafe paths, links and sizes before anything is written
  2. recognise  which family reads it: the manifest's `family`, else the first family
                whose `recognises(folder)` says yes (config.json of a causal LM → hf-causal-lm,
                model_index.json → diffusers, one .onnx → onnx)
  3. check      pickle-based weights are refused; the family loads the folder once, so a
                folder it cannot serve is a clear error naming the file, and nothing is
                registered half-way
  4. register   a new version of NAME (a new model if NAME is new), its manifest shown in
                /v1/models

The optional manifest `atelier.json` beside the files (like Ollama's Modelfile): display_name,
family, description, license, defaults (sampling parameters), system_prompt, chat_template,
context_length; the onnx family reads task, inputs, outputs, labels, features from it.
"""

from __future__ import annotations

import io
import json
import re
import stat
import zipfile
from pathlib import Path

from sqlalchemy.orm import Session

from atelier.common.files import atomic_write_json
from atelier.families import FAMILIES, Family
from atelier.families.base import MANIFEST, PICKLED, manifest, refuse_pickles
from atelier.storage import audit
from atelier.storage.blobs import BlobStore
from atelier.storage.db import Version
from atelier.storage.registry import CONFIG_FILES, NAME_RE, register_version

MAX_ENTRIES = 10_000
MANIFEST_KEYS = ("display_name", "family", "description", "license", "defaults", "system_prompt", "chat_template",
                 "context_length", "task", "inputs", "outputs", "labels", "features", "baseline", "image", "name")
DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "stop")


class ImportRefused(ValueError):
    """A folder or upload that cannot become a model; `param` is the request field to blame."""

    def __init__(self, message: str, param: str = "file"):
        super().__init__(message)
        self.param = param


# -- 1. unpack -------------------------------------------------------------------------------


def unpack(data: bytes, filename: str, dest: Path, *, max_unpacked: int) -> Path:
    """An upload → a folder under `dest`: an .onnx file as it is, a .zip checked entry by entry."""
    dest.mkdir(parents=True, exist_ok=True)
    name = Path(filename or "").name
    if name.endswith(".onnx"):
        (dest / safe_name(name)).write_bytes(data)
        return dest
    if name.endswith(PICKLED):
        refuse_pickles_named([name])
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ImportRefused(f"{name or 'the upload'} is neither a .zip of a model folder nor an .onnx file") from None
    infos = [i for i in z.infolist() if not i.is_dir()]
    if len(infos) > MAX_ENTRIES:
        raise ImportRefused(f"the archive has {len(infos)} files; at most {MAX_ENTRIES}")
    if sum(i.file_size for i in infos) > max_unpacked:
        raise ImportRefused(f"the archive unpacks to more than {max_unpacked} bytes (4 × ATELIER_MAX_UPLOAD_BYTES)")
    refuse_pickles_named([i.filename for i in infos])
    # One top-level folder (zip -r model.zip my-model/) is the model folder itself.
    tops = {i.filename.split("/", 1)[0] for i in infos}
    strip = len(tops) == 1 and all("/" in i.filename for i in infos)
    for info in infos:
        rel = info.filename.split("/", 1)[1] if strip else info.filename
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ImportRefused(f"archive entry {info.filename!r} is a symbolic link; links are refused")
        target = dest / safe_path(rel, info.filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src:
            content = src.read(max_unpacked + 1)
        if len(content) != info.file_size:  # a header that lies about its size
            raise ImportRefused(f"archive entry {info.filename!r} does not match its declared size")
        target.write_bytes(content)
    return dest


def safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name) or name.startswith("."):
        raise ImportRefused(f"file name {name!r} is not accepted (letters, digits, '.', '_', '-')")
    return name


def safe_path(rel: str, shown: str) -> Path:
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ImportRefused(f"archive entry {shown!r} has an unsafe path")
    return Path(*parts)


def refuse_pickles_named(names: list[str]) -> None:
    pickled = [n for n in names if n.endswith(PICKLED)]
    if pickled:
        raise ImportRefused(f"{', '.join(pickled)}: pickle-based weights are refused (loading them can run code); "
                           "convert them to safetensors, e.g. model.save_pretrained(folder, safe_serialization=True)")


# -- 2. recognise, 3. check ---------------------------------------------------------------------


def read_manifest(folder: Path) -> dict:
    """atelier.json with every key known to some reader (a typo is refused, not ignored)."""
    try:
        found = manifest(folder)
    except ValueError as e:
        raise ImportRefused(str(e)) from None
    unknown = sorted(set(found) - set(MANIFEST_KEYS))
    if unknown:
        raise ImportRefused(f"{MANIFEST} has unknown fields {', '.join(unknown)}; accepted: {', '.join(MANIFEST_KEYS)}")
    bad = sorted(set(found.get("defaults") or {}) - set(DEFAULTS))
    if bad:
        raise ImportRefused(f"{MANIFEST} defaults has unknown fields {', '.join(bad)}; accepted: {', '.join(DEFAULTS)}")
    return found


def recognise(folder: Path, manifest: dict) -> Family:
    if "family" in manifest:
        family = FAMILIES.get(manifest["family"])
        if family is None or type(family).recognises is Family.recognises:
            importable = [n for n, f in FAMILIES.items() if type(f).recognises is not Family.recognises]
            raise ImportRefused(f"{MANIFEST} names family {manifest['family']!r}; importable families: "
                               f"{', '.join(importable)}")
        return family
    for family in FAMILIES.values():
        if family.recognises(folder):
            return family
    raise ImportRefused("the folder is not a model Atelier can import: expected a transformers causal LM "
                       "(config.json + *.safetensors + tokenizer files), a diffusers pipeline (model_index.json "
                       "+ component folders with safetensors), or one .onnx file")


def check(folder: Path, family: Family) -> str | None:
    """Load it once, as the runtime would: what cannot be served is not registered. The task the
    loaded model says it does (an ONNX graph with label outputs classifies), if it says one."""
    try:
        refuse_pickles(folder)
        servable = family.load(folder)
    except (ValueError, OSError) as e:
        raise ImportRefused(str(e)) from None
    return getattr(servable, "task", None)


# -- 4. register -------------------------------------------------------------------------------


def import_folder(db: Session, blobs: BlobStore, folder: Path, *, name: str, key_id: str | None = None,
                  owner: str = "atelier", source: str = "") -> Version:
    """Steps 2–4 for a folder on this machine (`atelier models import PATH`, or an unpacked upload)."""
    if not NAME_RE.match(name):
        raise ImportRefused(f"model name {name!r} must match {NAME_RE.pattern}", "name")
    manifest = read_manifest(folder)
    family = recognise(folder, manifest)
    served_task = check(folder, family)
    if not any((folder / f).exists() for f in CONFIG_FILES):  # a lone .onnx: its config is the manifest
        atomic_write_json(folder / MANIFEST, {"family": family.name} | manifest)
    config_file = next(folder / f for f in CONFIG_FILES if (folder / f).exists())
    config = json.loads(config_file.read_text(encoding="utf-8"))
    task = manifest.get("task") or served_task or family.task_of(config)
    try:
        facts = family.import_facts(folder)  # what describe() needs beyond the config file: stored with it
    except ValueError as e:
        raise ImportRefused(str(e)) from None
    try:
        version = register_version(db, blobs, name=name, family=family.name, task=task, folder=folder, owner=owner,
                                   training={"imported_from": source, "manifest": manifest}, config_extra=facts)
    except ValueError as e:  # a name taken by another family, …
        db.rollback()
        raise ImportRefused(str(e), "name") from None
    audit.record(db, action="model.import", target=f"{name}@{version.number}", key_id=key_id,
                 detail={"family": family.name, "source": source})
    return version
