"""The registry: models, immutable versions and aliases.

Plain functions with keyword-only arguments over a SQLAlchemy session. A version's files
live in the content-addressed blob store (`blobs/sha256/ab/abcdef…`); the database holds
their hashes, so a version's bytes can be verified at any time.

A model reference is `name`, `name:alias` or `name@version` (`latest` when only a name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, contains_eager, selectinload

from atelier.storage import audit
from atelier.storage.blobs import BlobStore
from atelier.storage.db import Alias, Model, Version

CONFIG_FILES = ("config.json", "model_index.json", "atelier.json")  # the first one a version has is its config
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class NotFound(LookupError):
    """A model, version or alias that does not exist."""


class Conflict(ValueError):
    """A name that is taken, or an operation the current state does not allow."""


# -- references -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}:{self.alias}" if self.alias else self.name


def parse_ref(ref: str) -> ModelRef:
    """`tang-poet` | `tang-poet:production` | `tang-poet@3` → ModelRef."""
    ref = ref.strip()
    if "@" in ref:
        name, _, v = ref.partition("@")
        if not v.isdigit() or int(v) < 1:
            raise ValueError(f"version in {ref!r} must be a positive integer, as in name@1")
        return ModelRef(name, version=int(v))
    if ":" in ref:
        name, _, alias = ref.partition(":")
        if not alias:
            raise ValueError(f"alias in {ref!r} is empty; use name:alias, e.g. tang-poet:production")
        return ModelRef(name, alias=alias)
    return ModelRef(ref)


def get_model(db: Session, *, name: str) -> Model:
    model = db.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFound(f"model {name!r} does not exist")
    return model


# The two queries every generation runs, built once: building a statement costs more than SQLite running it.
_VERSION = (select(Version).join(Version.model).options(contains_eager(Version.model))
            .where(Model.name == bindparam("name")))
_VERSION_BY_NUMBER = _VERSION.where(Version.number == bindparam("number"))
_VERSION_BY_ALIAS = (_VERSION.join(Alias, (Alias.model_id == Model.id) & (Alias.version_number == Version.number))
                     .where(Alias.name == bindparam("alias")))


def resolve(db: Session, *, ref: str) -> Version:
    """The version a reference points at (a plain name means the `latest` alias), with its model.

    Every generation resolves its `model` field, so the common case is one query; the model's
    aliases and versions are read only to say what exists when the reference names nothing.
    """
    r = parse_ref(ref)
    alias = r.alias or "latest"
    if r.version is not None:
        version = db.scalar(_VERSION_BY_NUMBER, {"name": r.name, "number": r.version})
    else:
        version = db.scalar(_VERSION_BY_ALIAS, {"name": r.name, "alias": alias})
    if version is not None:
        return version
    model = get_model(db, name=r.name)  # NotFound when the model itself does not exist
    number = r.version if r.version is not None else next((a.version_number for a in model.aliases
                                                           if a.name == alias), None)
    if number is None:
        raise NotFound(f"model {r.name!r} has no alias {alias!r}; aliases: "
                       f"{', '.join(sorted(a.name for a in model.aliases)) or 'none'}")
    raise NotFound(f"model {r.name!r} has no version {number}; versions: "
                   f"{', '.join(str(v.number) for v in model.versions) or 'none'}")


def resolve_remembered(db: Session, *, ref: str) -> Version:
    """`resolve`, remembered for a moment where db's sessions remember versions (the server's: every
    generation names its model; storage/remembered.py): a version of no session, its model loaded, to read."""
    versions = db.info.get("versions")
    if versions is None:
        return resolve(db, ref=ref)

    def read() -> Version:
        version = resolve(db, ref=ref)
        db.expunge(version)
        db.expunge(version.model)
        return version

    return versions.get(ref, read)


def list_models(db: Session) -> list[Model]:
    """Every model with its versions and aliases, in three queries rather than two more per model (GET
    /v1/models reads them all: 3.7 ms for the six shipped models one by one)."""
    return list(db.scalars(select(Model).order_by(Model.name)
                           .options(selectinload(Model.versions), selectinload(Model.aliases))))


# -- writing ----------------------------------------------------------------------------


def register_version(db: Session, blobs: BlobStore, *, name: str, family: str, task: str, folder: Path,
                     metrics: dict | None = None, training: dict | None = None,
                     aliases: tuple[str, ...] = ("latest",), owner: str = "atelier",
                     config_extra: dict | None = None) -> Version:
    """Store every file of `folder` (subfolders too: a diffusers pipeline has one per component) as
    a blob and record a new immutable version of `name`. Its config is `config.json`, else the
    folder's `model_index.json` or `atelier.json` (the family reads what it needs).

    >>> register_version(db, blobs, name="tang-poet", family="chargpt", task="text-generation",
    ...                  folder=Path("runs/tang-poet/best"))
    """
    if not NAME_RE.match(name):
        raise ValueError(f"model name {name!r} must match {NAME_RE.pattern}")
    folder = Path(folder)
    files = {}
    size = 0
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in rel.split("/")):
            files[rel] = blobs.put_file(p)
            size += p.stat().st_size
    config_file = next((f for f in CONFIG_FILES if f in files), None)
    if config_file is None:
        raise ValueError(f"{folder} has no {' or '.join(CONFIG_FILES)}")
    config = json.loads((folder / config_file).read_text(encoding="utf-8")) | (config_extra or {})
    model = db.scalar(select(Model).where(Model.name == name))
    if model is None:
        model = Model(name=name, family=family, task=task, owner=owner)
        db.add(model)
        db.flush()
    elif model.family != family:
        raise Conflict(f"model {name!r} is a {model.family} model, not {family}")
    number = max((v.number for v in model.versions), default=0) + 1
    version = Version(model=model, number=number, files=files, config=config, metrics=metrics or {},
                      training=training or {}, size_bytes=size)
    db.add(version)
    db.flush()
    for alias in aliases:
        set_alias(db, model=model, alias=alias, number=number)
    db.commit()
    return version


def set_alias(db: Session, *, model: Model, alias: str, number: int) -> None:
    if not ALIAS_RE.match(alias):
        raise ValueError(f"alias {alias!r} must match {ALIAS_RE.pattern}")
    if not any(v.number == number for v in model.versions):
        raise NotFound(f"model {model.name!r} has no version {number}")
    hit = next((a for a in model.aliases if a.name == alias), None)
    if hit is None:
        model.aliases.append(Alias(name=alias, version_number=number))
    else:
        hit.version_number = number


def version_folder(blobs: BlobStore, version: Version, cache_root: Path) -> Path:
    """A folder holding the version's files under their names, for loaders that read paths.

    Loaders read files by name (config.json, model.safetensors, …). A plain store hard-links
    its blobs there (the blobs stay the single copy); an encrypted one writes the
    plaintexts into its private in-memory folder (BlobStore.plain_root).
    """
    folder = blobs.plain_root(cache_root) / version.model.name / str(version.number)
    if all((folder / n).exists() for n in version.files):
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for fname, digest in version.files.items():
        if fname.startswith("/") or ".." in fname.split("/"):
            raise ValueError(f"{version.model.name}@{version.number} has an unsafe file name {fname!r}")
        (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
        if blobs.encrypted:
            (tmp / fname).write_bytes(blobs.get_bytes(digest))
            continue
        src = blobs.path(digest)
        try:
            os.link(src, tmp / fname)
        except OSError:
            shutil.copyfile(src, tmp / fname)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# -- lifecycle --------------------------------------------------------------------------


def rollback(db: Session, *, name: str, alias: str) -> int:
    """Point `alias` at the version just before the one it points at now; return that number."""
    model = get_model(db, name=name)
    hit = next((a for a in model.aliases if a.name == alias), None)
    if hit is None:
        raise NotFound(f"model {name!r} has no alias {alias!r}")
    older = [v.number for v in model.versions if v.number < hit.version_number]
    if not older:
        raise Conflict(f"{name}:{alias} is at version {hit.version_number}; there is no older version to roll back to")
    hit.version_number = max(older)
    db.commit()
    return hit.version_number


def delete_version(db: Session, *, version: Version, force: bool = False) -> list[str]:
    """Delete one version; aliases that point at it are refused unless force (then removed too)."""
    model = version.model
    pointing = [a for a in model.aliases if a.version_number == version.number]
    if pointing and not force:
        raise Conflict(f"aliases {', '.join(a.name for a in pointing)} point at {model.name}@{version.number}; "
                       "move them first or force")
    for a in pointing:
        model.aliases.remove(a)
    model.versions.remove(version)
    if not model.versions:
        db.delete(model)
    db.commit()
    return [a.name for a in pointing]


# -- publishing trained weights ---------------------------------------------------------


def register_trained(db: Session, blobs: BlobStore, *, folder: Path, name: str, family: str, task: str,
                     training: dict | None = None, aliases: tuple[str, ...] = ("latest",), key_id: str | None = None,
                     detail: dict | None = None, owner: str = "atelier") -> Version:
    """A trainer's best folder → a new version, with its training record (`training.json`, when the
    folder has one, plus `training`) and an audit entry. The CLI and the job runner both publish here.
    """
    record = {}
    if (Path(folder) / "training.json").exists():
        record = json.loads((Path(folder) / "training.json").read_text(encoding="utf-8"))
    version = register_version(db, blobs, name=name, family=family, task=task, folder=folder, owner=owner,
                               metrics=record.get("metrics", {}), training=record | (training or {}), aliases=aliases)
    audit.record(db, action="model.register", target=f"{name}@{version.number}", key_id=key_id, detail=detail or {})
    return version
