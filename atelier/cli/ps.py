"""`atelier ps`: the models the server holds in memory now, like `ollama ps`."""

from __future__ import annotations

import time

from rich.table import Table

from atelier.cli.http import KeyOpt, UrlOpt, call, console
from atelier.cli.models import _size


def _until(expires_at: float | None, now: float) -> str:
    """When an idle model will be unloaded, in words: "4 minutes from now", "forever", "now"."""
    if expires_at is None:  # keep_alive < 0: stays until unloaded by hand or evicted
        return "forever"
    left = int(expires_at - now)
    if left <= 0:  # expired, or in use right now and about to restart its countdown
        return "now"
    for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= seconds:
            n = left // seconds
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "now"


def _in_use(value) -> str:
    # The count of requests using the model; a bare bool is accepted too.
    if isinstance(value, bool):
        return "yes" if value else ""
    return str(value) if value else ""


def ps(url: UrlOpt = None, api_key: KeyOpt = None):
    """Loaded models: size, where each runs (ATELIER_RUNTIME) and decodes, requests in flight, and when each
    will be unloaded."""
    out = call("GET", "/api/ps", url, api_key).json()
    now = time.time()
    table = Table(box=None)
    for col in ("MODEL", "FAMILY", "TASK", "SIZE", "RUNTIME", "DECODING", "IN USE", "UNTIL"):
        table.add_column(col)
    for m in out["data"]:
        table.add_row(m["model"], m["family"], m["task"], _size(m["size_bytes"]), m.get("runtime", ""),
                      m.get("decoding", ""), _in_use(m.get("in_use")), _until(m.get("expires_at"), now))
    console.print(table)
    cap = out.get("max_model_memory")
    console.print(f"{len(out['data'])} of {out['max_loaded_models']} loaded, "
                  f"{_size(out['memory_bytes'])} of {_size(cap) if cap else 'unlimited'} memory")
