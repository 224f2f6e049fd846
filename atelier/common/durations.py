"""Ollama-style keep-alive durations: how long an idle model stays loaded."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def parse_keep_alive(value) -> float | None:
    """Seconds to stay loaded once idle, or None for ever. Ollama's forms: 300, "5m", "1h30m"
    is not accepted (one unit), "0" unloads at once, any negative value keeps the model.

    >>> parse_keep_alive("5m"), parse_keep_alive(0), parse_keep_alive(-1)
    (300.0, 0.0, None)
    """
    if isinstance(value, bool):
        raise ValueError(f"keep_alive={value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"keep_alive={value!r} is not a duration: use seconds (300), or a number with a unit "
                             "(500ms, 30s, 5m, 1h); 0 unloads after the request, -1 keeps the model loaded")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    return None if seconds < 0 else seconds
