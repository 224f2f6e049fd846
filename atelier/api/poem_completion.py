"""`extra_body={"poem": …}` on /v1/completions and /v1/chat/completions: constrained poems in OpenAI's shape.

Constrained search is CPU work that takes seconds, so it runs in a worker thread; its
PoemError becomes a 400 (bad request, naming the field) or a 422 (no compliant poem found
within the search budget).
"""

from __future__ import annotations

import time

from contextlib import asynccontextmanager

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from atelier import poetry
from atelier.api import sse
from atelier.api.errors import APIError, bad_request
from atelier.api.models_lookup import acquire
from atelier.api.picture_poems import see_picture
from atelier.common.ids import token_hex
from atelier.runtime.manager import ModelManager


async def run_poetry(fn, *args, **kwargs):
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except poetry.PoemError as e:
        raise APIError(e.status, str(e), param=e.param,
                       code="poem_unsatisfiable" if e.status == 422 else "invalid_value") from None


@asynccontextmanager
async def poet(manager: ModelManager, db, ref: str, keep_alive=None, *, key):
    """(loaded, model, tokenizer) of a language model held for one poem search. The search decodes
    characters under tone and rhyme masks, so it needs tokens that are single characters."""
    loaded = await acquire(manager, db, ref, key=key, tasks=("text-generation",), keep_alive=keep_alive)
    try:
        try:
            model, tokenizer = loaded.servable.poet()
        except (AttributeError, ValueError) as e:
            why = str(e) if isinstance(e, ValueError) else "its family has no character view"
            raise bad_request(f"model {loaded.ref} ({loaded.family.name}) cannot write constrained poems: {why}",
                              "model", code="model_not_supported") from None
        yield loaded, model, tokenizer
    finally:
        manager.release(loaded, keep_alive)


async def poem_completion(request: Request, body, manager: ModelManager, db, *, key, chat: bool,
                          poem: dict | None = None, picture: tuple[str, str] | None = None):
    """`extra_body={"poem": {...}}` on completions/chat: constrained poems in OpenAI's shape. `picture`
    ((param, data URL), from a chat's image_url part) adds the picture's keywords, placed one per line."""
    try:
        constraints = poetry.poem_constraints_from_extra_body(poem if poem is not None else body.poem)
    except poetry.PoemError as e:
        raise APIError(400, str(e), param=f"poem.{e.param}" if e.param != "poem" else "poem") from None
    settings = request.app.state.settings
    seen = None
    if picture is not None:
        param, url = picture
        seen, _ = await see_picture(manager, db, settings, url, key=key, tagger=None, param=param)
        given = constraints.get("keywords") or []
        constraints["keywords"] = ([given] if isinstance(given, str) else list(given)) + \
            [k["keyword"] for k in seen["keywords"]]
        constraints.setdefault("place_keywords", True)
    if chat and "title" not in constraints and "keywords" not in constraints:
        users = [m.text().strip() for m in body.messages if m.role == "user"]
        theme = "".join(c for c in (users[-1] if users else "") if "\u4e00" <= c <= "\u9fff")
        if theme:
            constraints["title" if len(theme) <= 12 else "keywords"] = theme[:12]
    constraints.setdefault("n", body.n)
    constraints.setdefault("seed", body.seed)
    constraints.setdefault("temperature", body.temperature)
    async with poet(manager, db, body.model, body.keep_alive, key=key) as (loaded, model, tokenizer):
        out = await run_poetry(poetry.compose, model, tokenizer, max_n=settings.max_n, **constraints)
    rid, created = token_hex(12), int(time.time())
    usage = {"prompt_tokens": 0, "completion_tokens": sum(len(p["text"]) for p in out["poems"])}
    usage["total_tokens"] = usage["completion_tokens"]
    base = {"created": created, "model": loaded.ref, "system_fingerprint": f"atelier-{loaded.ref}",
            "poems": out["poems"], "seed": out["seed"]} | ({"picture": seen} if seen else {})
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
            yield sse.data(base | {"id": whole["id"], "object": obj, "choices": [chunk]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse.data({"id": whole["id"], "object": whole["object"], "choices": [], "usage": usage})
        yield sse.DONE

    return sse.response(events())
