"""Models that ship inside the package (`atelier/assets/models/<name>/`), registered on start.

Each family names its shipped folders (`Family.shipped`). A folder whose weights are not yet
a version of that model becomes a new version with the aliases `latest` and `production`;
an unchanged one is left alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy.orm import Session

from atelier.config import PACKAGE_DIR
from atelier.families import FAMILIES
from atelier.storage import audit
from atelier.storage.blobs import BlobStore
from atelier.storage.db import Model
from atelier.storage.registry import register_version

SHIPPED_DIR = PACKAGE_DIR / "assets" / "models"


def ensure_shipped(db: Session, blobs: BlobStore, root: Path = SHIPPED_DIR) -> list[str]:
    """Register every shipped model that is missing or changed; return the refs registered."""
    registered = []
    for family in FAMILIES.values():
        for name in family.shipped:
            folder = root / name
            if not (folder / "model.safetensors").exists():
                continue
            # Weights decide "changed" (a model card edit is not a new version); an added upscaler is.
            weights = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}
            model = db.query(Model).filter_by(name=name).one_or_none()
            if model and any(all(v.files.get(f) == d for f, d in weights.items()) for v in model.versions):
                continue
            training = {}
            if (folder / "training.json").exists():
                training = json.loads((folder / "training.json").read_text(encoding="utf-8"))
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            v = register_version(db, blobs, name=name, family=family.name, task=family.task_of(config), folder=folder,
                                 metrics=training.get("metrics", {}), training=training,
                                 aliases=("latest", "production"))
            audit.record(db, action="model.register", target=f"{name}@{v.number}", detail={"source": "shipped"})
            registered.append(f"{name}@{v.number}")
    return registered
