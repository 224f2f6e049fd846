"""upscaler: a learned ×2 enlarger (atelier/models/upscaler.py) for the image families.

Not a model of its own: trained with `atelier train --family upscaler --attach-to NAME`, it
becomes part of a new version of an image model, which then serves twice its native size
through it (atelier/images/upscaling.py). Keeping it inside the version keeps "same
version, same bytes" true at every size.
"""

from __future__ import annotations

from atelier.families.base import Family


class Upscaler(Family):
    name = "upscaler"
    task = "image-upscaling"
    engine = None


family = Upscaler()
