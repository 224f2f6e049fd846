"""Who may see and change what: every file, job, artifact and model belongs to a key.

The rules (an admin key sees and changes everything):
  - files, jobs and artifacts are their key's own; another key is told they do not exist
    (a 404, not a 403: existence is not confirmed)
  - a model belongs to the key that made it (an import, a from-scratch job); models that ship
    with Atelier or that an admin key made belong to SHARED, readable by every key
  - a version made by fine-tuning a shared model (its `ft-<suffix>` alias) belongs to the key
    whose job made it (`training["owner"]`)
  - only a model's owner (or an admin) moves its aliases, deletes it, or registers versions of it
"""

from __future__ import annotations

from atelier.safety.keys import has_scope

SHARED = "atelier"  # the installation: shipped models and what admin keys create


def is_admin(key) -> bool:
    return key is not None and has_scope(key, "admin")


def owner_for(key) -> str:
    """The owner to record for something `key` creates."""
    return SHARED if key is None or is_admin(key) else key.id


def owns(key, key_id: str | None) -> bool:
    """A file, job or artifact row (its `key_id`) as seen by `key`."""
    return is_admin(key) or (key is not None and key_id == key.id)


def can_see_model(key, model) -> bool:
    return is_admin(key) or model.owner in (SHARED, getattr(key, "id", None))


def can_see_version(key, version) -> bool:
    owner = (version.training or {}).get("owner", SHARED)
    return can_see_model(key, version.model) and (is_admin(key) or owner in (SHARED, key.id))


def can_change_model(key, model) -> bool:
    return is_admin(key) or model.owner == getattr(key, "id", None)
