"""The blob store: content-addressed files, sealed with the data key when encryption is on.

Blobs live at `blobs/sha256/ab/abcdef…`; the database holds their hashes, so any file's
bytes can be verified at any time. Loaders read versions unpacked into a folder
(`version_folder` in atelier/storage/registry.py), never the blobs themselves.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from atelier.common.files import atomic_write_bytes
from atelier.safety import crypto


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

    def close(self) -> None:
        """Delete the unpacked plaintexts now (server shutdown; atexit does not run after SIGTERM)."""
        if self._plain_root is not None:
            shutil.rmtree(self._plain_root, ignore_errors=True)
            self._plain_root = None


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


STALE_TEMPORARY_S = 600  # a temp file this old is a crashed write's, not a write in progress


def remove_stale_temporaries(root: Path, now: float | None = None) -> int:
    """Delete the temp files of writes that a crash interrupted (atomic writes leave `.name.pidN.*.tmp`
    beside the blob until their rename): at once when process N is gone, else when old; returns how many."""
    import time

    now = time.time() if now is None else now
    removed = 0
    for p in Path(root).glob("sha256/*/.*.tmp"):
        found = re.search(r"\.pid(\d+)\.", p.name)
        try:
            dead = found is not None and not _alive(int(found.group(1)))
            if dead or now - p.stat().st_mtime > STALE_TEMPORARY_S:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def open_blobs(settings) -> BlobStore:
    """The installation's blob store, sealed with its data key unless ATELIER_ENCRYPT_AT_REST=false;
    temp files left by crashed writes are removed."""
    remove_stale_temporaries(settings.blobs_dir)
    return BlobStore(settings.blobs_dir, key=crypto.data_key(settings))
