"""POST /api/poems, /api/poems/check, /api/poems/revise, and `extra_body={"poem": …}` on the OpenAI routes.

Constrained search is CPU work that takes seconds, so it runs in a worker thread; its
PoemError becomes a 400 (bad request, naming the field) or a 422 (no compliant poem found
within the search budget).
"""

from __future__ import annotations

import json
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from atelier.api.deps import GenerateKey, ReadKey, SessionDep, SettingsDep
from atelier.api.errors import APIError, bad_request
from atelier.api.models_lookup import load_text_model
from atelier import poetry

router = APIRouter(prefix="/api/poems", tags=["poems"])


class PoemFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "tang-poet"
    form: str | None = None
    title: str | None = None
    keywords: str | list[str] | None = None
    rhyme: str = "auto"
    rhyme_scheme: str = "pingshui"
    script: str = "simplified"
    pattern: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)


class PoemCreate(PoemFields):
    form: str
    acrostic: str | None = None
    n: int = Field(default=1, ge=1)


class PoemCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    lines: list[str] | None = None
    form: str | None = None
    rhyme_scheme: str = "pingshui"
    pattern: str | None = None
    suggestions: bool = True
    model: str = "tang-poet"


class PoemRevise(PoemFields):
    lines: list[str] = Field(min_length=1)
    keep: list[int] | list[list[bool]]


async def _run(fn, *args, **kwargs):
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except poetry.PoemError as e:
        raise APIError(e.status, str(e), param=e.param,
                       code="poem_unsatisfiable" if e.status == 422 else "invalid_value") from None


@router.get("/forms")
def forms(key: ReadKey):
    """Every form with its patterns (近体 and the supported 词牌)."""
    return {"object": "list", "data": poetry.form_catalog()}


@router.post("")
async def compose(body: PoemCreate, request: Request, db: SessionDep, settings: SettingsDep, key: GenerateKey):
    """Write poems that obey a form, each with its compliance report."""
    loaded = load_text_model(request, db, body.model)
    args = body.model_dump(exclude={"model"})
    out = await _run(poetry.compose, loaded.model, loaded.tokenizer, max_n=settings.max_n, **args)
    return out | {"model": loaded.ref}


@router.post("/check")
async def check(body: PoemCheck, request: Request, db: SessionDep, settings: SettingsDep, key: GenerateKey):
    """Check a poem a person wrote: tones, rhymes, violations, and the model's suggestions."""
    if (body.text is None) == (body.lines is None):
        raise bad_request("give the poem as text or as lines (one of them)", "text")
    text = body.text if body.text is not None else "".join(body.lines)
    if len(text) > settings.max_prompt_chars:
        raise bad_request(f"the poem has {len(text)} characters; the limit is {settings.max_prompt_chars} "
                          "(ATELIER_MAX_PROMPT_CHARS)", "text", code="text_too_long")
    model = tokenizer = None
    if body.suggestions:
        loaded = load_text_model(request, db, body.model)
        model, tokenizer = loaded.model, loaded.tokenizer
    return await _run(poetry.check, body.text if body.text is not None else body.lines, body.form,
                      body.rhyme_scheme, pattern=body.pattern, model=model, tokenizer=tokenizer)


@router.post("/revise")
async def revise(body: PoemRevise, request: Request, db: SessionDep, key: GenerateKey):
    """Keep some lines (or characters) and rewrite the rest under the same constraints."""
    loaded = load_text_model(request, db, body.model)
    out = await _run(poetry.revise, loaded.model, loaded.tokenizer, **body.model_dump(exclude={"model"}))
    return out | {"model": loaded.ref}


async def poem_completion(request: Request, body, loaded, *, chat: bool):
    """`extra_body={"poem": {...}}` on completions/chat: constrained poems in OpenAI's shape."""
    try:
        constraints = poetry.poem_constraints_from_extra_body(body.poem)
    except poetry.PoemError as e:
        raise APIError(400, str(e), param=f"poem.{e.param}" if e.param != "poem" else "poem") from None
    settings = request.app.state.settings
    if chat and "title" not in constraints and "keywords" not in constraints:
        users = [m.text().strip() for m in body.messages if m.role == "user"]
        theme = "".join(c for c in (users[-1] if users else "") if "\u4e00" <= c <= "\u9fff")
        if theme:
            constraints["title" if len(theme) <= 12 else "keywords"] = theme[:12]
    constraints.setdefault("n", body.n)
    constraints.setdefault("seed", body.seed)
    constraints.setdefault("temperature", body.temperature)
    out = await _run(poetry.compose, loaded.model, loaded.tokenizer, max_n=settings.max_n, **constraints)
    rid, created = secrets.token_hex(12), int(time.time())
    usage = {"prompt_tokens": 0, "completion_tokens": sum(len(p["text"]) for p in out["poems"])}
    usage["total_tokens"] = usage["completion_tokens"]
    base = {"created": created, "model": loaded.ref, "system_fingerprint": f"atelier-{loaded.ref}",
            "poems": out["poems"], "seed": out["seed"]}
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": p["text"]}, "logprobs": None,
                    "finish_reason": "stop"} for i, p in enumerate(out["poems"])]
        whole = base | {"id": f"chatcmpl-{rid}", "object": "chat.completion", "choices": choices, "usage": usage}
    else:
        choices = [{"text": p["text"], "index": i, "logprobs": None, "finish_reason": "stop"}
                   for i, p in enumerate(out["poems"])]
        whole = base | {"id": f"cmpl-{rid}", "object": "text_completion", "choices": choices, "usage": usage}
    if not body.stream:
        return whole
    # The search is not incremental: each poem streams as one chunk, then [DONE].

    async def events():
        for c in choices:
            if chat:
                delta = {"role": "assistant", "content": c["message"]["content"]}
                chunk = {"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": "stop"}
                obj = "chat.completion.chunk"
            else:
                chunk, obj = c, "text_completion"
            yield f"data: {json.dumps(base | {'id': whole['id'], 'object': obj, 'choices': [chunk]}, ensure_ascii=False)}\n\n"
        if body.stream_options and body.stream_options.include_usage:
            yield f"data: {json.dumps({'id': whole['id'], 'object': whole['object'], 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
