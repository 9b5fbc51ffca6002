"""Image files in and out: RGB, centre-cropped and resized, as float arrays in [-1, 1]."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import JaxconceptError


class ImageError(JaxconceptError):
    """An image file that cannot be used."""


def load_image(path: str, size: int | tuple[int, int]) -> np.ndarray:
    """H x W x 3 float32 in [-1, 1]: any PIL format, converted to RGB, centre-cropped to the aspect of
    `size` and resized (Lanczos)."""
    if not os.path.isfile(path):
        raise ImageError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"image {path!r} cannot be read ({e}); is it a complete PNG/JPEG/WebP file?") from e
    out_h, out_w = (size, size) if isinstance(size, int) else size
    w, h = img.size
    scale = max(out_w / w, out_h / h)
    crop_w, crop_h = round(out_w / scale), round(out_h / scale)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    img = img.resize((out_w, out_h), Image.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
    return np.asarray(img, np.float32) / 127.5 - 1.0


def to_uint8(image_HxWx3: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8."""
    return np.clip(np.round((np.asarray(image_HxWx3, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path)
