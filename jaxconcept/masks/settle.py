"""How EM's re-estimated masks settle: pure functions between the E-step's attention maps and its masks.

Why (measured on the bundled scene, `python -m jaxconcept.train`): the ring's attention map is *higher* in
its hole (0.77) than on its body (0.63-0.69), round after round, so the unrefined mask is always the filled
disc (IoU ~0.5 with the ring). Only the CRF carves the hole out, and the CRF's safety rule rejects a
refinement whose IoU with the unrefined mask falls below 0.5: that IoU is 0.47-0.53 from round to round,
so the ring was accepted (1.000) and rejected (0.48) by turns. The maps hardly move; the rule flips.

The rule here has two parts, both functions of the previous round's masks only (checkpointed, so a
resumed run re-estimates exactly as an uninterrupted one):

* damping (`damp_maps`): each concept's map is blended with its previous mask,
  (1 - prior) * map + prior * previous; a pixel changes hands only when the new evidence outweighs the
  prior, so small fluctuations of the maps no longer move the masks;
* CRF hysteresis (`crf.refine_labels(reference_HxW=...)`): a refinement within `min_iou` of the
  previous round's mask is kept even when it is far from this round's unrefined mask, so a refinement
  that was accepted once is not rejected again while the maps stay where they were.

The final masks come from a ground-truth-free rule (`final_round`): among the last half of the rounds, the
one whose masks changed least from the round before (EM's nearest approach to a fixed point); later
rounds win ties. (A medoid of the last rounds was tried first: while EM is still improving it lags
behind, e.g. picking 0.69 where the last two rounds were at 1.00.)
"""

from __future__ import annotations

import numpy as np

from .labels import iou


def damp_maps(soft_KxHxW, previous_KxHxW, prior: float) -> np.ndarray:
    """(1 - prior) * soft + prior * previous masks, in [0, 1]; previous None (round 0) or prior 0: soft."""
    soft_KxHxW = np.asarray(soft_KxHxW, np.float32)
    if previous_KxHxW is None or prior <= 0.0:
        return soft_KxHxW
    if not 0.0 <= prior < 1.0:
        raise ValueError(f"the mask prior must be in [0, 1), got {prior}")
    previous_KxHxW = np.asarray(previous_KxHxW, np.float32)
    if previous_KxHxW.shape != soft_KxHxW.shape:
        raise ValueError(f"previous masks {previous_KxHxW.shape} and maps {soft_KxHxW.shape} differ in shape")
    return np.clip((1.0 - prior) * soft_KxHxW + prior * previous_KxHxW, 0.0, 1.0)


def labels_of_masks(masks_KxHxW) -> np.ndarray:
    """H x W int32: 0 where no mask, else 1 + the index of the (first) mask holding the pixel."""
    masks_KxHxW = np.asarray(masks_KxHxW, bool)
    any_HxW = masks_KxHxW.any(axis=0)
    return np.where(any_HxW, masks_KxHxW.argmax(axis=0) + 1, 0).astype(np.int32)


def mask_change(previous_CxHxW, now_CxHxW) -> list[float]:
    """Per concept 1 - IoU(previous, now): 0 when a mask did not move."""
    return [1.0 - iou(a, b) for a, b in zip(previous_CxHxW, now_CxHxW)]


def final_round(rounds_RxCxHxW, window: int | None = None) -> int:
    """Index of the round whose masks are the final ones, without ground truth: among the last `window`
    rounds (default: the last half, at least one), the one that changed least from the round before it
    (EM's closest approach to a fixed point); ties go to the later round, round 0 only when it is alone."""
    r = len(rounds_RxCxHxW)
    if r == 0:
        raise ValueError("no rounds to choose from")
    if r == 1:
        return 0
    window = max(1, min(r - 1, window if window else r // 2))
    candidates = range(r - window, r)
    change = [float(np.mean(mask_change(rounds_RxCxHxW[k - 1], rounds_RxCxHxW[k]))) for k in candidates]
    best = min(change)
    return [k for k, c in zip(candidates, change) if c <= best + 1e-9][-1]


# ------------------------------------------------------------------------------------------ label switching


def tied_groups(owner_C, init_words, kinds) -> tuple[tuple[int, ...], ...]:
    """Groups (indices into the concepts, in their order) of object concepts of one image that nothing tells
    apart at the start: the same init word, or none (random rows: which token takes which object is just
    as arbitrary, so IoUs match them too; only same-word groups are split in the first E-step, as random
    rows already have maps of their own: splitting them by position was measured to hurt, hard scene 0,
    object IoU at round 0 0.54 -> 0.16)."""
    seen: dict[tuple[int, str | None], list[int]] = {}
    for c, (owner, word, kind) in enumerate(zip(owner_C, init_words, kinds)):
        if kind == "object":
            seen.setdefault((int(owner), word or None), []).append(c)
    return tuple(tuple(g) for g in seen.values() if len(g) > 1)


def tie_warning(groups, tokens, init_words) -> str | None:
    """The warning for init words repeated within an image (None without any; random init is a choice)."""
    named = [g for g in groups if init_words[g[0]]]
    if not named:
        return None
    parts = [f"{', '.join(tokens[c] for c in g)} (all {init_words[g[0]]!r})" for g in named]
    return ("init words repeat within an image: " + "; ".join(parts) + ". These tokens start identical, so "
            "which one takes which region is arbitrary: here the first round splits their shared region in "
            "reading order (left to right) in the order the concepts were given. Give each concept words "
            "that tell it apart (its colour, e.g. 'red+square' and 'orange+square') or a mask (TOKEN@mask.png). "
            "IoUs against ground truth match tied concepts by the best assignment.")
