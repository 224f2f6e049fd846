"""Image helpers that are not model families: PNG metadata and uploads (png.py), style transfer (style.py)."""
