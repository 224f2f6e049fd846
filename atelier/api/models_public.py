"""The public shape of a model and its versions (GET /v1/models, and every route that returns a model)."""

from __future__ import annotations

import calendar

from atelier.families import FAMILIES
from atelier.storage.db import Model, Version


def _ts(dt) -> int:
    return calendar.timegm(dt.timetuple())


def version_public(v: Version) -> dict:
    cfg = v.config.get("atelier_config", v.config)
    return {"version": v.number, "ref": f"{v.model.name}@{v.number}", "created": _ts(v.created_at),
            "size_bytes": v.size_bytes, "metrics": v.metrics, "context_length": cfg.get("n_positions"),
            "files": v.files}


def model_public(m: Model, current: Version | None = None) -> dict:
    latest = current or next((v for v in m.versions for a in m.aliases
                              if a.name == "latest" and a.version_number == v.number), None)
    return {"id": m.name, "object": "model", "created": _ts(m.created_at), "owned_by": m.owner,
            "family": m.family, "task": m.task,
            "aliases": {a.name: a.version_number for a in sorted(m.aliases, key=lambda a: a.name)},
            "versions": [version_public(v) for v in m.versions],
            "latest": version_public(latest) if latest else None} | _family_fields(m, latest)


def _family_fields(m: Model, v: Version | None) -> dict:
    """What the family says a caller needs (image sizes and upscalers, a table's features, …)."""
    family = FAMILIES.get(m.family)
    if family is None or v is None:
        return {}
    return family.describe(v.config, v.files)
