"""POST /api/redact: personal data in a text replaced by [EMAIL], [PHONE], [ID], [CARD], [IP]
(atelier/safety/redact.py says what is caught and what is not)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from atelier.api.deps import GenerateKey, SettingsDep
from atelier.api.errors import bad_request
from atelier.safety.redact import redact

router = APIRouter(prefix="/api", tags=["privacy"])


class RedactRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str


@router.post("/redact")
def redact_text(body: RedactRequest, key: GenerateKey, settings: SettingsDep):
    """The text with personal data replaced, and the spans replaced (offsets into the original text)."""
    if len(body.text) > settings.max_prompt_chars:
        raise bad_request(f"text has {len(body.text)} characters; the limit is {settings.max_prompt_chars} "
                          "(ATELIER_MAX_PROMPT_CHARS)", "text", code="prompt_too_long")
    redacted = redact(body.text)
    return {"text": redacted.text, "spans": redacted.spans}
