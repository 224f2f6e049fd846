"""The public shape of a model and its versions (GET /v1/models, and every route that returns a model)."""

from __future__ import annotations

import calendar

from atelier.families import FAMILIES
from atelier.storage.ownership import can_see_version
from atelier.storage.db import Model, Version


def _ts(dt) -> int:
    return calendar.timegm(dt.timetuple())


def version_public(v: Version) -> dict:
    cfg = v.config.get("atelier_config", v.config)
    return {"version": v.number, "ref": f"{v.model.name}@{v.number}", "created": _ts(v.created_at),
            "size_bytes": v.size_bytes, "metrics": v.metrics, "context_length": cfg.get("n_positions"),
            "files": v.files}


def model_public(m: Model, current: Version | None = None, *, key) -> dict:
    """The model as `key` sees it: the versions (and aliases pointing at them) it may use."""
    versions = [v for v in m.versions if can_see_version(key, v)]
    numbers = {v.number for v in versions}
    latest = current or next((v for v in versions for a in m.aliases
                              if a.name == "latest" and a.version_number == v.number), None)
    return {"id": m.name, "object": "model", "created": _ts(m.created_at), "owned_by": m.owner,
            "family": m.family, "task": m.task,
            "aliases": {a.name: a.version_number for a in sorted(m.aliases, key=lambda a: a.name)
                        if a.version_number in numbers},
            "versions": [version_public(v) for v in versions],
            "latest": version_public(latest) if latest else None} | _family_fields(m, latest) | _manifest(latest)


def _manifest(v: Version | None) -> dict:
    """An imported model's atelier.json, as its owner wrote it (display name, licence, defaults, …)."""
    manifest = (v.training or {}).get("manifest") if v is not None else None
    return {"manifest": manifest} if manifest else {}


def callable_ids(m: Model, key) -> list[dict]:
    """The model, then one entry per fine-tune alias (`tang-poet:ft-my-style`) `key` may use: what a caller
    can put in `model`."""
    entries = [model_public(m, key=key)]
    for alias in sorted(m.aliases, key=lambda a: a.name):
        if alias.name.startswith("ft-"):
            version = next((v for v in m.versions if v.number == alias.version_number), None)
            if version is not None and can_see_version(key, version):
                entries.append(model_public(m, current=version, key=key) | {"id": f"{m.name}:{alias.name}", "parent": m.name})
    return entries


def _family_fields(m: Model, v: Version | None) -> dict:
    """What the family says a caller needs (image sizes and upscalers, a table's features, …)."""
    family = FAMILIES.get(m.family)
    if family is None or v is None:
        return {}
    return family.describe(v.config, v.files)
