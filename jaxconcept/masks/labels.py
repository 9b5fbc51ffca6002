"""Masks from cross-attention maps (docs/method.md §4): one label per pixel, then host-side clean-up.

`labels_from_maps` is pure JAX: concept maps (normalised per token) are stacked with a constant
background channel and the argmax gives non-overlapping labels (0 = background, k + 1 = concept k).
A concept of kind "background" has no map of its own: it gets the background label's pixels.
`clean_mask` (numpy, host) fills holes and drops specks; `nonempty_or_fallback` never lets a mask be
silently empty.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage


def labels_from_maps(maps_KxHxW, background_level: float = 0.45) -> jnp.ndarray:
    """H x W int32 labels: 0 where every map is below `background_level`, else 1 + argmax over maps."""
    k, h, w = maps_KxHxW.shape
    bg = jnp.full((1, h, w), background_level, maps_KxHxW.dtype)
    return jnp.argmax(jnp.concatenate([bg, maps_KxHxW]), axis=0).astype(jnp.int32)


def upsample_maps(maps_Kxhxw, out_hw: tuple[int, int]) -> jnp.ndarray:
    """Bilinear upsampling of token maps to image resolution, clamped to >= 0."""
    k = maps_Kxhxw.shape[0]
    return jnp.maximum(jax.image.resize(maps_Kxhxw, (k,) + tuple(out_hw), "bilinear"), 0.0)


def masks_from_labels(labels_HxW: np.ndarray, num_concepts: int) -> np.ndarray:
    """K x H x W bool, mask k = pixels labelled k + 1."""
    labels_HxW = np.asarray(labels_HxW)
    return np.stack([labels_HxW == k + 1 for k in range(num_concepts)])


def fill_small_holes(mask_HxW: np.ndarray, max_hole_fraction: float = 0.1) -> np.ndarray:
    """Fill holes up to `max_hole_fraction` of the mask's own area: pin-holes from noisy maps go, while the
    hole of a ring (or a doughnut, a wreath) stays, as it is not part of the object (a ring's hole is about
    40% of its area)."""
    mask = np.asarray(mask_HxW, bool)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    labelled, n = ndimage.label(holes)
    sizes = ndimage.sum(holes, labelled, index=np.arange(1, n + 1))
    small = np.flatnonzero(sizes <= max_hole_fraction * max(int(mask.sum()), 1)) + 1
    return mask | np.isin(labelled, small)


def clean_mask(mask_HxW: np.ndarray, min_fraction: float = 0.002) -> np.ndarray:
    """Fill small holes and drop connected components smaller than `min_fraction` of the image."""
    mask = fill_small_holes(mask_HxW)
    labelled, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labelled, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= max(1, min_fraction * mask.size)) + 1
    return np.isin(labelled, keep)


def nonempty_or_fallback(mask_HxW: np.ndarray, soft_map_HxW: np.ndarray, top_fraction: float = 0.05):
    """(mask, fallback used?): an empty mask becomes the top `top_fraction` pixels of its soft map."""
    mask_HxW = np.asarray(mask_HxW, bool)
    if mask_HxW.any():
        return mask_HxW, False
    soft = np.asarray(soft_map_HxW, np.float32)
    cut = np.quantile(soft, 1.0 - top_fraction)
    return soft >= cut, True


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def matched_truths(pred_CxHxW, truth_CxHxW, groups=()) -> list[int]:
    """The truth each concept is matched to: its own, except in a tied group (same init word in one image, or
    none: which of them takes which region is arbitrary), whose concepts are matched to the group's truths by
    the assignment with the largest total IoU (brute force over the group's permutations; earlier permutations
    win ties)."""
    pred_CxHxW, truth_CxHxW = np.asarray(pred_CxHxW, bool), np.asarray(truth_CxHxW, bool)
    out = list(range(len(pred_CxHxW)))
    for group in groups:
        group = list(group)
        if len(group) > 8:
            raise ValueError(f"a tied group of {len(group)} concepts is too large to match by brute force")
        table = np.array([[iou(pred_CxHxW[p], truth_CxHxW[t]) for t in group] for p in group])
        best = max(itertools.permutations(range(len(group))),
                   key=lambda perm: sum(table[i, perm[i]] for i in range(len(group))))
        for i, c in enumerate(group):
            out[c] = group[best[i]]
    return out


def matched_ious(pred_CxHxW, truth_CxHxW, groups=()) -> list[float]:
    """IoU of each concept with the truth it is matched to (`matched_truths`)."""
    pred_CxHxW, truth_CxHxW = np.asarray(pred_CxHxW, bool), np.asarray(truth_CxHxW, bool)
    return [iou(pred_CxHxW[c], truth_CxHxW[t]) for c, t in enumerate(matched_truths(pred_CxHxW, truth_CxHxW, groups))]


def reading_order_regions(region_HxW, n: int) -> list[np.ndarray]:
    """Split a region into n parts in reading order (left to right, then top to bottom, by centroid): its n
    largest connected components (smaller ones join the part with the nearest centroid); with fewer
    components than n, equal-area slabs along x. Deterministic; parts may be empty when the region is."""
    region_HxW = np.asarray(region_HxW, bool)
    labelled, count = ndimage.label(region_HxW)
    if count < n:
        xs = np.nonzero(region_HxW)[1]
        cuts = np.quantile(xs, np.linspace(0, 1, n + 1)) if xs.size else np.zeros(n + 1)
        cols_W = np.arange(region_HxW.shape[1])
        return [region_HxW & (cols_W >= cuts[j])[None] & ((cols_W < cuts[j + 1]) | (j == n - 1))[None]
                for j in range(n)]
    ids = np.arange(1, count + 1)
    sizes = ndimage.sum(region_HxW, labelled, index=ids)
    centres = np.array(ndimage.center_of_mass(region_HxW, labelled, ids))  # (row, col)
    big = ids[np.argsort(-sizes, kind="stable")[:n]]
    big = sorted(big, key=lambda i: (round(centres[i - 1, 1], 3), centres[i - 1, 0]))
    parts = [labelled == i for i in big]
    for i in ids:
        if i not in big:
            d = [np.sum((centres[i - 1] - centres[b - 1]) ** 2) for b in big]
            parts[int(np.argmin(d))] |= labelled == i
    return parts


def split_tied_maps(soft_KxHxW, groups, background_level: float) -> np.ndarray:
    """Maps with each tied group's shared region (where a member's map wins against the background level)
    split in reading order: member j of the group (in the order given) keeps its map only on part j.
    Concepts that start from one init word have near-identical maps, and which one wins is otherwise
    decided by prompt position."""
    soft_KxHxW = np.array(soft_KxHxW, np.float32)
    for group in groups:
        group = list(group)
        region = soft_KxHxW[group].max(axis=0) >= background_level
        for k, part in zip(group, reading_order_regions(region, len(group))):
            soft_KxHxW[k] = np.where(region & ~part, 0.0, soft_KxHxW[k])
    return soft_KxHxW
