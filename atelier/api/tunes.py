"""Reading a person's ABC and rendering tunes, for the music routes and the artifacts' `format=`."""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from atelier.api.errors import bad_request
from atelier.api.security_headers import content_disposition
from atelier.music.abc import AbcError, parse
from atelier.music.compose import MusicRequestError
from atelier.music.render import INSTRUMENTS, RenderTooLong, to_midi, to_ogg, to_wav
from atelier.music.score import performance

ABC_MIME = "text/vnd.abc"
FORMATS = {"mid": "audio/midi", "wav": "audio/wav", "ogg": "audio/ogg"}


def read_tune(abc: str, settings):
    """A person's ABC → Tune; 400 naming `abc` (with line and column) when it does not parse."""
    try:
        tune = parse(abc)
    except AbcError as e:
        raise bad_request(str(e), "abc", code="abc_parse_error") from None
    if len(tune.bars) > settings.max_music_bars * 4:
        raise bad_request(f"the tune has {len(tune.bars)} bars; at most {settings.max_music_bars * 4} are read "
                          "(ATELIER_MAX_MUSIC_BARS × 4)", "abc", code="tune_too_long")
    return tune


def render(tune, fmt: str, settings, *, instrument: str = "fiddle", accompaniment: str = "piano", chords: bool = True,
           transpose: int = 0, tempo: int | None = None) -> bytes:
    """A tune → MIDI, WAV or Ogg bytes; ValueError (and RenderTooLong) for what cannot be rendered."""
    for name, value in (("instrument", instrument), ("accompaniment", accompaniment)):
        if value not in INSTRUMENTS:
            raise MusicRequestError(f"{name} {value!r} is not one of {', '.join(INSTRUMENTS)}", name)
    perf = performance(tune, tempo=tempo, transpose=transpose)
    if fmt == "mid":
        return to_midi(perf, melody=instrument, accompaniment=accompaniment, chords=chords)
    audio = to_wav if fmt == "wav" else to_ogg
    return audio(perf, melody=instrument, accompaniment=accompaniment, chords=chords,
                 max_seconds=settings.max_render_seconds)


async def render_or_400(tune, fmt: str, settings, **options) -> bytes:
    try:
        return await run_in_threadpool(render, tune, fmt, settings, **options)
    except RenderTooLong as e:
        raise bad_request(f"{e} (ATELIER_MAX_RENDER_SECONDS={settings.max_render_seconds:g})", "abc",
                          code="render_too_long") from None
    except MusicRequestError as e:
        raise bad_request(str(e), e.param) from None
    except ValueError as e:
        raise bad_request(str(e), "transpose" if "transpose" in str(e) else "abc") from None


def audio_response(data: bytes, fmt: str, name: str) -> Response:
    return Response(data, media_type=FORMATS.get(fmt, ABC_MIME),
                    headers={"Content-Disposition": content_disposition(f"{name}.{fmt}", "attachment")})
