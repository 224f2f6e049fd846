"""POST /v1/moderations in OpenAI's shape, answered by the lexicon moderator (atelier/safety/moderation.py).

`input` is a string, a list of strings (one result each), or a list of `{"type": "text", "text"}`
parts (one result for all of them, as OpenAI answers a multi-modal input); image parts are
refused. `model` may be omitted, `atelier-lexicon-1`, or one of OpenAI's moderation model names
(answered by the same lexicon; the response names the model that answered). Scores are 1.0 for a
lexicon hit and 0.0 otherwise, not probabilities.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from atelier.api.deps import GenerateKey, ModeratorDep, SettingsDep
from atelier.api.errors import bad_request
from atelier.safety.moderation import CATEGORIES

router = APIRouter(tags=["moderations"])

MODEL = "atelier-lexicon-1"
MODELS = (MODEL, "omni-moderation-latest", "omni-moderation-2024-09-26", "text-moderation-latest",
          "text-moderation-stable")
MAX_INPUTS = 32

class ModerationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Any  # str | list[str] | list[{"type": "text", "text": str}], checked by input_texts for clear errors
    model: str | None = None


def input_texts(value: Any, max_chars: int) -> list[str]:
    """The texts to check, one per result; a 400 naming `input` for anything else."""
    shapes = "a string, a list of strings, or a list of {\"type\": \"text\", \"text\": ...} parts"
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        if not value:
            raise bad_request("input is an empty list; give " + shapes, "input")
        if len(value) > MAX_INPUTS:
            raise bad_request(f"input has {len(value)} items; the limit is {MAX_INPUTS}", "input",
                              code="too_many_inputs")
        if all(isinstance(v, str) for v in value):
            texts = value
        elif all(isinstance(v, dict) for v in value):
            parts = []
            for i, part in enumerate(value):
                kind = part.get("type")
                if kind == "image_url":
                    raise bad_request(f"input[{i}] is an image_url part; Atelier's moderation reads text only",
                                      "input", code="unsupported_input_type")
                if kind != "text" or set(part) != {"type", "text"} or not isinstance(part["text"], str):
                    raise bad_request(f"input[{i}] must be {{\"type\": \"text\", \"text\": <string>}}, not "
                                      f"{str(part)[:100]}", "input")
                parts.append(part["text"])
            texts = ["\n".join(parts)]  # one multi-modal input → one result, as OpenAI answers it
        else:
            raise bad_request("input mixes strings and other values; give " + shapes, "input")
    else:
        raise bad_request(f"input must be {shapes}, not {type(value).__name__}", "input")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            where = "input" if isinstance(value, str) or len(texts) < len(value) else f"input[{i}]"
            raise bad_request(f"{where} has {len(text)} characters; the limit is {max_chars} "
                              "(ATELIER_MAX_PROMPT_CHARS)", "input", code="prompt_too_long")
    return texts


def openai_result(result) -> dict:
    """One entry of `results`, with every category OpenAI's SDK expects."""
    return {"flagged": result.flagged, "categories": result.categories, "category_scores": result.category_scores,
            "category_applied_input_types": {c: ["text"] for c in CATEGORIES}}


@router.post("/v1/moderations")
def create_moderation(body: ModerationCreate, key: GenerateKey, settings: SettingsDep, moderator: ModeratorDep):
    """Classify each input against the moderation lexicon, in OpenAI's response shape."""
    if body.model is not None and body.model not in MODELS:
        raise bad_request(f"model={body.model!r} is not a moderation model here; use one of {', '.join(MODELS)} "
                          f"(all answered by {MODEL})", "model", code="model_not_found")
    texts = input_texts(body.input, settings.max_prompt_chars)
    return {"id": f"modr-{uuid.uuid4().hex}", "model": MODEL,
            "results": [openai_result(moderator.check(t)) for t in texts]}
