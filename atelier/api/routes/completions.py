"""POST /v1/completions and /v1/chat/completions: a thin translation onto the text engine."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from atelier.api import sse
from atelier.api.deps import GenerateKey, ManagerDep, MetricsDep, ModeratorDep, SessionDep, SessionsDep, SettingsDep
from atelier.api.errors import APIError, bad_request
from atelier.api.metering import Meter, metered
from atelier.api.moderation_policy import CONTENT_FILTER, OutputGuard, check_input, policy_for
from atelier.api.models_lookup import acquire, unloaded
from atelier.api.poem_completion import poem_completion
from atelier.api.schemas import UNSUPPORTED, ChatRequest, CompletionRequest, SamplingFields
from atelier.common.ids import random_bits, token_hex
from atelier.runtime.errors import EngineClosed
from atelier.runtime.manager import Loaded, ModelManager
from atelier.runtime.sampling import SamplingParams
from atelier.runtime.text_engine import Finished, Sequence, TextChunk
from atelier.storage.usage_writer import UsageWriter

router = APIRouter(prefix="/v1", tags=["completions"])

MAX_CHAT_PICTURES = 1  # image → poem writes one poem about one picture

@dataclass
class Plan:
    """What to generate: prompts (as token ids) × n choices, with shared limits."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    stop: list[str]
    seed: int
    params: SamplingParams


def _check_common(body: SamplingFields, settings) -> None:
    for name, default in UNSUPPORTED.items():
        value = getattr(body, name, None) if name in type(body).model_fields else (body.model_extra or {}).get(name)
        if value is not None and value != default:
            raise bad_request(f"{name} is not supported by Atelier", param=name, code="unsupported_parameter")
    if body.n > settings.max_n:
        raise bad_request(f"n={body.n} is above this server's limit of {settings.max_n} (ATELIER_MAX_N)", "n")
    stops = body.stop_list()
    if len(stops) > settings.max_stop_sequences:
        raise bad_request(f"at most {settings.max_stop_sequences} stop sequences are allowed, got {len(stops)}", "stop")
    if any(not s or len(s) > 64 for s in stops):
        raise bad_request("each stop sequence must be 1 to 64 characters long", "stop")


def _plan(body: SamplingFields, texts: list[str], lm, settings, *,
          max_tokens: int | None, prompt_param: str, logprobs: int | None, chat: bool = False) -> Plan:
    """Tokenise the prompts (the model's own tokenizer; `chat`: the text is a rendered chat template)
    and check every limit against its context."""
    _check_common(body, settings)
    context = lm.context
    prompts = []
    for text in texts:
        if not text.strip():
            raise bad_request(f"{prompt_param} is empty", prompt_param, code="empty_prompt")
        if len(text) > settings.max_prompt_chars:
            raise bad_request(f"{prompt_param} has {len(text)} characters; the limit is {settings.max_prompt_chars} "
                              "(ATELIER_MAX_PROMPT_CHARS)", prompt_param, code="prompt_too_long")
        ids = lm.encode(text, chat=chat)
        if not ids:
            raise bad_request(f"{prompt_param} is no tokens to this model's tokenizer", prompt_param,
                              code="empty_prompt")
        if len(ids) >= context:
            raise bad_request(f"{prompt_param} is {len(ids)} tokens; this model's context is {context} tokens",
                              prompt_param, code="context_length_exceeded")
        prompts.append(ids)
    room = context - max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = min(settings.max_tokens_limit, room)
    if max_tokens > settings.max_tokens_limit:
        raise bad_request(f"max_tokens={max_tokens} is above this server's limit of {settings.max_tokens_limit} "
                          "(ATELIER_MAX_TOKENS_LIMIT)", "max_tokens")
    if max_tokens > room:
        raise bad_request(f"max_tokens={max_tokens} does not fit: the model's context is {context} tokens and the "
                          f"prompt uses {context - room}, so max_tokens must be between 1 and {room}",
                          "max_tokens", code="context_length_exceeded")
    seed = body.seed if body.seed is not None else random_bits(62)
    params = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                            frequency_penalty=body.frequency_penalty, logprobs=logprobs, ignore_eos=body.ignore_eos)
    return Plan(prompts, body.n, max_tokens, body.stop_list(), seed, params)


