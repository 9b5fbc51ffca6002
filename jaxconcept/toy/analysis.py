"""Which colour, shape and pattern does a region show: a toy-world judge that needs no CLIP.

`describe_region` names one region (a ground-truth mask or a found one); `find_objects` segments an image
without masks; `match_caption` checks that the objects a caption names are there with the right colour and
shape (and pattern); `describe_background` names the background colour.

It leans on the toy world's design (see `scene`):
* object colours come from a known palette and patterns are a shade of the same colour, so colour is a
  vote over palette colours and their shades, and pattern is where pixels sit between colour and shade;
* objects keep off the border and differ from every background tone by `scene.MIN_CONTRAST`, so the
  background is the colours of the border and foreground is what is far from them;
* shapes are matched against the generator's own templates (`scene.shape_inside`).
In a blurred image a rim pixel is a blend of object and background; `unmix` says how much of each pixel the
object covers, which redraws outlines where a fixed colour threshold would grow every object by a pixel.
Works on clean scenes at 32 and 64 px and tolerates noise and blur, as in samples of a small diffusion model.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np

from .scene import BACKGROUND_COLORS, COLORS, SHAPES, TEXTURE_RANGE, pattern_shade, shape_inside

try:  # scipy is present wherever diffusers is; the numpy fallback keeps this module dependency-free
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - the fallback is tested through use_scipy=False
    _ndimage = None

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Every colour twice, base and pattern shade, both voting for the colour. A shade vote counts half: blends
# of an object with its background often land nearest some colour's shade (white's is a mid grey), seldom
# on a base colour, and a pattern covers under half of an object.
_EXT_RGB_Kx3 = np.array([COLORS[c] for c in COLOR_NAMES] + [pattern_shade(c) for c in COLOR_NAMES], float)
_EXT_OWNER_K = np.array(list(range(len(COLOR_NAMES))) * 2)
_EXT_WEIGHT_K = np.array([1.0] * len(COLOR_NAMES) + [0.5] * len(COLOR_NAMES))

DARK_FRACTION_MIN = 0.08     # share of shade pixels above which a region is patterned, not solid
STRIPE_COHERENCE = 0.5       # gradient-orientation coherence above which a pattern is stripes, not dots
TEMPLATE_SCALES = (0.9, 0.95, 1.0, 1.05, 1.1)
BLUR_VARIANCE = 2 / 3        # per-axis variance (px^2) a 3x3 box blur adds


def _as_image(image_uint8: np.ndarray) -> np.ndarray:
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
    return image


# ------------------------------------------------------------------------------------------ array helpers


def box_blur(image_HxWxC: np.ndarray, edge: str = "edge") -> np.ndarray:
    """3x3 mean filter as float; outside the image repeats the edge ("edge") or is 0 ("zero")."""
    img = np.asarray(image_HxWxC, float)
    h, w = img.shape[:2]
    if edge == "zero":
        pad = np.zeros((h + 2, w + 2) + img.shape[2:])
        pad[1:-1, 1:-1] = img
    else:
        pad = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
    rows = pad[:, :-2] + pad[:, 1:-1] + pad[:, 2:]
    return (rows[:-2] + rows[1:-1] + rows[2:]) / 9.0


def erode(mask_HxW: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour erosion (outside the image counts as not in the mask)."""
    m = np.pad(np.asarray(mask_HxW, bool), 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def dilate(mask_HxW: np.ndarray, steps: int = 1) -> np.ndarray:
    """`steps` rounds of 8-neighbour dilation."""
    m = np.asarray(mask_HxW, bool)
    h, w = m.shape
    for _ in range(steps):
        p = np.pad(m, 1)
        m = np.logical_or.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    return m


def despeckle(mask_HxW: np.ndarray) -> np.ndarray:
    """Drop pixels with at most one 8-neighbour in the mask and add pixels with at least seven: removes pixel
    noise but keeps the corners of small shapes (a square's corner has three neighbours), which a majority
    filter, or smoothing the image first, would round off."""
    m = np.asarray(mask_HxW, bool)
    p = np.pad(m, 1).astype(np.int32)
    h, w = m.shape
    neighbours = sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) - m
    return (m & (neighbours >= 2)) | (~m & (neighbours >= 7))


