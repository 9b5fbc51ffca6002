"""Pictures of attention maps and masks: heat maps, overlays and labelled grids (uint8 arrays)."""

from __future__ import annotations

import textwrap
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


CHAR_W, LINE_H = 6, 12  # PIL's default bitmap font: pixels per character and per line


def caption_lines(text: str, width_px: int) -> list[str]:
    """`text` wrapped at spaces into lines of at most `width_px` (words longer than a line, such as a long
    concept token, get a line of their own and are cut only there)."""
    width = max(1, width_px // CHAR_W)
    lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False) or [""]
    return [line[:width] for line in lines]


def grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[Sequence[str]] | None = None,
         cell: int = 128, pad: int = 4, label_h: int = 14,
         row_labels: Sequence[str] | None = None) -> np.ndarray:
    """Labelled grid of uint8 images (each resized to `cell` px square, nearest for small maps).

    labels: one short label per cell, above it. row_labels: one caption per row (a prompt), written whole
    across the row's width above its cells, on as many lines as it needs."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    row_w = n_cols * (cell + pad) - pad
    captions = [caption_lines(t, row_w - 4) for t in row_labels] if row_labels is not None else [[]] * n_rows
    heads = [len(c) * LINE_H + 2 if c else label_h for c in captions]
    tops = np.cumsum([pad] + [h + cell + pad for h in heads]).tolist()
    out = Image.new("RGB", (pad + n_cols * (cell + pad), int(tops[-1])), "white")
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        y = tops[i]
        for k, line in enumerate(captions[i]):
            draw.text((pad + 2, y + 1 + k * LINE_H), line, fill="black")
        for j, tile in enumerate(row):
            tile = np.asarray(tile)
            if tile.ndim == 2:
                tile = heatmap(tile)
            x = pad + j * (cell + pad)
            out.paste(Image.fromarray(resize(tile, (cell, cell), nearest=tile.shape[0] < cell)), (x, y + heads[i]))
            if labels is not None and j < len(labels[i]):
                draw.text((x + 2, y + 1), str(labels[i][j])[: cell // CHAR_W], fill="black")
    return np.asarray(out)


def name_lines(name: str, width: int) -> list[str]:
    """A token name cut into lines of at most `width` characters, after an underscore or hyphen where one falls
    in the line ("<purple_dotted_" / "ring>"), else at the width."""
    lines = []
    while len(name) > width:
        cut = max(name.rfind("_", 0, width), name.rfind("-", 0, width)) + 1 or width
        lines.append(name[:cut])
        name = name[cut:]
    return lines + [name]


def key_tile(names: Sequence[str], colors, cell: int = 128) -> np.ndarray:
    """A `cell` px white tile naming what each colour stands for: a swatch, then the name (wrapped at the
    tile's width, 6 px per character, after an underscore where it can), one entry under the other."""
    out = Image.new("RGB", (cell, cell), "white")
    draw = ImageDraw.Draw(out)
    width = max(1, (cell - 16) // CHAR_W)
    y = 2
    for name, color in zip(names, colors):
        color = tuple(int(c) for c in color)
        draw.rectangle((2, y + 1, 11, y + 10), fill=color, outline="black")
        for line in name_lines(name, width):
            draw.text((14, y), line, fill="black")
            y += LINE_H
        y += 2
    return np.asarray(out)


def line_plot(series: dict[str, Sequence[float]], title: str = "", y_label: str = "", x_label: str = "",
              size: tuple[int, int] = (480, 320), y_range: tuple[float, float] = (0.0, 1.0),
              errors: dict[str, Sequence[float]] | None = None, x_ticks: Sequence[str] | None = None) -> np.ndarray:
    """A small line chart (uint8 H x W x 3) of named series over x = 0, 1, 2, ...; no matplotlib needed.
    `errors` (optional, per series name): half-lengths of vertical error bars at each point. `x_ticks`: names of
    the x values, which are then categories (modes, an oracle): points with their bars, not joined, and a half
    step of margin on each side."""
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    w, h = size
    left, right, top, bottom = 44, 12, 32, 36
    out = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(out)
    draw.text((left, 4), title, fill="black")
    draw.text((4, 18), y_label, fill="black")  # above the y axis' ticks
    draw.rectangle((left, top, w - right, h - bottom), outline="black")
    lo, hi = y_range
    n = max((len(v) for v in series.values()), default=1)
    pad = 0.5 if x_ticks else 0.0  # categories: none sits on the frame
    sx = (w - left - right) / max(n - 1 + 2 * pad, 1)
    left_x = left + pad * sx
    sy = (h - top - bottom) / (hi - lo)
    for k in range(5):
        val = lo + (hi - lo) * k / 4
        y = h - bottom - (val - lo) * sy
        draw.line((left - 3, y, left, y), fill="black")
        draw.text((4, y - 6), f"{val:.2f}", fill="black")
    for i in range(n):
        tick = str(x_ticks[i]) if x_ticks and i < len(x_ticks) else str(i)
        draw.text((left_x + i * sx - 3 * len(tick), h - bottom + 4), tick, fill="black")
    draw.text(((left + w - right) / 2 - 3 * len(x_label), h - 14), x_label, fill="black")  # under the x axis
    for j, (name, values) in enumerate(series.items()):
        c = colors[j % len(colors)]
        pts = [(left_x + i * sx, h - bottom - (float(v) - lo) * sy) for i, v in enumerate(values) if v is not None]
        if len(pts) > 1 and not x_ticks:
            draw.line(pts, fill=c, width=2)
        r = 3 if x_ticks else 2
        for x, y in pts:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=c)
        bars = (errors or {}).get(name) or []
        for i, (v, e) in enumerate(zip(values, bars)):
            if v is not None and e:
                x = left_x + i * sx + (j - 2) * 1.5  # a small offset so coinciding bars stay visible
                y0, y1 = h - bottom - (float(v) + e - lo) * sy, h - bottom - (float(v) - e - lo) * sy
                draw.line((x, y0, x, y1), fill=c)
                if x_ticks:  # caps: categorical points' bars read as bars
                    draw.line((x - 3, y0, x + 3, y0), fill=c)
                    draw.line((x - 3, y1, x + 3, y1), fill=c)
        draw.text((left + 6, top + 4 + 12 * j), name, fill=c)
    return np.asarray(out)
