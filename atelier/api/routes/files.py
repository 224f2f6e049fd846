"""POST/GET/DELETE /v1/files: training data, validated on upload, stored by content hash."""

from __future__ import annotations

import calendar
import hashlib
import secrets

from fastapi.concurrency import run_in_threadpool
from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import Response
from sqlalchemy import select

from atelier.api.deps import BlobsDep, SessionDep, SettingsDep, TrainKey
from atelier.api.errors import APIError, bad_request
from atelier.api.security_headers import content_disposition
from atelier.api.uploads import get_file, read_limited
from atelier.safety.redact import redact
from atelier.storage.ownership import is_admin
from atelier.storage.db import File, Job
from atelier.storage import audit
from atelier.training.uploads import PURPOSES, UploadError, check_upload

router = APIRouter(prefix="/v1/files", tags=["files"])
ACTIVE_JOB_STATES = ("validating_files", "queued", "running")


def file_public(f: File) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": calendar.timegm(f.created_at.timetuple()),
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "format": f.format,
            "records": f.records, "sha256": f.sha256}


@router.post("")
async def upload(db: SessionDep, settings: SettingsDep, blobs: BlobsDep, key: TrainKey,
                 file: UploadFile, purpose: str = Form(...)):
    """Upload a training file; an identical file with the same purpose returns the existing record."""
    if purpose not in PURPOSES:
        raise bad_request(f"purpose {purpose!r} is not supported; use one of {', '.join(PURPOSES)}", "purpose")
    data = await read_limited(file, settings.max_upload_bytes)
    filename = redact((file.filename or "upload").rsplit("/", 1)[-1]).text[:256]  # names can carry personal data
    # Checking, hashing and sealing tens of megabytes is CPU work: off the event loop, so other
    # requests are not held up while an upload is processed.
    try:
        checked = await run_in_threadpool(check_upload, filename, data, max_zip_bytes=settings.max_upload_bytes * 4)
    except UploadError as e:
        raise bad_request(str(e), e.param, code="invalid_file") from None
    digest = await run_in_threadpool(lambda: hashlib.sha256(data).hexdigest())
    existing = db.scalar(select(File).where(File.sha256 == digest, File.purpose == purpose, File.key_id == key.id))
    if existing is not None:
        return file_public(existing) | {"duplicate": True}
    await run_in_threadpool(blobs.put_bytes, data)  # atomic: temp file, fsync, rename
    f = File(id="file-" + secrets.token_hex(12), filename=filename, purpose=purpose, format=checked.format,
             records=checked.records, bytes=len(data), sha256=digest, key_id=key.id)
    db.add(f)
    db.commit()
    audit.record(db, action="file.upload", target=f.id, key_id=key.id, detail={"sha256": digest, "bytes": len(data)})
    return file_public(f)


@router.get("")
def list_files(db: SessionDep, key: TrainKey, purpose: str | None = None, limit: int = Query(100, ge=1, le=1000)):
    """Uploaded files, newest first."""
    q = select(File).order_by(File.created_at.desc()).limit(limit)
    if not is_admin(key):  # a key sees its own files; an admin sees everyone's
        q = q.where(File.key_id == key.id)
    if purpose:
        q = q.where(File.purpose == purpose)
    return {"object": "list", "data": [file_public(f) for f in db.scalars(q)], "has_more": False}


@router.get("/{file_id}")
def retrieve(file_id: str, db: SessionDep, key: TrainKey):
    """One file's record."""
    return file_public(get_file(db, file_id, key=key))


@router.get("/{file_id}/content")
def content(file_id: str, db: SessionDep, blobs: BlobsDep, key: TrainKey):
    """The file's bytes."""
    f = get_file(db, file_id, key=key)
    audit.record(db, action="file.download", target=file_id, key_id=key.id)
    return Response(blobs.get_bytes(f.sha256), media_type="application/octet-stream",
                    headers={"Content-Disposition": content_disposition(f.filename)})


@router.delete("/{file_id}")
def delete(file_id: str, db: SessionDep, blobs: BlobsDep, key: TrainKey):
    """Delete a file (refused while a job uses it); its bytes go when no other file shares them."""
    f = get_file(db, file_id, key=key)
    busy = db.scalar(select(Job).where(Job.status.in_(ACTIVE_JOB_STATES),
                                       (Job.training_file == file_id) | (Job.validation_file == file_id)))
    if busy is not None:
        raise APIError(409, f"file {file_id!r} is used by job {busy.id} ({busy.status})", param="file_id",
                       code="file_in_use")
    db.delete(f)
    db.commit()
    if db.scalar(select(File).where(File.sha256 == f.sha256)) is None:
        blobs.path(f.sha256).unlink(missing_ok=True)
    audit.record(db, action="file.delete", target=file_id, key_id=key.id)
    return {"id": file_id, "object": "file", "deleted": True}