def _label_bfs(mask_HxW: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components by breadth-first search: the fallback when scipy is missing."""
    h, w = mask_HxW.shape
    labels = np.zeros((h, w), np.int32)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    n = 0
    for r0, c0 in zip(*np.nonzero(mask_HxW)):
        if labels[r0, c0]:
            continue
        n += 1
        labels[r0, c0] = n
        queue = deque([(r0, c0)])
        while queue:
            r, c = queue.popleft()
            for dr, dc in steps:
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and mask_HxW[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = n
                    queue.append((rr, cc))
    return labels, n


def label(mask_HxW: np.ndarray, connectivity: int = 8, use_scipy: bool = True) -> tuple[np.ndarray, int]:
    """(labels H x W int32, count): components numbered 1..count in raster order of their first pixel."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask_HxW = np.asarray(mask_HxW, bool)
    if use_scipy and _ndimage is not None:
        structure = np.ones((3, 3), bool) if connectivity == 8 else None
        labels, n = _ndimage.label(mask_HxW, structure=structure)
        return labels.astype(np.int32), int(n)
    return _label_bfs(mask_HxW, connectivity)


def fill_holes(mask_HxW: np.ndarray, max_hole: int | None = None, use_scipy: bool = True) -> np.ndarray:
    """The mask with its holes (4-connected parts of the complement not reaching the border) filled; with
    `max_hole`, only holes of at most that many pixels (fills noise pin-holes, keeps a ring's hole)."""
    mask_HxW = np.asarray(mask_HxW, bool)
    labels, n = label(~mask_HxW, connectivity=4, use_scipy=use_scipy)
    if n == 0:
        return mask_HxW.copy()
    on_border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    is_hole = np.ones(n + 1, bool)
    is_hole[0] = False
    is_hole[on_border] = False
    if max_hole is not None:
        is_hole &= np.bincount(labels.ravel(), minlength=n + 1) <= max_hole
    return mask_HxW | is_hole[labels]


def bbox(mask_HxW: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a non-empty mask; bottom and right exclusive."""
    rows, cols = np.nonzero(mask_HxW)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def _core(mask_HxW: np.ndarray, keep: float = 0.25) -> np.ndarray:
    """The mask minus its rim, unless that leaves under `keep` of it (thin shapes): rims of blurred images
    are blends with the background."""
    inner = erode(mask_HxW)
    return inner if inner.sum() >= keep * mask_HxW.sum() else mask_HxW


# ------------------------------------------------------------------------------------------ colour


def color_votes(pixels_Nx3: np.ndarray) -> np.ndarray:
    """Share of the weighted vote per colour in COLOR_NAMES: each pixel votes for the colour owning its
    nearest palette entry (a colour, or at half weight its pattern shade)."""
    d_NxK = np.linalg.norm(np.asarray(pixels_Nx3, float)[:, None, :] - _EXT_RGB_Kx3[None], axis=-1)
    nearest_N = np.argmin(d_NxK, axis=1)
    votes_K = np.bincount(_EXT_OWNER_K[nearest_N], weights=_EXT_WEIGHT_K[nearest_N], minlength=len(COLOR_NAMES))
    return votes_K / max(votes_K.sum(), 1e-9)


def classify_color(image_HxWx3: np.ndarray, mask_HxW: np.ndarray) -> tuple[str, float]:
    """(colour, share of the vote) over the region's core: a vote is robust to stripes, dots, noise and
    blurred rims, where a mean or median would drift between colour, shade and background."""
    votes_K = color_votes(np.asarray(image_HxWx3)[_core(mask_HxW)])
    k = int(np.argmax(votes_K))
    return COLOR_NAMES[k], float(votes_K[k])


# ------------------------------------------------------------------------------------------ coverage


def unmix(image_uint8: np.ndarray, background_rgb, color: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, c), each H x W: every pixel modelled as background + a (colour - background) + c (shade -
    background) with a, c >= 0, by least squares. a + c is the share of the pixel the object covers."""
    bg = np.asarray(background_rgb, float)
    p_Px3 = np.asarray(image_uint8, float).reshape(-1, 3) - bg
    u = np.asarray(COLORS[color], float) - bg
    v = np.asarray(pattern_shade(color), float) - bg
    gram = np.array([[u @ u, u @ v], [u @ v, v @ v]]) + 1e-6 * np.eye(2)
    a_P, c_P = np.linalg.solve(gram, np.stack([p_Px3 @ u, p_Px3 @ v]))
    a_only = np.clip(p_Px3 @ u / (u @ u + 1e-9), 0, None)          # best fit with c = 0
    c_only = np.clip(p_Px3 @ v / (v @ v + 1e-9), 0, None)          # best fit with a = 0
    a_wins = (np.linalg.norm(p_Px3 - a_only[:, None] * u, axis=1)
              <= np.linalg.norm(p_Px3 - c_only[:, None] * v, axis=1))
    both_ok = (a_P >= 0) & (c_P >= 0)
    a_P = np.where(both_ok, a_P, np.where(a_wins, a_only, 0.0))
    c_P = np.where(both_ok, c_P, np.where(a_wins, 0.0, c_only))
    hw = np.asarray(image_uint8).shape[:2]
    return a_P.reshape(hw), c_P.reshape(hw)


def coverage(image_uint8: np.ndarray, background_rgb, color: str) -> np.ndarray:
    """H x W: the share of each pixel covered by an object of `color` over `background_rgb` (`unmix`). A
    blurred rim pixel one third object reads 1/3 whatever the colours, so cutting at 1/2 undoes the blur's
    growth of the object by a pixel (which at 32 px closes a ring's hole and fills a cross's corners)."""
    a, c = unmix(image_uint8, background_rgb, color)
    return a + c


# ------------------------------------------------------------------------------------------ shape


def template(shape: str, box: tuple[float, float, float, float], hw: tuple[int, int],
             supersample: int = 1) -> np.ndarray:
    """H x W: the generator's shape drawn in the continuous box (top, left, bottom, right): bool sampled at
    pixel centres as the generator draws, or with `supersample` > 1 the covered share of each pixel."""
    top, left, bottom, right = box
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(hw[0])[:, None] + offsets[None, :]).ravel()
    xs = (np.arange(hw[1])[:, None] + offsets[None, :]).ravel()
    u = (xs[None, :] - (left + right) / 2) / ((right - left) / 2)
    v = (ys[:, None] - (top + bottom) / 2) / ((bottom - top) / 2)
    inside = shape_inside(shape, u, v)
    if supersample == 1:
        return inside
    return inside.reshape(hw[0], supersample, hw[1], supersample).mean(axis=(1, 3))


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / union if union > 0 else 0.0


@functools.lru_cache(maxsize=None)
def _shape_moments(shape: str) -> tuple[float, float, float]:
    """(mean v, std u, std v) of a shape drawn in [-1, 1]^2, measured on a fine grid."""
    c = (np.arange(400) + 0.5) / 200 - 1
    vs, us = np.nonzero(shape_inside(shape, c[None, :], c[:, None]))
    return float(c[vs].mean()), float(c[us].std()), float(c[vs].std())


def _moment_box(shape: str, weights_HxW: np.ndarray, extra_var: float) -> tuple[float, float, float, float] | None:
    """The box (top, left, bottom, right) in which `shape` has the weights' centroid and spread once
    `extra_var` (px^2 per axis, what a blur adds) is taken off: robust where the bounding box of a blurred
    outline is not (a triangle's apex fades below one half)."""
    total = float(weights_HxW.sum())
    if total <= 0:
        return None
    ys = np.arange(weights_HxW.shape[0]) + 0.5
    xs = np.arange(weights_HxW.shape[1]) + 0.5
    wy, wx = weights_HxW.sum(axis=1), weights_HxW.sum(axis=0)
    my, mx = float(wy @ ys) / total, float(wx @ xs) / total
    vy = max(float(wy @ (ys - my) ** 2) / total - extra_var, 0.25)
    vx = max(float(wx @ (xs - mx) ** 2) / total - extra_var, 0.25)
    mean_v, std_u, std_v = _shape_moments(shape)
    half_w, half_h = np.sqrt(vx) / std_u, np.sqrt(vy) / std_v
    cy = my - mean_v * half_h
    return cy - half_h, mx - half_w, cy + half_h, mx + half_w


def shape_scores(mask_HxW: np.ndarray, coverage_HxW: np.ndarray | None = None) -> dict[str, float]:
    """Best intersection-over-union of each shape's template with the region, the template filling the
    region's bounding box at a few scales (found masks may be a pixel too large or small).

    With `coverage_HxW` (per-pixel object share, `coverage`) the soft coverage around the mask is compared
    instead, also with area-sampled and 3x3-blurred templates placed by the coverage's centroid and spread:
    in a blurred 32 px image the outline of a cross or a triangle is a blob, but how its coverage fades
    still tells them apart."""
    top, left, bottom, right = bbox(mask_HxW)
    h, w = mask_HxW.shape
    t0, l0, b0, r0 = max(top - 2, 0), max(left - 2, 0), min(bottom + 2, h), min(right + 2, w)
    if coverage_HxW is None:
        target = np.asarray(mask_HxW, float)[t0:b0, l0:r0]
    else:
        target = (np.clip(coverage_HxW, 0.0, 1.0) * dilate(mask_HxW, 1))[t0:b0, l0:r0]
    hw = target.shape
    cy, cx = (top + bottom) / 2 - t0, (left + right) / 2 - l0
    half_h, half_w = (bottom - top) / 2, (right - left) / 2
    scores = {}
    for shape in SHAPES:
        boxes = [(cy - half_h * s, cx - half_w * s, cy + half_h * s, cx + half_w * s) for s in TEMPLATE_SCALES]
        candidates = [template(shape, box, hw).astype(float) for box in boxes]
        if coverage_HxW is not None:
            sharp = [template(shape, b, hw, 4) for b in boxes + [_moment_box(shape, target, 0.0)] if b is not None]
            blurred = [box_blur(template(shape, b, hw, 4), edge="zero")
                       for b in boxes + [_moment_box(shape, target, BLUR_VARIANCE)] if b is not None]
            candidates += sharp + blurred
        scores[shape] = float(max(_soft_iou(c, target) for c in candidates))
    return scores


def classify_shape(mask_HxW: np.ndarray, coverage_HxW: np.ndarray | None = None) -> tuple[str, float, dict]:
    """(shape, margin of the best template IoU over the runner-up, all IoUs)."""
    scores = shape_scores(mask_HxW, coverage_HxW)
    ranked = sorted(scores, key=scores.get, reverse=True)
    return ranked[0], scores[ranked[0]] - scores[ranked[1]], scores


# ------------------------------------------------------------------------------------------ pattern


def shade_position(image_HxWx3: np.ndarray, color: str) -> np.ndarray:
    """H x W: where each pixel sits on the line from the colour's pattern shade (0) to the colour (1)."""
    base = np.asarray(COLORS[color], float)
    shade = np.asarray(pattern_shade(color), float)
    axis = base - shade
    return (np.asarray(image_HxWx3, float) - shade) @ axis / float(axis @ axis)


def rim_is_sharp(image_HxWx3: np.ndarray, mask_HxW: np.ndarray, color: str, tolerance: float = 30.0) -> bool:
    """Whether the region's outer pixels show its colour or shade unblended (a sharp image, noise allowed):
    then the whole mask can be read; in a blurred image most rim pixels are blends."""
    rim = mask_HxW & ~erode(mask_HxW)
    if not rim.any():
        return True
    refs_2x3 = np.array([COLORS[color], pattern_shade(color)], float)
    d_N = np.min(np.linalg.norm(np.asarray(image_HxWx3, float)[rim][:, None] - refs_2x3[None], axis=-1), axis=1)
    return float(np.mean(d_N < tolerance)) >= 0.85


def pattern_region(mask_HxW: np.ndarray, coverage_HxW: np.ndarray | None = None) -> np.ndarray:
    """Pixels to read a pattern from: the whole mask for exact masks and sharp images (no coverage given);
    else the fully covered pixels off the rim, since blurred rims can look like the shade (a black object's
    rim blended with a light background is grey, like its pattern)."""
    if coverage_HxW is None:
        return mask_HxW
    core = _core(mask_HxW)
    pure = core & (coverage_HxW >= 0.8)
    return pure if pure.sum() >= 0.5 * core.sum() else core


def pattern_features(image_HxWx3: np.ndarray, mask_HxW: np.ndarray, color: str,
                     coverage_HxW: np.ndarray | None = None) -> dict[str, float]:
    """dark_fraction: share of the region's pixels nearer the shade than the colour (0 when solid);
    coherence: how much the gradients of that position share one orientation (stripes ~1, dots ~0; any
    stripe direction). `coverage_HxW` marks blended rims of found regions to leave out (`pattern_region`)."""
    mask_HxW = np.asarray(mask_HxW, bool)
    region = pattern_region(mask_HxW, coverage_HxW)
    t = shade_position(image_HxWx3, color)
    dark_fraction = float(np.mean(t[region] < 0.5))
    gx = np.where(region[:, 1:] & region[:, :-1], t[:, 1:] - t[:, :-1], 0.0)[:-1, :]
    gy = np.where(region[1:] & region[:-1], t[1:] - t[:-1], 0.0)[:, :-1]
    jxx, jyy, jxy = float(np.sum(gx * gx)), float(np.sum(gy * gy)), float(np.sum(gx * gy))
    energy = jxx + jyy
    coherence = float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / energy) if energy > 1e-9 else 0.0
    return {"dark_fraction": dark_fraction, "coherence": coherence}


