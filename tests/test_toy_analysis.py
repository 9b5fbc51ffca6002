"""The toy analysis names colour, shape and pattern of true and found regions, on clean and degraded scenes.

Thresholds in `analysis` were tuned on seeds 1000-1199; these tests assert on seeds 0-39.
"""

import functools

import numpy as np
import pytest

from jaxconcept.toy import analysis as A
from jaxconcept.toy import scene as S

EVAL_SEEDS = range(40)


def degrade(image_uint8: np.ndarray, seed: int, noise_std: float = 8.0) -> np.ndarray:
    """3x3 box blur, then Gaussian noise: a stand-in for an imperfect sample of a small diffusion model."""
    x = np.pad(image_uint8.astype(float), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image_uint8.shape[:2]
    blurred = sum(x[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    noisy = blurred + np.random.default_rng(seed).normal(0.0, noise_std, blurred.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _scenes(size: int) -> tuple:
    return tuple(S.make_scene(seed, size) for seed in EVAL_SEEDS)


def _image(scene: S.Scene, degraded: bool) -> np.ndarray:
    return degrade(scene.image, 10_000 + scene.seed) if degraded else scene.image


@pytest.mark.parametrize("size", [64, 32])
def test_describe_region_on_true_masks_recovers_color_shape_and_pattern(size):
    hits = {"color": 0, "shape": 0, "pattern": 0}
    total = 0
    for scene in _scenes(size):
        for obj in scene.objects:
            got = A.describe_region(scene.image, scene.masks[obj.name])
            total += 1
            for key in hits:
                hits[key] += got[key] == getattr(obj, key)
            assert 0 <= got["color_confidence"] <= 1 and 0 <= got["pattern_confidence"] <= 1
    rates = {k: v / total for k, v in hits.items()}
    msg = f"{size} px, {total} objects: rates {rates}"
    assert total >= 60, msg
    assert rates["color"] >= 0.95 and rates["shape"] >= 0.95 and rates["pattern"] >= 0.85, msg


@pytest.mark.parametrize("size,degraded,minimum", [(64, False, 0.9), (64, True, 0.8), (32, False, 0.9),
                                                   (32, True, 0.8)])
def test_find_objects_finds_the_captioned_objects(size, degraded, minimum):
    found = with_pattern = expected = extra = 0
    for scene in _scenes(size):
        result = A.match_caption(_image(scene, degraded), scene.objects)
        assert len(result["found"]) == len(scene.objects)
        found += sum(result["found"])
        with_pattern += sum(bool(p) for p in result["pattern_matched"])
        expected += len(scene.objects)
        extra += result["unmatched_detections"]
    rate = found / expected
    msg = (f"{size} px, {'noise+blur' if degraded else 'clean'}: colour+shape {rate:.3f}, "
           f"+pattern {with_pattern / expected:.3f}, {extra} extra detections, {expected} objects")
    assert rate >= minimum, msg
    assert extra <= 0.1 * expected, msg


def test_found_objects_come_with_masks_that_match_the_truth():
    scene = S.make_scene(5, 64, num_objects=3)
    found = A.find_objects(scene.image)
    assert len(found) == 3
    for det in found:
        assert det["mask"].shape == (64, 64) and det["area"] == det["mask"].sum()
        top, left, bottom, right = det["bbox"]
        assert det["mask"][top:bottom, left:right].sum() == det["area"]
        best = max(scene.objects, key=lambda o: (scene.masks[o.name] & det["mask"]).sum())
        truth = scene.masks[best.name]
        assert (truth & det["mask"]).sum() / (truth | det["mask"]).sum() > 0.95
        assert (det["color"], det["shape"], det["pattern"]) == (best.color, best.shape, best.pattern)


@pytest.mark.parametrize("size", [32, 64])
def test_pure_background_has_no_objects(size):
    for i, (color, texture) in enumerate((c, t) for c in S.BACKGROUND_COLORS for t in S.TEXTURES):
        image, masks = S.render([], S.Background(color, texture), size, np.random.default_rng(i))
        assert masks["background"].all()
        for picture in (image, degrade(image, i)):
            assert A.find_objects(picture) == [], (color, texture)
            assert A.describe_background(picture)["color"] == color


def test_match_caption_reports_missing_and_wrong_objects():
    scene = S.make_scene(3, 64, num_objects=2)
    first, second = scene.objects
    absent_color = next(c for c in S.compatible_colors(scene.background.color) if c not in (first.color, second.color))
    expected = [first.to_dict(), {"color": second.color, "shape": second.shape},
                {"color": absent_color, "shape": first.shape, "pattern": "solid"}]
    result = A.match_caption(scene.image, expected)
    assert result["found"] == [True, True, False]
    assert result["pattern_matched"] == [True, None, False]
    assert result["fraction"] == pytest.approx(2 / 3) and result["pattern_fraction"] == pytest.approx(1 / 2)
    assert len(result["detected"]) == 2 and result["unmatched_detections"] == 0
    assert all("mask" not in d for d in result["detected"])
    wrong_pattern = next(p for p in S.PATTERNS if p != first.pattern)
    again = A.match_caption(scene.image, [dict(first.to_dict(), pattern=wrong_pattern)])
    assert again["found"] == [True] and again["pattern_matched"] == [False]


def test_numpy_labelling_fallback_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((40, 50)) < 0.45
        for connectivity in (4, 8):
            fast, n_fast = A.label(mask, connectivity)
            slow, n_slow = A.label(mask, connectivity, use_scipy=False)
            assert n_fast == n_slow and np.array_equal(fast, slow)
        np.testing.assert_array_equal(A.fill_holes(mask, 3), A.fill_holes(mask, 3, use_scipy=False))
    ring = S.shape_mask("ring", (0.2, 0.2, 0.6), 32)
    assert A.fill_holes(ring, max_hole=10).sum() == ring.sum()  # the ring's hole is bigger: kept
    assert A.fill_holes(ring).sum() > ring.sum()
    scene = S.make_scene(11, 32)
    fast, slow = A.find_objects(scene.image), A.find_objects(scene.image, use_scipy=False)
    assert [d["color"] for d in fast] == [d["color"] for d in slow]
    assert all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(fast, slow))


def test_describe_region_refuses_unusable_input():
    scene = S.make_scene(0, 32)
    with pytest.raises(ValueError, match="non-empty"):
        A.describe_region(scene.image, np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="mask shape"):
        A.describe_region(scene.image, np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="RGB"):
        A.find_objects(scene.image[..., 0])
