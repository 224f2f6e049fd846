"""gram: style transfer by matching Gram matrices of fixed random features (atelier/images/style.py),
or Reinhard colour transfer (method="color"). Not trained: `style-transfer` ships.

Served by `/v1/images/edits` and `/api/style-transfer`, one call at a time in a worker
thread (each call optimises one image's pixels).
"""

from __future__ import annotations

from pathlib import Path

from atelier.families.base import Family
from atelier.images import style


class Stylist:
    """A style-transfer version: its random features, and the methods it runs."""

    methods = style.METHODS

    def __init__(self, folder: Path):
        self.features = style.RandomFeatures.from_pretrained(folder)

    def transfer(self, content, style_image, **options) -> style.StyleResult:
        return style.transfer(content, style_image, self.features, **options)


class Gram(Family):
    name = "gram"
    task = "style-transfer"
    engine = "call"
    shipped = ("style-transfer",)

    def describe(self, config: dict, files: dict) -> dict:
        return {"methods": list(style.METHODS), "styles": sorted(style.list_styles())}

    def load(self, folder: Path) -> Stylist:
        return Stylist(Path(folder))


family = Gram()
