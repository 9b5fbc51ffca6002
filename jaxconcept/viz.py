"""Pictures of attention maps and masks: heat maps, overlays and labelled grids (uint8 arrays)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# a perceptual ramp (dark blue -> teal -> yellow), interpolated; avoids a matplotlib dependency
_RAMP = np.array([[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104],
                  [244, 136, 73], [254, 188, 43], [240, 249, 33]], np.float32)


def heatmap(map_HxW: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 colouring of a map in [0, 1]."""
    x = np.clip(np.asarray(map_HxW, np.float32), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (x - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - frac) + _RAMP[hi] * frac).astype(np.uint8)


def resize(array: np.ndarray, size_hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    img = Image.fromarray(array)
    return np.asarray(img.resize((size_hw[1], size_hw[0]), Image.NEAREST if nearest else Image.BILINEAR))


def overlay(image_HxWx3: np.ndarray, map_HxW: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The map's heat colours blended over the image (map resized to the image)."""
    heat = resize(heatmap(map_HxW), image_HxWx3.shape[:2])
    return np.round(image_HxWx3 * (1 - alpha) + heat * alpha).astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[Sequence[str]] | None = None,
         cell: int = 128, pad: int = 4, label_h: int = 14) -> np.ndarray:
    """Labelled grid of uint8 images (each resized to `cell` px square, nearest for small maps)."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    out = Image.new("RGB", (pad + n_cols * (cell + pad), pad + n_rows * (cell + label_h + pad)), "white")
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            tile = np.asarray(tile)
            if tile.ndim == 2:
                tile = heatmap(tile)
            x, y = pad + j * (cell + pad), pad + i * (cell + label_h + pad)
            out.paste(Image.fromarray(resize(tile, (cell, cell), nearest=tile.shape[0] < cell)), (x, y + label_h))
            if labels is not None and j < len(labels[i]):
                draw.text((x + 2, y + 1), str(labels[i][j])[: cell // 6], fill="black")
    return np.asarray(out)
