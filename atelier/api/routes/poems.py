"""POST /api/poems, /check, /revise, /suggest (co-writing), and `extra_body={"poem": …}` on the OpenAI routes.

Constrained search is CPU work that takes seconds, so it runs in a worker thread; its
PoemError becomes a 400 (bad request, naming the field) or a 422 (no compliant poem found
within the search budget).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from atelier.api.deps import BlobsDep, GenerateKey, ManagerDep, ModeratorDep, ReadKey, SessionDep, SessionsDep, SettingsDep
from atelier.api.errors import bad_request
from atelier.api.metering import Meter, metered
from atelier.api.moderation_policy import check_input, policy_for
from atelier.api.picture_poems import see_picture
from atelier.api.poem_completion import poet, run_poetry
from atelier import poetry
from atelier.storage.artifacts import create_artifact

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
    keep_alive: str | float | None = None


class PoemCreate(PoemFields):
    form: str
    acrostic: str | None = None
    n: int = Field(default=1, ge=1)
    store: bool = True  # each poem goes to the gallery (artifact kind "poem") with its provenance
    # image → poem: a picture (data URL or base64) whose keywords (ATELIER_IMAGE_TAGGER, or `tagger`)
    # join `keywords`
    image: str | None = None
    tagger: str | None = None
    # each keyword fixed early in a line of its own (the default when there are keywords); false only
    # favours them while sampling, which loses the rarer ones
    place_keywords: bool = True


class PoemSuggest(PoemFields):
    """The poem so far and what to suggest: its next line, or (with `mask`, one true/false per character
    written) replacements for the characters marked false."""

    form: str
    lines: list[str] = Field(default_factory=list, max_length=64)
    mask: list[list[bool]] | None = None
    n: int = Field(default=3, ge=1)


class PoemCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    lines: list[str] | None = None
    form: str | None = None
    rhyme_scheme: str = "pingshui"
    pattern: str | None = None
    suggestions: bool = True
    partial: bool = False  # a poem still being written: pending positions show the tone they will need
    model: str = "tang-poet"
    keep_alive: str | float | None = None


class PoemRevise(PoemFields):
    lines: list[str] = Field(min_length=1)
    keep: list[int] | list[list[bool]]


@router.get("/forms")
def forms(key: ReadKey):
    """Every form with its patterns (近体 and the supported 词牌)."""
    return {"object": "list", "data": poetry.form_catalog()}


@router.post("")
async def compose(body: PoemCreate, db: SessionDep, settings: SettingsDep, manager: ManagerDep, blobs: BlobsDep,
                  moderator: ModeratorDep, sessions: SessionsDep, key: GenerateKey,
                  meter: Meter = Depends(metered("poems"))):
    """Write poems that obey a form, each with its compliance report."""
    keywords = body.keywords if isinstance(body.keywords, list) else [body.keywords or ""]
    check_input(moderator, policy_for(settings, key), [body.title or "", body.acrostic or "", *keywords], param="title",
                sessions=sessions, key_id=key.id, where="poems")
    args = body.model_dump(exclude={"model", "keep_alive", "store", "image", "tagger"})
    picture, stored = None, dict(args)
    if body.image is not None:
        picture, digest = await see_picture(manager, db, settings, body.image, key=key, tagger=body.tagger,
                                            param="image")
        args["keywords"] = [k for k in keywords if k] + [k["keyword"] for k in picture["keywords"]]
        stored |= {"image_sha256": digest, "image_keywords": [k["keyword"] for k in picture["keywords"]],
                   "tagger": picture["model"]}
    async with poet(manager, db, body.model, body.keep_alive, key=key) as (loaded, model, tokenizer):
        out = await run_poetry(poetry.compose, model, tokenizer, max_n=settings.max_n, **args)
    meter.model, meter.tokens = loaded.ref, sum(len(p["text"]) for p in out["poems"])
    if body.store:
        await run_in_threadpool(store_poems, sessions, blobs, out["poems"], model_ref=loaded.ref, key_id=key.id,
                                params=stored | {"seed": out["seed"]})
    return out | {"model": loaded.ref} | ({"picture": picture} if picture else {})


def store_poems(sessions, blobs, poems: list[dict], *, model_ref: str, key_id: str, params: dict) -> None:
    """Each poem as a gallery artifact (kind "poem": its title and text, UTF-8) with every request parameter,
    its own seed, form pattern and rhyme group; `artifact_id` is added to the poem."""
    with sessions() as db:
        for poem in poems:
            art = create_artifact(db, blobs, kind="poem", data=f"{poem['title']}\n{poem['text']}\n".encode(),
                                  mime="text/plain; charset=utf-8", model_ref=model_ref, key_id=key_id,
                                  params=params | {"seed": poem["seed"], "pattern": poem["pattern"],
                                                   "rhyme_group": poem["rhyme_group"]})
            poem["artifact_id"] = art.id


@router.post("/suggest")
async def suggest(body: PoemSuggest, db: SessionDep, settings: SettingsDep, manager: ManagerDep,
                  moderator: ModeratorDep, sessions: SessionsDep, key: GenerateKey,
                  meter: Meter = Depends(metered("poems"))):
    """Co-writing: n candidates for the next line (or for the masked characters), ranked, each with its line's
    report and the whole compliant poem it belongs to."""
    keywords = body.keywords if isinstance(body.keywords, list) else [body.keywords or ""]
    check_input(moderator, policy_for(settings, key), [body.title or "", *keywords, *body.lines], param="lines",
                sessions=sessions, key_id=key.id, where="poems")
    if sum(len(line) for line in body.lines) > settings.max_prompt_chars:
        raise bad_request(f"the poem so far is longer than {settings.max_prompt_chars} characters "
                          "(ATELIER_MAX_PROMPT_CHARS)", "lines", code="text_too_long")
    args = body.model_dump(exclude={"model", "keep_alive"})
    async with poet(manager, db, body.model, body.keep_alive, key=key) as (loaded, model, tokenizer):
        out = await run_poetry(poetry.suggest, model, tokenizer, max_n=settings.max_n, **args)
    meter.model, meter.tokens = loaded.ref, sum(len(s["line"]) for s in out["suggestions"])
    return out | {"model": loaded.ref}


@router.post("/check")
async def check(body: PoemCheck, db: SessionDep, settings: SettingsDep, manager: ManagerDep, key: GenerateKey):
    """Check a poem a person wrote: tones, rhymes, violations, and the model's suggestions."""
    if (body.text is None) == (body.lines is None):
        raise bad_request("give the poem as text or as lines (one of them)", "text")
    text = body.text if body.text is not None else "".join(body.lines)
    if len(text) > settings.max_prompt_chars:
        raise bad_request(f"the poem has {len(text)} characters; the limit is {settings.max_prompt_chars} "
                          "(ATELIER_MAX_PROMPT_CHARS)", "text", code="text_too_long")
    poem = body.text if body.text is not None else body.lines
    if body.partial:
        return await run_poetry(poetry.check, poem, body.form, body.rhyme_scheme, pattern=body.pattern, partial=True)
    if not body.suggestions:
        return await run_poetry(poetry.check, poem, body.form, body.rhyme_scheme, pattern=body.pattern)
    async with poet(manager, db, body.model, body.keep_alive, key=key) as (_, model, tokenizer):
        return await run_poetry(poetry.check, poem, body.form, body.rhyme_scheme, pattern=body.pattern, model=model,
                                tokenizer=tokenizer)


@router.post("/revise")
async def revise(body: PoemRevise, db: SessionDep, manager: ManagerDep, key: GenerateKey):
    """Keep some lines (or characters) and rewrite the rest under the same constraints."""
    async with poet(manager, db, body.model, body.keep_alive, key=key) as (loaded, model, tokenizer):
        out = await run_poetry(poetry.revise, model, tokenizer, **body.model_dump(exclude={"model", "keep_alive"}))
    return out | {"model": loaded.ref}
