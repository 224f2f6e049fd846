"""Response headers that keep the studio and downloads safe.

- `studio_headers`: an ASGI middleware adding a Content-Security-Policy (same-origin scripts,
  styles and requests only, no inline code or eval; images may also be data:/blob: URLs, which
  the studio makes from generated PNGs; media may be blob: URLs too, the Music tab's rendered WAV),
  `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` to
  every response under /studio. `connect-src` also allows blob: (only the page's own blobs can be
  fetched, so nothing leaves), which lets a generated image shown from a blob: URL be read back.
- `content_disposition`: a Content-Disposition header for a user-chosen file name (RFC 6266):
  an ASCII `filename="…"` fallback with quotes, backslashes and control characters removed,
  plus `filename*=UTF-8''…` with the exact name percent-encoded (RFC 5987).
"""

from __future__ import annotations

import re
from urllib.parse import quote

STUDIO_PREFIX = "/studio"
STUDIO_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
              "script-src 'self'; connect-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; "
              "form-action 'self'")
STUDIO_HEADERS = [(b"content-security-policy", STUDIO_CSP.encode()),
                  (b"x-content-type-options", b"nosniff"),
                  (b"referrer-policy", b"no-referrer")]


def studio_headers(app):
    """Add STUDIO_HEADERS to responses for /studio and /studio/… (the rest of the app is untouched)."""

    async def asgi(scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != STUDIO_PREFIX and not path.startswith(STUDIO_PREFIX + "/"):
            return await app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k for k, _ in STUDIO_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = message | {"headers": headers + STUDIO_HEADERS}
            await send(message)

        return await app(scope, receive, send_with_headers)

    return asgi


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """`attachment; filename="a_b.jsonl"; filename*=UTF-8''a%22b.jsonl` for any name, safely.

        >>> content_disposition('雪"; x=y.jsonl')
        'attachment; filename="_ x=y.jsonl"; filename*=UTF-8\\'\\'%E9%9B%AA%22%3B%20x%3Dy.jsonl'
    """
    # The fallback: printable ASCII only, without the characters that end or escape a quoted string
    # (and without ; or , which naive parsers split on).
    ascii_name = re.sub(r'[^\x20-\x7e]|["\\;,]', "_", filename)
    ascii_name = re.sub(r"_+", "_", ascii_name).strip() or "download"
    # The exact name: RFC 5987 attr-chars stay, everything else is percent-encoded UTF-8.
    exact = quote(filename, safe="!#$&+-.^_`|~", encoding="utf-8", errors="replace")
    return f'{disposition}; filename="{ascii_name}"; filename*=UTF-8\'\'{exact}'
