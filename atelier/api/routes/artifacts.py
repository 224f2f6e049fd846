"""GET /api/artifacts, /api/artifacts/{id}, /api/artifacts/{id}/content — the gallery.

A key sees the artifacts it created; an admin key sees all of them and can filter by key.
The content route also answers signed links (`?expires=…&sig=…`, as handed out for
`response_format="url"`) without a key, until they expire.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from atelier.storage import audit
from atelier.api.deps import BlobsDep, ReadKey, SettingsDep, StoredSessionDep, request_key
from atelier.api.errors import APIError, bad_request, not_found
from atelier.api.security_headers import content_disposition
from atelier.storage.artifacts import (KINDS, artifact_public, check_signature, get_artifact, list_artifacts,
                                        signing_secret)
from atelier.storage.db import ApiKey, Artifact
from atelier.storage.registry import NotFound
from atelier.api.tunes import ABC_MIME, FORMATS, read_tune, render_or_400
from atelier.safety.keys import has_scope

router = APIRouter(prefix="/api/artifacts", tags=["artifacts"])


def _visible(db, artifact_id: str, key: ApiKey) -> Artifact:
    try:
        art = get_artifact(db, artifact_id=artifact_id)
    except NotFound:
        art = None
    if art is None or (not has_scope(key, "admin") and art.key_id != key.id):
        raise not_found(f"artifact {artifact_id!r} does not exist", "artifact_id")
    return art


@router.get("")
def list_all(db: StoredSessionDep, key: ReadKey, kind: str | None = None, model: str | None = None,
             key_id: str | None = None, limit: int = Query(default=20, ge=1, le=100), after: str | None = None):
    """Newest first, `limit` per page; pass the last id as `after` for the next page."""
    if kind is not None and kind not in KINDS:
        raise bad_request(f"kind={kind!r} is not one of {', '.join(KINDS)}", "kind")
    if not has_scope(key, "admin"):
        if key_id not in (None, key.id):
            raise APIError(403, "only an admin key can list other keys' artifacts", type="permission_error",
                           param="key_id", code="insufficient_scope")
        key_id = key.id
    if after is not None:
        _visible(db, after, key)
    rows, more = list_artifacts(db, kind=kind, model=model, key_id=key_id, limit=limit, after=after)
    data = [artifact_public(a) for a in rows]
    return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/{artifact_id}")
def retrieve(artifact_id: str, db: StoredSessionDep, key: ReadKey):
    """One artifact with its provenance (model@version, parameters, seed, key, time, sha256)."""
    return artifact_public(_visible(db, artifact_id, key))


@router.get("/{artifact_id}/content")
async def content(artifact_id: str, request: Request, db: StoredSessionDep, settings: SettingsDep, blobs: BlobsDep,
                  expires: int | None = Query(None, ge=-(2**63), le=2**63 - 1), sig: str | None = None,
                  format: str | None = Query(None, description="tunes (kind melody): abc (stored), mid, wav or ogg")):
    """The artifact's bytes: with a key, or through a signed link that has not expired. A tune is stored as
    ABC; `format=mid|wav|ogg` renders it (melody and chord accompaniment, default instruments)."""
    if sig is not None or expires is not None:
        secret = signing_secret(settings.home_dir)
        if expires is None or sig is None or not check_signature(secret, artifact_id, expires=expires, sig=sig,
                                                                  now=time.time()):
            expired = expires is not None and expires < time.time()
            raise APIError(403, "this link has expired; ask for a new one" if expired else "invalid link signature",
                           type="permission_error", param="sig", code="url_expired" if expired else "invalid_signature")
        try:
            art = get_artifact(db, artifact_id=artifact_id)
        except NotFound:
            raise not_found(f"artifact {artifact_id!r} does not exist", "artifact_id") from None
        maker = db.get(ApiKey, art.key_id) if art.key_id else None
        if maker is not None and maker.revoked_at is not None:  # a link dies with the key it was made for
            raise APIError(403, "this link was made for a key that has been revoked", type="permission_error",
                           param="sig", code="key_revoked")
    else:
        key = request_key(request, db)
        if not has_scope(key, "read"):
            raise APIError(403, "this key cannot read artifacts", type="permission_error", code="insufficient_scope")
        art = _visible(db, artifact_id, key)
    audit.record(db, action="artifact.download", target=art.id, key_id=getattr(request.state, "key_id", None),
                 detail={"via": "signed link" if sig is not None else "key"})
    if not blobs.path(art.sha256).exists():
        raise APIError(410, f"the bytes of artifact {artifact_id!r} are gone from the blob store", code="blob_missing")
    data = blobs.get_bytes(art.sha256)
    if format is not None:
        return await rendered(art, data, format, settings)
    ext = {"image/png": ".png", "text/plain": ".txt", "application/json": ".json", ABC_MIME: ".abc"}.get(art.mime, "")
    return Response(data, media_type=art.mime,
                    headers={"Content-Disposition": content_disposition(f"{art.id}{ext}", "inline"),
                             "Cache-Control": "private, max-age=3600", "ETag": f'"{art.sha256}"'})


async def rendered(art: Artifact, data: bytes, fmt: str, settings) -> Response:
    """A stored tune in another format: abc as stored, or rendered to mid, wav or ogg."""
    if art.kind != "melody":
        raise bad_request(f"format applies to tunes (kind melody); artifact {art.id!r} is {art.kind}", "format")
    if fmt != "abc" and fmt not in FORMATS:
        raise bad_request(f"format={fmt!r} is not one of abc, {', '.join(FORMATS)}", "format")
    if fmt != "abc":
        data = await render_or_400(read_tune(data.decode("utf-8"), settings), fmt, settings)
    return Response(data, media_type=FORMATS.get(fmt, ABC_MIME),
                    headers={"Content-Disposition": content_disposition(f"{art.id}.{fmt}", "attachment"),
                             "Cache-Control": "private, max-age=3600"})