def classify_pattern(features: dict[str, float]) -> tuple[str, float]:
    """(pattern, confidence in [0, 1]) from `pattern_features`."""
    dark, coh = features["dark_fraction"], features["coherence"]
    if dark < DARK_FRACTION_MIN:
        return "solid", float(1.0 - dark / DARK_FRACTION_MIN)
    if coh >= STRIPE_COHERENCE:
        return "striped", float(min(1.0, (coh - STRIPE_COHERENCE) / (1 - STRIPE_COHERENCE) + 0.5))
    return "dotted", float(min(1.0, (STRIPE_COHERENCE - coh) / STRIPE_COHERENCE + 0.5))


# ------------------------------------------------------------------------------------------ regions


def describe_region(image_uint8: np.ndarray, mask_bool: np.ndarray, background_rgb=None) -> dict:
    """{"color", "shape", "pattern"} of one region of an H x W x 3 image, with "color_confidence" (vote
    share), "shape_confidence" (IoU margin over the runner-up), "pattern_confidence", "shape_scores",
    "pattern_features" and "area".

    `background_rgb`, the colour around the region, is for found regions of possibly blurred images: when
    the region's rim is blended (`rim_is_sharp`), shape and pattern are judged on how much of each pixel
    the object covers (`coverage`) instead of on the mask alone. Leave it out for exact masks."""
    image = _as_image(image_uint8)
    mask_HxW = np.asarray(mask_bool, bool)
    if mask_HxW.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask_HxW.shape} does not match image shape {image.shape[:2]}")
    if not mask_HxW.any():
        raise ValueError("describe_region needs a non-empty mask")
    color, color_conf = classify_color(image, mask_HxW)
    # a sharp region is read like an exact mask; soft coverage only helps where rims are blended
    blended = background_rgb is not None and not rim_is_sharp(image, mask_HxW, color)
    cover_HxW = coverage(image, background_rgb, color) if blended else None
    shape, shape_conf, scores = classify_shape(mask_HxW, cover_HxW)
    features = pattern_features(image, mask_HxW, color, cover_HxW)
    pattern, pattern_conf = classify_pattern(features)
    return {"color": color, "shape": shape, "pattern": pattern, "color_confidence": color_conf,
            "shape_confidence": shape_conf, "pattern_confidence": pattern_conf, "shape_scores": scores,
            "pattern_features": features, "area": int(mask_HxW.sum())}


