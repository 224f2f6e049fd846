"""Server-sent events for every streaming route (completions, chat, images, poems).

One way to frame events, one set of headers, and one loop that reads an engine's events
while watching for the client to leave (a client that leaves cancels its work).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_CHECK_S = 0.5  # how often a quiet (or busy) stream asks whether its client is still there


def data(obj) -> str:
    """`data: {...}` — OpenAI's framing for completions and chat chunks."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def event(name: str, obj) -> str:
    """`event: name` + `data: {...}` — OpenAI's framing for image generation events."""
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


def response(body: AsyncIterator[str], on_close: Callable[[], None] | None = None) -> StreamingResponse:
    """Stream `body`; `on_close` runs when the stream ends for any reason (done, error, client gone)."""
    async def guarded():
        try:
            async for chunk in body:
                yield chunk
        finally:
            if on_close is not None:
                on_close()

    return StreamingResponse(guarded(), media_type="text/event-stream", headers=HEADERS)


async def batches(request: Request, queue: asyncio.Queue, remaining: int, is_last: Callable[[object], bool]):
    """Yield an engine's events, as lists of every event waiting at once, until `remaining` of them were
    last ones (`is_last`); return early, quietly, if the client disconnects (the caller's `finally`
    cancels the work). A stream that falls behind its engine so catches up in fewer, larger writes."""
    checked = time.monotonic()
    while remaining:
        if queue.empty():
            try:
                async with asyncio.timeout(DISCONNECT_CHECK_S):  # (wait_for would wrap the get in a task)
                    batch = [await queue.get()]
            except TimeoutError:
                batch = []
        else:
            batch = []
        while not queue.empty():
            batch.append(queue.get_nowait())
        if time.monotonic() - checked >= DISCONNECT_CHECK_S:  # events may keep coming: check on a clock
            checked = time.monotonic()
            if await request.is_disconnected():
                return
        if batch:
            remaining -= sum(1 for item in batch if is_last(item))
            yield batch


async def watch(request: Request, queue: asyncio.Queue, remaining: int, is_last: Callable[[object], bool]):
    """`batches`, one event at a time."""
    async for batch in batches(request, queue, remaining, is_last):
        for item in batch:
            yield item
