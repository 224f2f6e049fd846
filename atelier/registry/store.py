"""The registry: models, immutable versions, aliases, and the blob store behind them.

Plain functions with keyword-only arguments over a SQLAlchemy session. A version's files
live in the content-addressed blob store (`blobs/sha256/ab/abcdef…`); the database holds
their hashes, so a version's bytes can be verified at any time.

A model reference is `name`, `name:alias` or `name@version` (`latest` when only a name).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from atelier.registry.db import Alias, Model, Version
from atelier.registry.files import atomic_write_bytes
from atelier.safety import crypto

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class NotFound(LookupError):
    """A model, version or alias that does not exist."""


class Conflict(ValueError):
    """A name that is taken, or an operation the current state does not allow."""


# -- blobs ------------------------------------------------------------------------------


class BlobStore:
    """Content-addressed files: put bytes, get them back by sha256.

    With a data key every blob is sealed with AES-256-GCM (atelier/safety/crypto.py); the
    name stays the plaintext's sha256, so identical bytes still deduplicate. Read blobs
    with `get_bytes`/`export` (they unseal and check the hash), never from `path`.
    """

    def __init__(self, root: Path, key: bytes | None = None):
        self.root = Path(root)
        self.key = key
        self._plain_root: Path | None = None

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    def path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        p = self.path(digest)
        if not p.exists():
            atomic_write_bytes(p, crypto.seal(self.key, data) if self.key else data)
        return digest

    def put_file(self, src: Path) -> str:
        return self.put_bytes(Path(src).read_bytes())

    def get_bytes(self, sha256: str) -> bytes:
        """The blob's plaintext; crypto.SealError if it cannot be opened or does not match its name."""
        raw = self.path(sha256).read_bytes()
        data = crypto.unseal(self.key, raw) if crypto.is_sealed(raw) else raw  # older blobs may be plain
        if hashlib.sha256(data).hexdigest() != sha256:
            raise crypto.SealError(f"blob {sha256[:12]}… does not match its sha256")
        return data

    def export(self, sha256: str, dest: Path) -> Path:
        """Write the plaintext to `dest` (atomically)."""
        return atomic_write_bytes(dest, self.get_bytes(sha256))

    def verify(self, sha256: str) -> bool:
        try:
            return self.path(sha256).exists() and bool(self.get_bytes(sha256))
        except crypto.SealError:
            return False

    def plain_root(self, default: Path) -> Path:
        """Where versions are unpacked for loaders. Plain stores use `default` (hard links, no
        copies); an encrypted store never writes plaintext beside itself: a private folder in
        memory (/dev/shm, when it has room: containers often give it 64 MB) or else in the
        system's temporary folder, removed when the process exits."""
        if not self.encrypted:
            return Path(default)
        if self._plain_root is None:
            import atexit
            import tempfile

            base = Path("/dev/shm" if _free_bytes("/dev/shm") >= 1 << 30 else tempfile.gettempdir())
            _remove_orphans(base)
            self._plain_root = Path(tempfile.mkdtemp(prefix=f"{PLAIN_PREFIX}{os.getpid()}-", dir=base))  # 0700
            atexit.register(shutil.rmtree, self._plain_root, True)
        return self._plain_root


PLAIN_PREFIX = "atelier-versions-"


def _remove_orphans(base: Path) -> None:
    """Unpacked folders of processes that died without cleaning up (kill -9): theirs to free."""
    for d in base.glob(f"{PLAIN_PREFIX}*-*"):
        pid = d.name[len(PLAIN_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and d.stat().st_uid == os.getuid() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_bytes(folder: str) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize if os.access(folder, os.W_OK) else 0


def open_blobs(settings) -> BlobStore:
    """The installation's blob store, sealed with its data key unless ATELIER_ENCRYPT_AT_REST=false."""
    return BlobStore(settings.blobs_dir, key=crypto.data_key(settings))


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


def resolve(db: Session, *, ref: str) -> Version:
    """The version a reference points at (a plain name means the `latest` alias)."""
    r = parse_ref(ref)
    model = get_model(db, name=r.name)
    if r.version is not None:
        number = r.version
    else:
        alias = r.alias or "latest"
        hit = next((a for a in model.aliases if a.name == alias), None)
        if hit is None:
            raise NotFound(f"model {r.name!r} has no alias {alias!r}; aliases: "
                           f"{', '.join(sorted(a.name for a in model.aliases)) or 'none'}")
        number = hit.version_number
    version = next((v for v in model.versions if v.number == number), None)
    if version is None:
        raise NotFound(f"model {r.name!r} has no version {number}; versions: "
                       f"{', '.join(str(v.number) for v in model.versions) or 'none'}")
    return version


def list_models(db: Session) -> list[Model]:
    return list(db.scalars(select(Model).order_by(Model.name)))


# -- writing ----------------------------------------------------------------------------


def register_version(db: Session, blobs: BlobStore, *, name: str, family: str, task: str, folder: Path,
                     metrics: dict | None = None, training: dict | None = None,
                     aliases: tuple[str, ...] = ("latest",), owner: str = "atelier") -> Version:
    """Store every file of `folder` as a blob and record a new immutable version of `name`.

    >>> register_version(db, blobs, name="tang-poet", family="chargpt", task="text-generation",
    ...                  folder=Path("runs/tang-poet/best"))
    """
    if not NAME_RE.match(name):
        raise ValueError(f"model name {name!r} must match {NAME_RE.pattern}")
    folder = Path(folder)
    files = {}
    size = 0
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            files[p.name] = blobs.put_file(p)
            size += p.stat().st_size
    if "config.json" not in files:
        raise ValueError(f"{folder} has no config.json")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
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
                   max_unpacked: int = 1 << 30) -> Version:
    """Verify an exported archive (names, types, sizes, hashes) and register it as a new version."""
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
    manifest = json.loads(z.read("manifest.json"))
    if manifest.get("format") != ARCHIVE_FORMAT:
        raise ValueError(f"manifest format {manifest.get('format')!r} is not {ARCHIVE_FORMAT}")
    files = manifest.get("files", {})
    if set(files) != set(entries) - {"manifest.json"}:
        raise ValueError("the archive's files do not match its manifest")
    with tempfile.TemporaryDirectory() as tmp:
        for fname, digest in files.items():
            content = z.read(fname)
            if hashlib.sha256(content).hexdigest() != digest:
                raise ValueError(f"{fname}: sha256 does not match the manifest")
            (Path(tmp) / fname).write_bytes(content)
        return register_version(db, blobs, name=name or manifest["name"], family=manifest["family"],
                                task=manifest["task"], folder=Path(tmp), metrics=manifest.get("metrics", {}),
                                training=manifest.get("training", {}) | {"imported_from": f"{manifest['name']}@"
                                                                        f"{manifest['version']}"})
