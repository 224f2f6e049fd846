"""POST /api/music, /api/music/check, /api/music/render — folk tunes in ABC, checked and heard.

A tune is written by an abc-gpt model under the bar-keeping mask (atelier/music/), returned
as ABC with its report, and stored as an artifact (kind "melody", the ABC text) whose MIDI,
WAV and Ogg renderings `GET /api/artifacts/{id}/content?format=…` makes on demand. Writing and
rendering are CPU work: they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from fractions import Fraction
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from atelier.api import sse
from atelier.api.deps import BlobsDep, GenerateKey, ManagerDep, ModeratorDep, SessionDep, SessionsDep, SettingsDep
from atelier.api.errors import bad_request, error_body
from atelier.api.metering import Meter, metered
from atelier.api.models_lookup import acquire
from atelier.api.moderation_policy import check_input, policy_for
from atelier.api.tunes import ABC_MIME, audio_response, read_tune, render_or_400
from atelier.music.abc import parse_unit
from atelier.music.compose import MusicRequestError, TuneRequest
from atelier.storage.artifacts import create_artifact

router = APIRouter(prefix="/api/music", tags=["music"])

MAX_ABC_CHARS = 20_000
MAX_TITLE_CHARS = 200


class TuneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "folk-tunes"
    title: str | None = Field(default=None, max_length=MAX_TITLE_CHARS)
    meter: str = "6/8"
    key: str = "D"
    unit: str = "1/8"
    bars: int | None = Field(default=None, ge=1, description="written bars, pickup aside (instead of form)")
    form: Literal["AABB"] | None = None
    prime: str | None = Field(default=None, max_length=2000, description="opening bars (ABC music) to continue")
    chords: bool = True
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    keep_alive: str | float | None = None


class TuneCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    abc: str = Field(max_length=MAX_ABC_CHARS)


class TuneRender(BaseModel):
    model_config = ConfigDict(extra="forbid")

    abc: str = Field(max_length=MAX_ABC_CHARS)
    format: Literal["mid", "wav", "ogg"] = "wav"
    instrument: str = "fiddle"
    accompaniment: str = "piano"
    chords: bool = True
    transpose: int = Field(default=0, ge=-24, le=24)
    tempo: int | None = Field(default=None, ge=20, le=500,
                              description="quarter notes per minute (else Q: or the meter's)")


# -- writing tunes ----------------------------------------------------------------------------

def tune_request(body: TuneCreate, settings, seed: int) -> TuneRequest:
    """The request as the composer takes it; 400s naming the field, before the model is loaded."""
    if body.bars is not None and body.form is not None:
        raise bad_request("give bars (a length) or form (AABB: two repeated 8-bar parts), not both", "bars")
    if body.bars is not None and body.bars > settings.max_music_bars:
        raise bad_request(f"bars={body.bars} is above the limit of {settings.max_music_bars} "
                          "(ATELIER_MAX_MUSIC_BARS)", "bars")
    if body.n > settings.max_n:
        raise bad_request(f"n={body.n} is above the limit of {settings.max_n} (ATELIER_MAX_N)", "n")
    try:
        unit = parse_unit(body.unit)
    except ValueError as e:
        raise bad_request(str(e), "unit") from None
    form = body.form or ("AABB" if body.bars is None else None)
    return TuneRequest(meter=body.meter, key=body.key, unit=Fraction(unit), bars=body.bars or 16, form=form,
                       prime=body.prime, chords=body.chords, temperature=body.temperature, top_p=body.top_p,
                       seed=seed, title=body.title)


def write_tunes(loaded, request: TuneRequest, n: int, on_bar=None) -> list:
    """n tunes, seeds request.seed, +1, …; one model call at a time (the lock)."""
    from dataclasses import replace

    out = []
    with loaded.lock:
        for i in range(n):
            tune_request = replace(request, seed=request.seed + i)
            out.append(loaded.servable.compose(tune_request, on_bar=(lambda text, i=i: on_bar(i, text))
                                              if on_bar else None))
    return out


def store_tunes(sessions, blobs, tunes, *, model_ref: str, key_id: str | None, params: dict) -> list[dict]:
    out = []
    with sessions() as db:
        for t in tunes:
            art = create_artifact(db, blobs, kind="melody", data=t.abc.encode(), mime=ABC_MIME, model_ref=model_ref,
                                  key_id=key_id, params=params | {"seed": t.seed})
            content = f"/api/artifacts/{art.id}/content"
            out.append({"abc": t.abc, "report": t.report, "seed": t.seed, "artifact_id": art.id,
                        "urls": {fmt: f"{content}?format={fmt}" for fmt in ("abc", "mid", "wav", "ogg")}})
    return out


@router.post("")
async def create(body: TuneCreate, request: Request, db: SessionDep, settings: SettingsDep, manager: ManagerDep,
                 blobs: BlobsDep, sessions: SessionsDep, moderator: ModeratorDep, key: GenerateKey,
                 meter: Meter = Depends(metered("music"))):
    """Write n tunes in the meter, key and form asked for: every one parses and every bar scans."""
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    tune_req = tune_request(body, settings, seed)
    check_input(moderator, policy_for(settings, key), [body.title or ""], param="title", sessions=sessions,
                key_id=key.id, where="music")
    loaded = await acquire(manager, db, body.model, key=key, tasks=("music-generation",), keep_alive=body.keep_alive)
    meter.model = loaded.ref
    params = body.model_dump(exclude={"stream", "keep_alive", "n", "seed"})
    if body.stream:
        return stream_tunes(request, loaded, manager, body, tune_req, sessions, blobs, key, params)
    try:
        tunes = await run_in_threadpool(write_tunes, loaded, tune_req, body.n)
    except MusicRequestError as e:
        raise bad_request(str(e), e.param) from None
    finally:
        manager.release(loaded, body.keep_alive)
    meter.tokens = sum(t.tokens for t in tunes)
    stored = await run_in_threadpool(store_tunes, sessions, blobs, tunes, model_ref=loaded.ref, key_id=key.id,
                                     params=params)
    return {"object": "music.tunes", "created": int(time.time()), "model": loaded.ref, "tunes": stored}


class Abandoned(Exception):
    """A streamed tune whose client has left."""


def stream_tunes(request: Request, loaded, manager, body: TuneCreate, tune_req: TuneRequest, sessions, blobs, key,
                 params: dict):
    """SSE: `bar` events as each bar is written ({tune, bars, abc so far in canonical form}), then one
    `tune` event per finished tune (as the JSON response has it), then [DONE]; errors as `error`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()  # the client left: the writer stops at its next bar line

    def on_bar(index: int, text: str) -> None:
        if gone.is_set():
            raise Abandoned
        loop.call_soon_threadsafe(queue.put_nowait, ("bar", {"tune": index, "abc": text}))

    def work():
        try:
            tunes = write_tunes(loaded, tune_req, body.n, on_bar=on_bar)
            stored = store_tunes(sessions, blobs, tunes, model_ref=loaded.ref, key_id=key.id, params=params)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", stored))
        except Abandoned:
            return  # nothing stored, and the model's lock is free for the next request
        except MusicRequestError as e:
            loop.call_soon_threadsafe(queue.put_nowait,
                                      ("error", error_body(str(e), param=e.param, code="invalid_value")))
        except Exception as e:  # noqa: BLE001 — reported on the stream: the status line has gone out
            loop.call_soon_threadsafe(queue.put_nowait, ("error", error_body(str(e), type="server_error",
                                                                             code="music_failed")))

    async def body_events():
        task = loop.run_in_executor(None, work)
        while True:
            kind, payload = await queue.get()
            if kind == "bar":
                yield sse.event("bar", payload)
            elif kind == "done":
                for i, tune in enumerate(payload):
                    yield sse.event("tune", {"index": i, "model": loaded.ref, **tune})
                break
            else:
                yield sse.event("error", payload)
                break
            if await request.is_disconnected():
                return
        await task
        yield sse.DONE

    def close() -> None:
        gone.set()
        manager.release(loaded, body.keep_alive)

    return sse.response(body_events(), on_close=close)


@router.post("/check")
async def check(body: TuneCheck, settings: SettingsDep, key: GenerateKey):
    """Check a tune a person wrote: parse errors with line and column, each bar's length, key and meter."""
    return read_tune(body.abc, settings).report()


@router.post("/render")
async def render_tune(body: TuneRender, settings: SettingsDep, key: GenerateKey):
    """ABC → MIDI, WAV or Ogg: the melody and an accompaniment from its chord symbols."""
    tune = read_tune(body.abc, settings)
    data = await render_or_400(tune, body.format, settings, instrument=body.instrument,
                               accompaniment=body.accompaniment, chords=body.chords, transpose=body.transpose,
                               tempo=body.tempo)
    title = (tune.titles[0] if tune.titles else "tune")[:60]
    return audio_response(data, body.format, "".join(c if c.isalnum() else "-" for c in title) or "tune")