def _start(plan: Plan, engine, owner: str) -> tuple[list[Sequence], asyncio.Queue]:
    """Submit every choice; choice i of the request uses seed + i. `owner` (the key's id): whose cached prompts
    its sequences may reuse (prefix caching, runtime/text_engine.py)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    seqs = []
    for p, ids in enumerate(plan.prompts):
        for j in range(plan.n):
            index = p * plan.n + j
            seqs.append(engine.submit(Sequence(index=index, prompt_ids=ids, params=plan.params,
                                               max_tokens=plan.max_tokens, stop=plan.stop,
                                               seed=(plan.seed + index) % 2**63, loop=loop, events=events,
                                               owner=owner)))
    return seqs, events


async def _events(request: Request, seqs: list[Sequence], events: asyncio.Queue, metrics):
    """Yield lists of (index, event), what arrived together, until every choice has finished; cancel all if
    the client leaves. Text that arrived together for one choice comes as one chunk (one SSE event, one
    moderation check), and a stream writes each list at once (one write, one wake-up of its client). Tokens are
    counted here as they come, for /metrics and for the request's meter (api/metering.py), and each choice's
    prompt tokens, cached or not, as it finishes; /metrics also has the time from the request's arrival to each
    choice's first token, and between its tokens, as they reach the server."""
    meter = request.state.meter
    arrived = getattr(request.state, "arrived", None) or time.perf_counter()
    last: dict[int, float] = {}  # choice -> when its latest text arrived
    try:
        async for batch in sse.batches(request, events, len(seqs), lambda item: isinstance(item[1], Finished)):
            merged: list[tuple[int, object]] = []
            text_at: dict[int, int] = {}  # choice → where its text chunk is in `merged`
            for index, event in batch:
                if isinstance(event, EngineClosed):
                    raise unloaded(event)
                if isinstance(event, Exception):
                    raise APIError(500, "generation failed", type="server_error", code="generation_failed")
                if isinstance(event, Finished):
                    metrics.prompt(event.prompt_tokens, event.cached_tokens)
                if isinstance(event, TextChunk):
                    meter.tokens += len(event.tokens)
                    metrics.tokens(len(event.tokens))
                    if index in text_at:
                        earlier = merged[text_at[index]][1]
                        merged[text_at[index]] = (index, TextChunk(earlier.text + event.text,
                                                                   earlier.tokens + event.tokens))
                        continue
                    text_at[index] = len(merged)
                merged.append((index, event))
            now, firsts, gaps, together = time.perf_counter(), [], [], 0
            for index, event in merged:
                if isinstance(event, TextChunk) and event.tokens:
                    if index in last:
                        gaps.append(now - last[index])
                    else:
                        firsts.append(now - arrived)
                    together += len(event.tokens) - 1
                    last[index] = now
            metrics.token_times(meter.model, firsts, gaps, together)
            yield merged
    finally:
        for s in seqs:
            s.cancel()


def _usage(finished: dict[int, Finished], plan: Plan) -> dict:
    prompt = sum(len(p) for p in plan.prompts) * plan.n
    completion = sum(f.completion_tokens for f in finished.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in finished.values())}}


def _completion_logprobs(chunks: list, lm, offset0: int = 0) -> dict:
    tokens = [s for c in chunks for s in c.tokens]
    text_offset, pos = [], offset0
    for s in tokens:
        text_offset.append(pos)
        pos += len(lm.token_text(s.token))
    return {"tokens": [lm.token_text(s.token) for s in tokens],
            "token_logprobs": [s.logprob for s in tokens],
            "top_logprobs": [{lm.token_text(t): lp for t, lp in s.top} for s in tokens],
            "text_offset": text_offset}


def _chat_logprobs(chunks: list, lm) -> dict:
    def entry(t, lp):
        text = lm.token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for c in chunks for s in c.tokens]}


