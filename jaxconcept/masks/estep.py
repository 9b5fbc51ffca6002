"""The E-step on the host: masks of every image's concepts from their cross-attention maps (docs/method.md §4, §5).

One declared grid: the soft maps come from the device at the latent grid, are upsampled once to the
image grid (where the labels, the CRF and the mask PNGs live; the device CRF may run at its own
`crf_size`, see `crf.refine_labels`). `estimate_masks` takes a `maps(image, key)` function, so single
runs and batched jobs (`em.stages.Stages.maps`) share it. Pure helpers (`labels.py`) do the per-pixel work.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from . import crf, labels as masks, settle

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MaskRules:
    """How an E-step turns soft maps into masks: the `masks` settings, with where the CRF runs resolved."""

    background_level: float
    use_crf: bool = True
    crf_min_iou: float = 0.5
    crf_backend: str = "host"  # "host" (pydensecrf) or "device" (crf_exact)
    crf_size: tuple[int, int] | None = None  # None: the image's size
    mask_prior: float = 0.0  # EM settling (`settle.damp_maps`)
    hysteresis: bool = False  # EM settling: the CRF's rejection also against the last round's masks

    @classmethod
    def of(cls, masks, crf_where) -> "MaskRules":
        """From `settings.Masks` and `(backend, size)` (`em.prepare.crf_where`)."""
        return cls(masks.background_level, masks.crf, masks.crf_min_iou, *crf_where, masks.mask_prior,
                   masks.crf_hysteresis)


def assign_masks(soft_KxHxW, image_u8, kinds, rules: MaskRules, previous_KxHxW=None, ties=()):
    """Masks of one image's concepts from their soft maps (image resolution).

    Objects: argmax against a constant background level (non-overlapping); a "background" concept gets
    what no object claims. Then (optionally) a multi-label DenseCRF, hole filling and speck removal, and
    a fallback for an empty mask (its map's top 5%, minus other objects' pixels). The CRF runs on the host
    (pydensecrf) or on the device (`rules.crf_backend`), at image resolution or at `rules.crf_size` (h, w).
    EM (`settle`): maps damped towards `previous_KxHxW` (the last round's masks) by `mask_prior`, the CRF's
    rejection with hysteresis against them; without previous masks, tied groups (`ties`, indices into
    the K concepts) split their shared region in reading order.
    Returns (masks K x H x W, masks without CRF, info {"crf_seconds", "fallbacks", "crf_rejected"}).
    """
    soft_KxHxW = settle.damp_maps(soft_KxHxW, previous_KxHxW, rules.mask_prior)
    if previous_KxHxW is None and ties:
        soft_KxHxW = masks.split_tied_maps(soft_KxHxW, ties, rules.background_level)
    objects = [k for k, kind in enumerate(kinds) if kind == "object"]
    h, w = soft_KxHxW.shape[1:]
    labels = _labels(soft_KxHxW[objects], rules.background_level) if objects else np.zeros((h, w), np.int32)
    info = {"crf_seconds": 0.0, "fallbacks": [], "crf_rejected": []}
    raw = _masks_from_object_labels(labels, soft_KxHxW, objects, kinds, info, record=False)
    if not rules.use_crf or not objects:
        return raw, raw, info
    reference = (settle.labels_of_masks(np.asarray(previous_KxHxW)[objects])
                 if rules.hysteresis and previous_KxHxW is not None else None)
    refined, crf_info = crf.refine_labels(image_u8, labels, len(objects) + 1,
                                          crf.CRFParams(min_iou=rules.crf_min_iou), soft_KxHxW=soft_KxHxW[objects],
                                          backend=rules.crf_backend, size=rules.crf_size, reference_HxW=reference)
    info["crf_seconds"] = crf_info["seconds"]
    info["crf_rejected"] = [objects[k] for k, r in enumerate(crf_info["rejected"]) if r]
    return _masks_from_object_labels(refined, soft_KxHxW, objects, kinds, info, record=True), raw, info


def _labels(maps_KxHxW, background_level: float) -> np.ndarray:
    """`masks.labels_from_maps` on the host (the maps are already here for the CRF; the same argmax)."""
    bg = np.full((1,) + maps_KxHxW.shape[1:], background_level, maps_KxHxW.dtype)
    return np.argmax(np.concatenate([bg, maps_KxHxW]), axis=0).astype(np.int32)


def _masks_from_object_labels(labels_HxW, soft_KxHxW, objects, kinds, info, record: bool):
    out = np.zeros((len(kinds),) + labels_HxW.shape, bool)
    for j, k in enumerate(objects):
        own = labels_HxW == j + 1
        others = (labels_HxW > 0) & ~own
        mask = masks.clean_mask(own) & ~others  # filled holes must not swallow another object
        mask, used = masks.nonempty_or_fallback(mask, np.where(others, 0.0, soft_KxHxW[k]))
        if used and record:
            info["fallbacks"].append(k)
        out[k] = mask
    claimed = out[objects].any(axis=0) if objects else np.zeros(labels_HxW.shape, bool)
    for k, kind in enumerate(kinds):
        if kind == "background":
            out[k] = ~claimed
            if not out[k].any():
                out[k], used = masks.nonempty_or_fallback(out[k], 1.0 - soft_KxHxW[objects].max(0))
                if used and record:
                    info["fallbacks"].append(k)
    return out


def estimate_masks(maps, setup, key, rules: MaskRules, previous=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """E-step over all images of a prepared run (`em.prepare.Setup`): (masks C x H x W, masks without CRF, info).

    maps(i, key) -> soft maps of image i's prompt, C x h x w on the latent grid (device). Padding (resize
    "pad", `setup.inputs.valid`) belongs to no concept. previous: the last round's masks (C x H x W) for the
    settling rules (`assign_masks`); concepts of one image that start identical are split in the first E-step
    (`split_ties`)."""
    images_u8, valid, tokens, ties = setup.images_u8, setup.inputs.valid, setup.concepts.tokens, split_ties(setup)
    owner_C, kinds = np.asarray(setup.inputs.owner_C), np.asarray(setup.inputs.kinds)
    size = images_u8.shape[1:3]
    out = np.zeros((len(owner_C),) + size, bool)
    raw_out = np.zeros_like(out)
    info = {"crf_seconds": 0.0, "fallbacks": [], "crf_rejected": [], "attention_seconds": 0.0}
    for i in range(len(images_u8)):
        t0 = time.time()
        mine = np.flatnonzero(owner_C == i)
        soft_Kxhxw = maps(i, jax.random.fold_in(key, i))[mine]
        soft_KxHxW = np.asarray(masks.upsample_maps(soft_Kxhxw, size))  # the one upsample, on the device
        info["attention_seconds"] += time.time() - t0
        frame_HxW = np.ones(size, bool) if valid is None else valid(i)
        local = [tuple(int(np.flatnonzero(mine == c)[0]) for c in g) for g in ties if owner_C[g[0]] == i]
        got, raw, inf = assign_masks(soft_KxHxW * frame_HxW, images_u8[i], list(kinds[mine]), rules,
                                     None if previous is None else np.asarray(previous)[mine], local)
        out[mine], raw_out[mine] = got & frame_HxW, raw & frame_HxW
        info["crf_seconds"] += inf["crf_seconds"]
        info["fallbacks"] += [tokens[mine[k]] for k in inf["fallbacks"]]
        info["crf_rejected"] += [tokens[mine[k]] for k in inf["crf_rejected"]]
    for token in info["fallbacks"]:
        log.warning("mask of %s came out empty: using the top 5%% of its attention map instead", token)
    return out, raw_out, info


def tied_concepts(setup) -> tuple[tuple[int, ...], ...]:
    """Object concepts of one image with the same init word, or none (`settle.tied_groups`)."""
    return settle.tied_groups(setup.inputs.owner_C, setup.concepts.init_words, setup.inputs.kinds)


def split_ties(setup) -> list:
    """The tied groups the first E-step splits: identical starts (one init word); random rows differ, and
    their maps say who is where."""
    return [g for g in tied_concepts(setup) if setup.concepts.init_words[g[0]]]


MATCHING_NOTE = "tied concepts (same init word in one image) matched to the truth by the best assignment"


def round_metrics(r: int, masks_now, raw, prev, info: dict, tokens, truth, tied=()) -> dict:
    """The metrics.jsonl entry of one round: timings, fallbacks, mask change (mean and per concept), and
    IoU against `truth` (with and without CRF) when there is one, `tied` groups matched (`masks.matched_ious`)."""
    entry = {"round": r, "crf_seconds": round(info.get("crf_seconds", 0.0), 4),
             "attention_seconds": round(info.get("attention_seconds", 0.0), 4),
             "fallbacks": info.get("fallbacks", []), "crf_rejected": info.get("crf_rejected", [])}
    if prev is not None:
        change = settle.mask_change(prev, masks_now)
        entry["mask_change"] = float(np.mean(change))
        entry["mask_change_by_concept"] = dict(zip(tokens, change))
    if truth is not None:
        entry["iou"] = dict(zip(tokens, masks.matched_ious(masks_now, truth, tied)))
        entry["iou_no_crf"] = dict(zip(tokens, masks.matched_ious(raw, truth, tied)))
        if tied:
            entry["iou_matching"] = MATCHING_NOTE
        entry["mean_iou"] = float(np.mean(list(entry["iou"].values())))
        entry["mean_iou_no_crf"] = float(np.mean(list(entry["iou_no_crf"].values())))
    return entry
