"""Artifacts: generated outputs (images, poems, …) stored with their provenance.

The bytes go to the content-addressed blob store first (atomic write), then one row
records kind, model@version, key id, sha256, MIME type, size and every request parameter
(the seed included). A crash between the two leaves at most an unreferenced blob, never a
row without its bytes. Identical outputs share one blob.

Links to an artifact's bytes can be handed to clients that hold no key (an `<img src>`,
OpenAI's `response_format="url"`): `signed_path` appends `expires` and an HMAC-SHA256
`sig` made with a per-installation secret, and `check_signature` verifies them.

    >>> a = create_artifact(db, blobs, kind="image", data=png, mime="image/png",
    ...                     model_ref="emoji-diffusion@1", key_id="key_1", params={"seed": 7})
    >>> signed_path(secret, a.id, expires=int(time.time()) + 3600)
    '/api/artifacts/art_…/content?expires=…&sig=…'
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from atelier.common.ids import token_hex
from atelier.storage.db import Artifact
from atelier.storage.blobs import BlobStore
from atelier.storage.registry import NotFound
from atelier.safety.redact import redact_obj
from atelier.safety.crypto import create_secret_once

KINDS = ("image", "poem", "melody", "text")
SECRET_FILE = "url-signing.key"


def create_artifact(db: Session, blobs: BlobStore, *, kind: str, data: bytes, mime: str, model_ref: str = "",
                    key_id: str | None = None, params: dict | None = None) -> Artifact:
    """Store `data` as a blob and record it; returns the committed row. Personal data in the parameters
    (e-mail addresses, phone, ID and card numbers, IPs: atelier/safety/redact.py) is redacted first."""
    art = stored_blob(blobs, kind=kind, data=data, mime=mime, model_ref=model_ref, key_id=key_id, params=params)
    db.add(art)  # 2. the row that points at them
    db.commit()
    return art


def new_artifact_id() -> str:
    return f"art_{token_hex(12)}"


def stored_blob(blobs: BlobStore, *, kind: str, data: bytes, mime: str, model_ref: str = "", key_id: str | None = None,
                params: dict | None = None, artifact_id: str | None = None) -> Artifact:
    """Step 1 of create_artifact: the bytes stored (atomic, deduplicated), and the row that will point at
    them, not yet added to any session (the usage writer adds many in one transaction, under the ids it gave)."""
    if kind not in KINDS:
        raise ValueError(f"artifact kind {kind!r} is not one of {', '.join(KINDS)}")
    digest = blobs.put_bytes(data)
    return Artifact(id=artifact_id or new_artifact_id(), kind=kind, model_ref=model_ref, key_id=key_id,
                    sha256=digest, mime=mime, size=len(data), params=redact_obj(params or {}))


def get_artifact(db: Session, *, artifact_id: str) -> Artifact:
    art = db.get(Artifact, artifact_id)
    if art is None:
        raise NotFound(f"artifact {artifact_id!r} does not exist")
    return art


def list_artifacts(db: Session, *, kind: str | None = None, model: str | None = None, key_id: str | None = None,
                   limit: int = 20, after: str | None = None) -> tuple[list[Artifact], bool]:
    """Newest first; `after` is the id of the last artifact of the previous page. Returns (page, has_more).

    `model` is a name (every version) or `name@version`.
    """
    q = select(Artifact)
    if kind:
        q = q.where(Artifact.kind == kind)
    if model:
        q = q.where(Artifact.model_ref == model if "@" in model
                    else or_(Artifact.model_ref == model, Artifact.model_ref.like(f"{model}@%")))
    if key_id:
        q = q.where(Artifact.key_id == key_id)
    if after:
        last = get_artifact(db, artifact_id=after)
        q = q.where(or_(Artifact.created_at < last.created_at,
                        (Artifact.created_at == last.created_at) & (Artifact.id < last.id)))
    rows = list(db.scalars(q.order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _ts(dt: datetime) -> int:
    import calendar

    return calendar.timegm(dt.timetuple())


def artifact_public(a: Artifact) -> dict:
    return {"id": a.id, "object": "artifact", "kind": a.kind, "model": a.model_ref, "key_id": a.key_id,
            "sha256": a.sha256, "mime": a.mime, "size": a.size, "params": a.params, "created": _ts(a.created_at),
            "content_url": f"/api/artifacts/{a.id}/content"}


# -- signed links -----------------------------------------------------------------------


def signing_secret(home: Path) -> bytes:
    """The installation's 32-byte URL-signing secret (`<home>/url-signing.key`), created once."""
    return create_secret_once(Path(home) / SECRET_FILE)


def signature(secret: bytes, artifact_id: str, expires: int) -> str:
    return hmac.new(secret, f"{artifact_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def signed_path(secret: bytes, artifact_id: str, *, expires: int) -> str:
    return f"/api/artifacts/{artifact_id}/content?expires={expires}&sig={signature(secret, artifact_id, expires)}"


def check_signature(secret: bytes, artifact_id: str, *, expires: int, sig: str, now: float) -> bool:
    # A signature is 64 lowercase hex digits; anything else (non-ASCII included, which compare_digest
    # refuses on str) is simply not one. Bytes are compared, in constant time.
    if len(sig) != 64 or not all(c in "0123456789abcdef" for c in sig):
        return False
    return now <= expires and hmac.compare_digest(signature(secret, artifact_id, expires).encode(), sig.encode())


__all__ = ["create_artifact", "get_artifact", "list_artifacts", "artifact_public", "signing_secret",
           "signed_path", "check_signature", "KINDS"]
