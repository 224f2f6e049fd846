"""What every image route shares: OpenAI fields accepted only at Atelier's values, prompt limits,
and storing a PNG as an artifact (with a signed link when asked for one)."""

from __future__ import annotations

import time

from atelier.api.errors import bad_request
from atelier.storage.artifacts import create_artifact, signed_path, signing_secret

# OpenAI fields accepted only at the values that describe what Atelier does (PNG, opaque, …).
ACCEPTED = {"quality": {"auto", "standard", None}, "background": {"auto", "opaque", None},
            "output_format": {"png", None}, "moderation": {"auto", "low", None}, "style": {None},
            "output_compression": {None, 100}, "input_fidelity": {None}, "mask": {None}}


def check_openai_fields(values: dict) -> None:
    for name, ok in ACCEPTED.items():
        # A list or an object (JSON can send either) is no accepted value, and cannot be looked up in a set.
        if name in values and not (isinstance(values[name], (str, int, float, bool, type(None))) and values[name] in ok):
            allowed = ", ".join(sorted(str(v) for v in ok if v is not None)) or "nothing (leave it unset)"
            raise bad_request(f"{name}={values[name]!r} is not supported by Atelier; accepted: {allowed}", name,
                              code="unsupported_parameter")


def check_prompt(text: str, settings, param: str = "prompt", allow_empty: bool = False) -> str:
    if not allow_empty and not text.strip():
        raise bad_request(f"{param} is empty", param, code="empty_prompt")
    if len(text) > settings.max_prompt_chars:
        raise bad_request(f"{param} has {len(text)} characters; the limit is {settings.max_prompt_chars} "
                          "(ATELIER_MAX_PROMPT_CHARS)", param, code="prompt_too_long")
    return text


def store_png(sessions, blobs, png: bytes, *, model_ref: str, key_id: str | None, params: dict):
    """Blob + artifact row, in a fresh session (this runs in a worker thread)."""
    with sessions() as db:
        return create_artifact(db, blobs, kind="image", data=png, mime="image/png",
                               model_ref=model_ref, key_id=key_id, params=params)


def artifact_url(request, settings, artifact_id: str) -> str:
    s = settings
    path = signed_path(signing_secret(s.home_dir), artifact_id, expires=int(time.time()) + s.url_ttl_s)
    return str(request.base_url).rstrip("/") + path