def _stream(request: Request, seqs, events, plan: Plan, make_chunk, final_usage: bool, metrics, release,
            guard: OutputGuard, on_done=None):
    async def body():
        finished: dict[int, Finished] = {}
        so_far: dict[int, str] = {}
        out: list[str] = []  # the SSE events of what arrived together: one write
        try:
            async for batch in _events(request, seqs, events, metrics):
                for index, event in batch:
                    if isinstance(event, TextChunk):
                        if index in guard.filtered:
                            continue
                        so_far[index] = so_far.get(index, "") + event.text
                        if guard.allow(index, so_far[index]):
                            out.append(sse.data(make_chunk(index, event, None)))
                        else:  # the choice ends here, without the text that tripped the filter
                            out.append(sse.data(make_chunk(index, None, CONTENT_FILTER)))
                    else:
                        finished[index] = event
                        if index not in guard.filtered:
                            out.append(sse.data(make_chunk(index, None, event.reason)))
                if out and len(finished) < len(seqs):  # the last batch goes with the usage and [DONE]
                    yield "".join(out)
                    out = []
            if len(finished) < len(seqs):
                return  # the client left; nothing more to send
            if on_done is not None:
                on_done({i: (so_far.get(i, ""), f.reason) for i, f in finished.items() if i not in guard.filtered})
            if final_usage:
                out.append(sse.data(make_chunk(None, None, None) | {"choices": [], "usage": _usage(finished, plan)}))
            yield "".join(out) + sse.DONE
        except APIError as e:
            yield "".join(out) + sse.data(e.body()) + sse.DONE  # OpenAI's error shape, mid-stream too

    return sse.response(body(), on_close=release)


def _moderated(guard: OutputGuard, chunks: dict[int, list[TextChunk]], finished: dict[int, Finished]
               ) -> dict[int, tuple[str, str]]:
    """(text, finish_reason) per choice of a whole answer: a flagged one is withheld under `block`."""
    out = {}
    for index, parts in chunks.items():
        text = "".join(c.text for c in parts)
        out[index] = (text, finished[index].reason) if guard.allow(index, text) else ("", CONTENT_FILTER)
    return out


async def _collect(request, seqs, events, metrics, release):
    """Every choice's chunks and finish, for a non-streamed answer; the model is released after."""
    chunks: dict[int, list[TextChunk]] = {s.index: [] for s in seqs}
    finished: dict[int, Finished] = {}
    try:
        async for batch in _events(request, seqs, events, metrics):
            for index, event in batch:
                if isinstance(event, TextChunk):
                    chunks[index].append(event)
                else:
                    finished[index] = event
    finally:
        release()
    if len(finished) < len(seqs):
        raise APIError(499, "client closed the request", code="client_closed")
    return chunks, finished


async def _text_model(manager: ModelManager, db, body: SamplingFields, key) -> Loaded:
    """The model held for this request; its manifest's default sampling fills the fields the request left unset.
    The request's database session is given back here: a generation can last a minute."""
    loaded = await acquire(manager, db, body.model, key=key, tasks=("text-generation",), keep_alive=body.keep_alive)
    db.close()
    for name, value in (getattr(loaded.servable, "manifest", None) or {}).get("defaults", {}).items():
        if name not in body.model_fields_set and name in type(body).model_fields:
            setattr(body, name, value)
    return loaded


def _start_or_release(manager: ModelManager, loaded: Loaded, body: SamplingFields, plan_fn, owner: str):
    """Plan and submit; on a bad request or a closed engine, give the model back first."""
    try:
        plan = plan_fn()
        return plan, *_start(plan, loaded.engine, owner)
    except EngineClosed as e:
        manager.release(loaded, body.keep_alive)
        raise unloaded(e) from None
    except BaseException:
        manager.release(loaded, body.keep_alive)
        raise


def gallery(writer: UsageWriter, *, route: str, plan: Plan, model_ref: str, key_id: str, params: dict):
    """What stores a request's answers (index -> (text, finish_reason)) in the gallery, one artifact of kind
    "text" per choice with every request parameter and its own seed; returns {index: artifact id}. The usage
    writer's thread writes them behind the response (atelier/storage/usage_writer.py says why)."""
    def store(answers: dict[int, tuple[str, str]]) -> dict[int, str]:
        order = sorted(answers.items())
        ids = writer.store([
            {"kind": "text", "data": text.encode(), "mime": "text/plain; charset=utf-8", "model_ref": model_ref,
             "key_id": key_id, "params": params | {"route": route, "index": index, "finish_reason": reason,
                                                    "seed": (plan.seed + index) % 2**63}}
            for index, (text, reason) in order])
        return {index: art_id for (index, _), art_id in zip(order, ids)}

    return store