def describe_background(image_uint8: np.ndarray, mask_bool: np.ndarray | None = None) -> dict:
    """{"color", "confidence"}: the background colour (any texture tone of it) most pixels of the mask, or
    without one of the image border, are nearest to."""
    image = np.asarray(_as_image(image_uint8), float)
    pixels_Nx3 = image[np.asarray(mask_bool, bool)] if mask_bool is not None else _border_pixels(image)
    names = list(BACKGROUND_COLORS)
    factors = np.linspace(TEXTURE_RANGE[0], TEXTURE_RANGE[1], 5)
    tones_Kx3 = np.clip([np.asarray(BACKGROUND_COLORS[n], float) * f for n in names for f in factors], 0, 255)
    owner_K = np.repeat(np.arange(len(names)), len(factors))
    nearest_N = owner_K[np.argmin(np.linalg.norm(pixels_Nx3[:, None] - tones_Kx3[None], axis=-1), axis=1)]
    votes = np.bincount(nearest_N, minlength=len(names)) / max(len(nearest_N), 1)
    k = int(np.argmax(votes))
    return {"color": names[k], "confidence": float(votes[k])}


# ------------------------------------------------------------------------------------------ segmentation


def _border_pixels(image_HxWx3: np.ndarray) -> np.ndarray:
    """N x 3: the outer ring of the image, 1 px wide per 32 px of side."""
    width = max(1, min(image_HxWx3.shape[:2]) // 32)
    ring = np.ones(image_HxWx3.shape[:2], bool)
    ring[width:-width, width:-width] = False
    return np.asarray(image_HxWx3, float)[ring]


def kmeans_colors(pixels_Nx3: np.ndarray, k: int = 4, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(centres K x 3, share of pixels per centre), initialised at luminance quantiles (deterministic)."""
    pixels_Nx3 = np.asarray(pixels_Nx3, float)
    order = np.argsort(pixels_Nx3 @ np.array([0.299, 0.587, 0.114]), kind="stable")
    centres = pixels_Nx3[order[((np.arange(k) + 0.5) / k * len(order)).astype(int)]].copy()
    for step in range(iters + 1):
        assign = np.argmin(np.linalg.norm(pixels_Nx3[:, None] - centres[None], axis=-1), axis=1)
        if step == iters:
            return centres, np.bincount(assign, minlength=k) / len(assign)
        for j in range(k):
            if np.any(assign == j):
                centres[j] = pixels_Nx3[assign == j].mean(axis=0)


def background_model(image_uint8: np.ndarray) -> tuple[np.ndarray, float]:
    """(background colours K x 3, foreground distance threshold). The colours are clusters of the border
    pixels (clusters under 8% are dropped, in case an object touches the border); the threshold follows
    how much the border varies (texture, noise), kept between 24 and 42, under the toy world's minimum
    object/background contrast of 65."""
    border_Nx3 = _border_pixels(np.asarray(image_uint8, float))
    centres, share = kmeans_colors(border_Nx3)
    centres = centres[share >= 0.08]
    border_dist = np.min(np.linalg.norm(border_Nx3[:, None] - centres[None], axis=-1), axis=1)
    threshold = float(np.clip(2.0 * np.percentile(border_dist, 95) + 12.0, 24.0, 42.0))
    return centres, threshold


def foreground_mask(image_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H x W bool foreground, background colours K x 3): pixels far from every background colour,
    despeckled."""
    image = np.asarray(_as_image(image_uint8), float)
    centres, threshold = background_model(image)
    dist_HxW = np.min(np.linalg.norm(image[..., None, :] - centres, axis=-1), axis=-1)
    return despeckle(dist_HxW > threshold), centres


def _surrounding_color(image: np.ndarray, mask_HxW: np.ndarray, foreground_HxW: np.ndarray,
                       centres_Kx3: np.ndarray) -> np.ndarray:
    """Median colour of the background just around a region (textures vary over the image); the border
    colour nearest to the region when nothing is around it."""
    ring = dilate(mask_HxW, 3) & ~dilate(foreground_HxW, 1)
    if ring.sum() >= 4:
        return np.median(np.asarray(image, float)[ring], axis=0)
    mean = np.asarray(image, float)[mask_HxW].mean(axis=0)
    return centres_Kx3[np.argmin(np.linalg.norm(centres_Kx3 - mean, axis=1))]


def find_objects(image_uint8: np.ndarray, min_area: int | None = None, use_scipy: bool = True) -> list[dict]:
    """Objects in an H x W x 3 image without masks, largest first: each is `describe_region`'s dict plus
    "mask" (H x W bool), "bbox" (top, left, bottom, right; exclusive) and "background_rgb".

    Pixels far from the border's colours are foreground; each 8-connected piece of at least `min_area`
    pixels (default 0.5% of the image, at least 6) is named by colour, its outline redrawn where pixels are
    at least half covered by that colour (`coverage`), pin-holes filled (a ring's hole is kept), and
    described."""
    image = _as_image(image_uint8)
    h, w = image.shape[:2]
    min_area = max(6, int(0.005 * h * w)) if min_area is None else min_area
    foreground_HxW, centres = foreground_mask(image)
    labels, n = label(foreground_HxW, connectivity=8, use_scipy=use_scipy)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    found = []
    for k in range(1, n + 1):
        if sizes[k] < min_area:
            continue
        piece_HxW = labels == k
        color, _ = classify_color(image, piece_HxW)
        bg_rgb = _surrounding_color(image, piece_HxW, foreground_HxW, centres)
        mask_HxW = piece_HxW & (coverage(image, bg_rgb, color) >= 0.5)
        if mask_HxW.sum() < min_area:
            continue
        mask_HxW = fill_holes(mask_HxW, max_hole=max(2, int(0.04 * mask_HxW.sum())), use_scipy=use_scipy)
        found.append(dict(describe_region(image, mask_HxW, bg_rgb), mask=mask_HxW, bbox=bbox(mask_HxW),
                          background_rgb=tuple(float(x) for x in bg_rgb)))
    found.sort(key=lambda o: -o["area"])
    return found


# ------------------------------------------------------------------------------------------ captions


def _get(obj, key: str):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def match_caption(image_uint8: np.ndarray, objects_expected: list) -> dict:
    """Whether each expected object (dicts or objects with color, shape and optionally pattern, such as
    `Scene.objects`) is found in the image with the right colour and shape; each found object is used once,
    pairs with the right pattern too first.

    Returns {"found": [bool] (colour and shape), "pattern_matched": [bool, or None where no pattern was
    named], "fraction": share found, "pattern_fraction": share found with the right pattern among those
    naming one, "detected": the found objects without masks, "unmatched_detections": found objects left
    over (objects the caption does not name)}."""
    detected = find_objects(image_uint8)
    used = [False] * len(detected)
    found = [False] * len(objects_expected)
    pattern_ok: list[bool | None] = [None if _get(o, "pattern") is None else False for o in objects_expected]

    def take(i: int, want_pattern: bool) -> None:
        exp = objects_expected[i]
        for j, det in enumerate(detected):
            if used[j] or det["color"] != _get(exp, "color") or det["shape"] != _get(exp, "shape"):
                continue
            if want_pattern and det["pattern"] != _get(exp, "pattern"):
                continue
            used[j], found[i] = True, True
            if pattern_ok[i] is not None:
                pattern_ok[i] = det["pattern"] == _get(exp, "pattern")
            return

    for i in range(len(objects_expected)):
        if pattern_ok[i] is not None:
            take(i, want_pattern=True)
    for i in range(len(objects_expected)):
        if not found[i]:
            take(i, want_pattern=False)
    with_pattern = [p for p in pattern_ok if p is not None]
    return {
        "found": found,
        "pattern_matched": pattern_ok,
        "fraction": float(np.mean(found)) if found else 1.0,
        "pattern_fraction": float(np.mean(with_pattern)) if with_pattern else 1.0,
        "detected": [{k: v for k, v in d.items() if k != "mask"} for d in detected],
        "unmatched_detections": len(detected) - sum(used),
    }
