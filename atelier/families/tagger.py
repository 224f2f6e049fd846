"""image-tagger: what a picture shows, as keywords a poem can be written around (image → poem).

The shipped `emoji-tagger` learnt from the emoji's names (atelier/training/tagger.py,
`benchmarks/train_tagger.py`); its colour word is read from the pixels, not learnt
(atelier/images/keywords.py). Served one call at a time in a worker thread ("call").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from atelier.families.base import Family
from atelier.images.keywords import colour_cue
from atelier.models import tagger

THRESHOLD = 0.35  # a label this likely is a keyword
# A picture unlike the emoji (a drawing, a photograph) gets lower probabilities for everything;
# its likeliest label still counts when it stands out: at least CLEAR_WINNER times the next one
# and above FLOOR, where a blank or noisy picture never reaches.
FLOOR, CLEAR_WINNER = 0.05, 3.0
MAX_KEYWORDS = 3  # learnt keywords per picture, the colour word besides


class Tagging:
    """A tagger version: the network and how its scores become keywords."""

    def __init__(self, folder: Path):
        self.model = tagger.from_pretrained(folder)
        self.labels = [label["keyword"] for label in self.model.config.labels]

    def keywords(self, image: Image.Image) -> dict:
        """{"keywords": [{keyword, gloss, score, source}], "tags": the five likeliest labels}. Keywords
        are the labels at THRESHOLD or above (at most MAX_KEYWORDS) or else a clear winner, then the
        picture's colour."""
        tags = tagger.tag(self.model, image)
        chosen = [t | {"source": "tagger"} for t in tags if t["score"] >= THRESHOLD][:MAX_KEYWORDS]
        if not chosen and tags[0]["score"] >= max(FLOOR, CLEAR_WINNER * tags[1]["score"]):
            chosen = [tags[0] | {"source": "tagger"}]
        small = image.convert("RGB")
        small.thumbnail((128, 128))
        colour = colour_cue(np.asarray(small))
        if colour and colour["keyword"] not in {c["keyword"] for c in chosen}:
            chosen.append({"keyword": colour["keyword"], "gloss": colour["gloss"], "score": colour["share"],
                           "source": "colour"})
        return {"keywords": chosen, "tags": tags[:5]}

    def run(self, images=None, rows=None, inputs=None) -> dict:
        """`POST /api/models/{m}/predict` with `images`: the keywords and tags of each picture."""
        if images is None:
            raise ValueError("an image tagger takes images (base64 pictures), not rows or inputs")
        return {"predictions": [self.keywords(image) for image in images]}


class ImageTagger(Family):
    name = "image-tagger"
    task = "image-tagging"
    engine = "call"
    shipped = ("emoji-tagger",)

    def describe(self, config: dict, files: dict) -> dict:
        return {"labels": [label["keyword"] for label in config.get("labels", [])], "image_size": config.get("image_size")}

    def load(self, folder: Path) -> Tagging:
        return Tagging(Path(folder))


family = ImageTagger()