def _params(body: SamplingFields, exclude: set[str]) -> dict:
    """The request's parameters as given, for an artifact's provenance (personal data is redacted on storing)."""
    return body.model_dump(exclude=exclude | {"stream", "stream_options", "keep_alive", "store"}, exclude_none=True)


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request, db: SessionDep, settings: SettingsDep,
                            manager: ManagerDep, metrics: MetricsDep, moderator: ModeratorDep, sessions: SessionsDep,
                            key: GenerateKey, meter: Meter = Depends(metered("completions"))):
    """Continue a prompt (OpenAI's legacy completions)."""
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_input(moderator, policy_for(settings, key), [t for t in texts if isinstance(t, str)], param="prompt",
                sessions=sessions, key_id=key.id, where="completions")
    if body.poem is not None:
        return await poem_completion(request, body, manager, db, key=key, chat=False)
    if not texts:
        raise bad_request("prompt is empty", "prompt", code="empty_prompt")
    if len(texts) > settings.max_n:
        raise bad_request(f"at most {settings.max_n} prompts per request, got {len(texts)}", "prompt")
    loaded = await _text_model(manager, db, body, key)
    lm = loaded.servable
    plan, seqs, events = _start_or_release(manager, loaded, body, lambda: _plan(
        body, texts, lm, settings, max_tokens=body.max_tokens, prompt_param="prompt", logprobs=body.logprobs or None),
        owner=key.id)
    release = lambda: manager.release(loaded, body.keep_alive)  # noqa: E731
    meter.model, meter.tokens = loaded.ref, sum(len(p) for p in plan.prompts) * plan.n
    meter.prompt = "\n".join(texts)
    guard = OutputGuard(moderator, policy_for(settings, key), sessions=sessions, key_id=key.id, where="completions")
    rid, created = f"cmpl-{token_hex(12)}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": loaded.ref,
            "system_fingerprint": f"atelier-{loaded.ref}"}
    prompt_of = lambda index: texts[index // plan.n]  # noqa: E731
    store = gallery(request.app.state.usage_writer, route="completions", plan=plan, model_ref=loaded.ref, key_id=key.id,
                    params=_params(body, set()) | {"seed": plan.seed}) if body.store else None

    if body.stream:
        echoed: set[int] = set()

        def make_chunk(index, chunk, reason):
            if index is None:
                return dict(base)
            text = chunk.text if chunk else ""
            if body.echo and index not in echoed:
                echoed.add(index)
                text = prompt_of(index) + text
            lp = _completion_logprobs([chunk], lm) if (chunk and body.logprobs) else None
            return base | {"choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": reason}]}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(request, seqs, events, plan, make_chunk, include, metrics, release, guard, on_done=store)

    chunks, finished = await _collect(request, seqs, events, metrics, release)
    answers = _moderated(guard, chunks, finished)
    stored = store(answers) if store else {}
    choices = []
    for index in sorted(chunks):
        text, reason = answers[index]
        prefix = prompt_of(index) if body.echo else ""
        lp = _completion_logprobs(chunks[index], lm, len(prefix)) if body.logprobs is not None and \
            reason != CONTENT_FILTER else None
        choices.append({"text": prefix + text, "index": index, "logprobs": lp, "finish_reason": reason}
                       | ({"artifact_id": stored[index]} if index in stored else {}))
    return base | {"choices": choices, "usage": _usage(finished, plan)}


