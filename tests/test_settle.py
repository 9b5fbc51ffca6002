"""EM settling and label switching: the pure rules of settle.py, masks.matched_ious / split_tied_maps and the
CRF's hysteresis, on small synthetic scenes."""

import numpy as np
import pytest

from jaxconcept.masks import crf, labels as masks, settle


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _ring_scene(size=48):
    """A purple ring (hole 0.55 of its radius) on grey; its 'attention' fills the hole and spills out, as
    the toy model's does on the bundled scene."""
    outer = _disc(size, size, size / 2, size / 2, 14)
    ring = outer & ~_disc(size, size, size / 2, size / 2, 14 * 0.55)
    image = np.full((size, size, 3), 128, np.uint8)
    image[ring] = (150, 60, 200)
    blob = _disc(size, size, size / 2, size / 2, 19)  # the unrefined mask: the filled, blurred disc
    return image, ring, blob


def test_crf_hysteresis_keeps_a_refinement_the_previous_round_accepted():
    image, ring, _ = _ring_scene()
    blob = _disc(48, 48, 24, 24, 21)  # a filled disc well beyond the ring: the CRF moves it far
    labels, soft = blob.astype(np.int32), blob[None].astype(np.float32) * 0.6
    free, info0 = crf.refine_labels(image, labels, 2, crf.CRFParams(min_iou=0.0), soft_KxHxW=soft)
    assert info0["iou"][0] < 0.5 and masks.iou(free == 1, blob) < 0.5
    kept, info = crf.refine_labels(image, labels, 2, soft_KxHxW=soft)
    assert info["rejected"] == (True,)  # far from this round's unrefined mask: rejected (CutLER's rule)
    np.testing.assert_array_equal(kept, labels)
    again, info2 = crf.refine_labels(image, labels, 2, soft_KxHxW=soft, reference_HxW=free)
    assert info2["rejected"] == (False,)  # the same refinement as last round's mask: kept
    np.testing.assert_array_equal(again, free)
    _, info3 = crf.refine_labels(image, labels, 2, soft_KxHxW=soft, reference_HxW=np.zeros_like(labels))
    assert info3["rejected"] == (True,)  # a reference that disagrees changes nothing


def test_damp_maps_blends_with_the_previous_masks():
    soft = np.full((2, 4, 4), 0.5, np.float32)
    prev = np.zeros((2, 4, 4), bool)
    prev[0, :2] = True
    got = settle.damp_maps(soft, prev, 0.4)
    np.testing.assert_allclose(got[0, :2], 0.7, atol=1e-6)
    np.testing.assert_allclose(got[0, 2:], 0.3, atol=1e-6)
    np.testing.assert_allclose(settle.damp_maps(soft, None, 0.4), soft)  # round 0: nothing to damp towards
    with pytest.raises(ValueError):
        settle.damp_maps(soft, prev, 1.0)


def test_final_round_is_the_most_settled_of_the_last_rounds_and_needs_no_truth():
    a = np.zeros((2, 8, 8), bool)
    a[0, :4] = True
    a[1, 4:] = True
    b, c = a.copy(), a.copy()
    b[0, :, :2] = False  # another state
    c[0, :, :1] = False  # a state near a
    assert settle.final_round([b, b, a, b, a, a]) == 5  # settled at the end
    assert settle.final_round([b, a, a, b, b, a]) == 4  # the last half's smallest change (b -> b)
    assert settle.final_round([b, a, b, a, c, a]) == 5  # a <-> c changes less than a <-> b: the later of them
    assert settle.final_round([a, b, a, b]) == 3  # always changing as much: the last round
    assert settle.final_round([a]) == 0 and settle.final_round([b, a]) == 1
    assert settle.mask_change(a, b)[0] == pytest.approx(0.25) and settle.mask_change(a, a) == [0.0, 0.0]


