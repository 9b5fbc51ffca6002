"""Masks from attention maps: labels, clean-up, the never-empty rule, IoU."""

import jax.numpy as jnp
import numpy as np

from jaxconcept.masks import labels as masks


def test_labels_argmax_against_background_level():
    maps = np.zeros((2, 4, 6), np.float32)
    maps[0, :, :2] = 0.9  # concept 0 on the left
    maps[1, :, 4:] = 0.6  # concept 1 on the right
    maps[1, 0, 0] = 0.95  # a pixel where concept 1 beats concept 0
    labels = np.asarray(masks.labels_from_maps(jnp.asarray(maps), background_level=0.5))
    expected = np.zeros((4, 6), int)
    expected[:, :2], expected[:, 4:], expected[0, 0] = 1, 2, 2
    np.testing.assert_array_equal(labels, expected)
    k_masks = masks.masks_from_labels(labels, 2)
    assert k_masks.shape == (2, 4, 6) and not (k_masks[0] & k_masks[1]).any()  # no overlap
    assert np.asarray(masks.labels_from_maps(jnp.asarray(maps), background_level=1.0)).max() == 0


def test_clean_mask_fills_holes_and_drops_specks():
    m = np.zeros((40, 40), bool)
    m[5:25, 5:25] = True
    m[12:15, 12:15] = False  # a hole
    m[35, 35] = True  # a speck
    cleaned = masks.clean_mask(m, min_fraction=0.01)
    assert cleaned[13, 13] and not cleaned[35, 35]
    assert cleaned.sum() == 400


def test_empty_mask_falls_back_to_top_of_soft_map():
    soft = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    mask, used = masks.nonempty_or_fallback(np.zeros((10, 10), bool), soft, top_fraction=0.1)
    assert used and mask.sum() == 10 and mask[9].all()
    same, used = masks.nonempty_or_fallback(soft > 0.5, soft)
    assert not used and same.sum() == 50


def test_iou_and_upsampling():
    a = np.zeros((4, 4), bool); a[:2] = True
    b = np.zeros((4, 4), bool); b[:, :2] = True
    assert masks.iou(a, b) == 4 / 12 and masks.iou(a, a) == 1.0
    up = masks.upsample_maps(jnp.ones((3, 4, 4)) * 0.5, (16, 16))
    assert up.shape == (3, 16, 16) and np.allclose(up, 0.5)


def test_clean_mask_keeps_a_rings_hole():
    yy, xx = np.mgrid[:40, :40]
    r2 = (yy - 20) ** 2 + (xx - 20) ** 2
    ring = (r2 < 15 ** 2) & (r2 >= 8 ** 2)
    pinholed = ring.copy()
    pinholed[20, 9] = False  # a pin-hole inside the band
    cleaned = masks.clean_mask(pinholed)
    assert not cleaned[20, 20]  # the ring's hole stays open
    np.testing.assert_array_equal(cleaned, ring)