@router.post("/chat/completions")
async def create_chat_completion(body: ChatRequest, request: Request, db: SessionDep, settings: SettingsDep,
                                 manager: ManagerDep, metrics: MetricsDep, moderator: ModeratorDep,
                                 sessions: SessionsDep, key: GenerateKey,
                                 meter: Meter = Depends(metered("chat"))):
    """Chat: the model's own chat template (a poet like tang-poet takes the last user message as a title)."""
    check_input(moderator, policy_for(settings, key), [m.text() for m in body.messages], param="messages",
                sessions=sessions, key_id=key.id, where="chat")
    pictures = [(f"messages[{i}].content[{j}].image_url.url", url)
                for i, m in enumerate(body.messages) for j, url in m.images()]
    if len(pictures) > MAX_CHAT_PICTURES:
        raise bad_request(f"messages hold {len(pictures)} pictures; a poem is written about one", pictures[1][0],
                          code="too_many_images")
    if pictures:  # image → poem: a five-character quatrain unless extra_body's poem says otherwise
        return await poem_completion(request, body, manager, db, key=key, chat=True,
                                     poem=body.poem if body.poem is not None else {"form": "wujue"},
                                     picture=pictures[0])
    if body.poem is not None:
        return await poem_completion(request, body, manager, db, key=key, chat=True)
    users = [m.text() for m in body.messages if m.role == "user"]
    if not users:
        raise bad_request("messages must contain at least one user message", "messages")
    if not users[-1].strip():
        raise bad_request("the last user message is empty", "messages", code="empty_prompt")
    if sum(len(m.text()) for m in body.messages) > settings.max_prompt_chars:
        raise bad_request(f"messages have {sum(len(m.text()) for m in body.messages)} characters; the limit is "
                          f"{settings.max_prompt_chars} (ATELIER_MAX_PROMPT_CHARS)", "messages", code="prompt_too_long")
    top = body.top_logprobs if body.top_logprobs is not None else 0
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    logprobs = (top or 1) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    loaded = await _text_model(manager, db, body, key)
    lm = loaded.servable
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    plan, seqs, events = _start_or_release(manager, loaded, body, lambda: _plan(
        body, [lm.chat_prompt(messages)], lm, settings, max_tokens=max_tokens, prompt_param="messages",
        logprobs=logprobs, chat=True), owner=key.id)
    release = lambda: manager.release(loaded, body.keep_alive)  # noqa: E731
    meter.model, meter.tokens = loaded.ref, sum(len(p) for p in plan.prompts) * plan.n
    meter.prompt = json.dumps(messages, ensure_ascii=False)
    guard = OutputGuard(moderator, policy_for(settings, key), sessions=sessions, key_id=key.id, where="chat")
    rid, created = f"chatcmpl-{token_hex(12)}", int(time.time())
    base = {"id": rid, "created": created, "model": loaded.ref, "system_fingerprint": f"atelier-{loaded.ref}"}
    trim = (lambda lp: {"content": [e | {"top_logprobs": e["top_logprobs"][:top]} for e in lp["content"]]})  # noqa: E731
    store = gallery(request.app.state.usage_writer, route="chat", plan=plan, model_ref=loaded.ref, key_id=key.id,
                    params=_params(body, {"messages"}) | {"messages": messages, "seed": plan.seed}) \
        if body.store else None

    if body.stream:
        started: set[int] = set()

        def make_chunk(index, chunk, reason):
            if index is None:
                return base | {"object": "chat.completion.chunk"}
            delta = {}
            if index not in started:
                started.add(index)
                delta["role"] = "assistant"
            if chunk:
                delta["content"] = chunk.text
            lp = trim(_chat_logprobs([chunk], lm)) if (chunk and body.logprobs) else None
            return base | {"object": "chat.completion.chunk",
                           "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(request, seqs, events, plan, make_chunk, include, metrics, release, guard, on_done=store)

    chunks, finished = await _collect(request, seqs, events, metrics, release)
    answers = _moderated(guard, chunks, finished)
    stored = store(answers) if store else {}
    choices = [{"index": i,
                "message": {"role": "assistant", "content": answers[i][0]},
                "logprobs": trim(_chat_logprobs(chunks[i], lm)) if body.logprobs and answers[i][1] != CONTENT_FILTER
                else None,
                "finish_reason": answers[i][1]} | ({"artifact_id": stored[i]} if i in stored else {})
               for i in sorted(chunks)]
    return base | {"object": "chat.completion", "choices": choices, "usage": _usage(finished, plan)}


@router.post("/engines/{model:path}/completions")
async def create_engine_completion(model: str, request: Request, db: SessionDep, settings: SettingsDep,
                                   manager: ManagerDep, metrics: MetricsDep, moderator: ModeratorDep,
                                   sessions: SessionsDep, key: GenerateKey,
                                   meter: Meter = Depends(metered("completions"))):
    """Clients of the openai library before 1.0 (`openai.Completion.create(engine=...)`) name the model in the path."""
    try:
        raw = await request.json()
    except ValueError:
        raise bad_request("the body is not valid JSON", None, code="invalid_json") from None
    if not isinstance(raw, dict):
        raise bad_request("the body must be a JSON object", None)
    if raw.get("model") not in (None, model):
        raise bad_request(f"model={raw['model']!r} in the body differs from the engine {model!r} in the path", "model")
    try:
        body = CompletionRequest.model_validate(raw | {"model": model})
    except ValidationError as e:
        raise RequestValidationError([err | {"loc": ("body", *err["loc"])} for err in e.errors()]) from None
    return await create_completion(body, request, db, settings, manager, metrics, moderator, sessions, key, meter)