def test_matched_ious_assign_tied_concepts_to_the_best_truth():
    left, right = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    left[4:10, 1:6] = True
    right[4:10, 10:15] = True
    bg = ~(left | right)
    pred, truth = np.stack([right, left, bg]), np.stack([left, right, bg])  # the two tokens swapped
    assert masks.matched_ious(pred, truth) == [0.0, 0.0, 1.0]
    assert masks.matched_ious(pred, truth, [(0, 1)]) == [1.0, 1.0, 1.0]
    assert masks.matched_ious(np.stack([left, right, bg]), truth, [(0, 1)]) == [1.0, 1.0, 1.0]
    # which truth each concept was matched to: the swap is undone only inside the tied group
    assert masks.matched_truths(pred, truth, [(0, 1)]) == [1, 0, 2] and masks.matched_truths(pred, truth) == [0, 1, 2]


def test_tied_concepts_split_their_region_in_reading_order():
    h = w = 24
    a, b = _disc(h, w, 12, 5, 3), _disc(h, w, 12, 18, 3)
    shared = np.where(a | b, 0.9, 0.05).astype(np.float32)
    soft = np.stack([shared, shared * 0.99])  # near-identical maps: the second concept never wins an argmax
    split = masks.split_tied_maps(soft, [(0, 1)], 0.55)
    labels = np.asarray(masks.labels_from_maps(split, 0.55))
    assert masks.iou(labels == 1, a) == 1.0 and masks.iou(labels == 2, b) == 1.0  # first given: leftmost
    merged = np.where(_disc(h, w, 12, 12, 8), 0.9, 0.05).astype(np.float32)  # one blob: halves along x
    parts = masks.reading_order_regions(merged >= 0.55, 2)
    assert abs(int(parts[0].sum()) - int(parts[1].sum())) <= 2 * h and not (parts[0] & parts[1]).any()
    assert np.nonzero(parts[0])[1].max() < np.nonzero(parts[1])[1].min()


def test_tied_groups_and_their_warning():
    groups = settle.tied_groups([0, 0, 0, 1, 1], ["square", "square", "background", "square", None],
                                ["object", "object", "background", "object", "object"])
    assert groups == ((0, 1),)  # per image, objects only
    text = settle.tie_warning(groups, ["<a>", "<b>", "<bg>", "<c>", "<d>"], ["square"] * 5)
    assert "<a>, <b>" in text and "arbitrary" in text and "colour" in text and "best assignment" in text
    unnamed = settle.tied_groups([0, 0, 0], [None, None, "background"], ["object", "object", "background"])
    assert unnamed == ((0, 1),)  # random rows: matched too, but no warning (random init is a choice)
    assert settle.tie_warning(unnamed, ["<a>", "<b>", "<bg>"], [None, None, "background"]) is None
    assert settle.tie_warning((), [], []) is None


def test_e_step_splits_tied_concepts_and_metrics_match_them():
    from jaxconcept.masks import estep

    h = w = 32
    a, b = _disc(h, w, 16, 7, 4), _disc(h, w, 16, 24, 4)
    image = np.full((h, w, 3), 128, np.uint8)
    image[a | b] = (220, 40, 40)
    shared = np.where(a | b, 0.9, 0.05).astype(np.float32)
    soft = np.stack([shared * 0.99, shared, np.zeros_like(shared)])  # the second would win both regions
    kinds = ["object", "object", "background"]
    untied, _, _ = estep.assign_masks(soft, image, kinds, estep.MaskRules(0.55))
    assert not untied[0].any() or masks.iou(untied[1], a | b) > 0.9  # without the tie-break one token takes all
    got, _, _ = estep.assign_masks(soft, image, kinds, estep.MaskRules(0.55), ties=[(0, 1)])
    assert masks.iou(got[0], a) > 0.95 and masks.iou(got[1], b) > 0.95 and masks.iou(got[2], ~(a | b)) > 0.95
    truth = np.stack([b, a, ~(a | b)])  # the truth names them the other way round
    entry = estep.round_metrics(1, got, got, got, {}, ["<x>", "<y>", "<bg>"], truth, tied=((0, 1),))
    assert min(entry["iou"].values()) > 0.95 and entry["mask_change"] == 0.0
    assert "best assignment" in entry["iou_matching"]
    plain = estep.round_metrics(1, got, got, None, {}, ["<x>", "<y>", "<bg>"], truth)
    assert plain["iou"]["<x>"] < 0.05 and "iou_matching" not in plain
