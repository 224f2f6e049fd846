"""PNG files with their generation parameters inside, and safe decoding of uploaded images.

Every generated PNG carries a `parameters` tEXt chunk in AUTOMATIC1111's format, which
A1111, ComfyUI and most image viewers' "PNG info" panels read:

    smiling cat face
    Negative prompt: blurry
    Steps: 30, Sampler: DDIM, CFG scale: 3, Seed: 7, Size: 32x32, Model: emoji-diffusion@1

plus an `atelier` iTXt chunk holding the same parameters as JSON. Encoding is
deterministic (no timestamps), so the same image gives the same bytes.

Uploads are decoded defensively: byte and pixel limits are checked before any pixel is
decoded (Pillow reads only the header in `Image.open`), decompression bombs are refused
(`Image.MAX_IMAGE_PIXELS` set, `DecompressionBombError`/`Warning` caught), and only PNG,
JPEG and WebP are accepted.
"""

from __future__ import annotations

import io
import json
import re
import warnings

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageInputError(ValueError):
    """An upload that is not an acceptable image; `code` is the API error code."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


def _num(x: float) -> str:
    return f"{x:g}"


def a1111_parameters(*, prompt: str, negative_prompt: str = "", steps: int | None = None, sampler: str = "DDIM",
                     guidance: float | None = None, seed: int | None = None, size: str, model: str, **extra) -> str:
    """The `parameters` text in AUTOMATIC1111's layout (fields that do not apply are left out)."""
    fields = []
    if steps is not None:
        fields.append(f"Steps: {steps}")
    fields.append(f"Sampler: {sampler}")
    if guidance is not None:
        fields.append(f"CFG scale: {_num(guidance)}")
    if seed is not None:
        fields.append(f"Seed: {seed}")
    fields += [f"Size: {size}", f"Model: {model}"]
    fields += [f"{k}: {v}" for k, v in extra.items()]
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parse_a1111(text: str) -> dict:
    """Inverse of `a1111_parameters`: {"prompt", "negative_prompt", "Steps", "Sampler", …} (values as text)."""
    lines = text.split("\n")
    last = lines[-1]
    out = {"prompt": "", "negative_prompt": ""}
    body = lines[:-1]
    neg = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    if neg:
        out["negative_prompt"] = "\n".join(body[neg[0]:])[len("Negative prompt: "):]
        body = body[: neg[0]]
    out["prompt"] = "\n".join(body)
    for k, v in re.findall(r"\s*([\w ]+): ([^,]+)(?:,|$)", last):
        out[k.strip()] = v.strip()
    return out


def encode_png(image: np.ndarray, *, parameters: str | None = None, meta: dict | None = None) -> bytes:
    """(H, W, 3) uint8 → PNG bytes with the `parameters` tEXt and `atelier` iTXt chunks."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if meta is not None:
        info.add_itxt("atelier", json.dumps(meta, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_text(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (tEXt, zTXt, iTXt) as a dict."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour ×factor (crisp pixel art): (H, W, C) → (H·f, W·f, C)."""
    return image if factor == 1 else image.repeat(factor, axis=0).repeat(factor, axis=1)


def open_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an uploaded image to RGB, refusing anything that is not a reasonable image."""
    if not data:
        raise ImageInputError("the uploaded image is empty", "invalid_image")
    if len(data) > max_bytes:
        raise ImageInputError(f"the uploaded image is {len(data)} bytes; the limit is {max_bytes} "
                              "(ATELIER_MAX_IMAGE_UPLOAD_BYTES)", "image_too_large")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow warns above this and refuses above twice this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in UPLOAD_FORMATS:
                raise ImageInputError(f"the uploaded image is {im.format}; accepted formats: "
                                      f"{', '.join(UPLOAD_FORMATS)}", "invalid_image_format")
            w, h = im.size
            if w * h > max_pixels:
                raise ImageInputError(f"the uploaded image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} "
                                      "(ATELIER_MAX_IMAGE_UPLOAD_PIXELS)", "image_too_large")
            im.load()
            return im.convert("RGB")
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"the uploaded image decodes to more than {max_pixels} pixels "
                              "(a decompression bomb; ATELIER_MAX_IMAGE_UPLOAD_PIXELS)", "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"the upload is not a readable image ({type(e).__name__})", "invalid_image") from None


__all__ = ["a1111_parameters", "parse_a1111", "encode_png", "read_png_text", "open_upload", "upscale",
           "ImageInputError"]
