"""Exact dense CRF (crf_exact) and refine_labels' device backend: blocked messages equal a brute-force N x N
reference, the mean-field loop equals a brute-force DenseCRF2D update, the result agrees with pydensecrf's
lattice CRF, and the device backend recovers shapes at full and at reduced CRF resolution."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from jaxconcept.masks import crf, crf_exact

GREEN, RED, BLUE, YELLOW = (40, 160, 40), (200, 30, 30), (30, 40, 210), (220, 200, 40)


def disc(cy, cx, r, h, w):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def iou(a, b):
    return float((a & b).sum() / (a | b).sum())


def paint(rng, regions, h, w):
    """Green background, each (mask, colour) painted on top, Gaussian pixel noise (std 4), uint8."""
    img = np.empty((h, w, 3), np.float32)
    img[:] = GREEN
    for mask, colour in regions:
        img[mask] = colour
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def softmax0(x):
    e = np.exp(x - x.max(axis=0))
    return e / e.sum(axis=0)


# --- brute-force float64 reference: full N x N kernels, pydensecrf's semantics written out directly ---


def brute_kernels(img, p, self_term=True):
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    xy = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64)
    f_g = xy / p.gauss_sxy
    f_b = np.concatenate([xy / p.bilateral_sxy, img.reshape(-1, 3).astype(np.float64) / p.bilateral_srgb], 1)
    out = []
    for f, compat in ((f_g, p.gauss_compat), (f_b, p.bilateral_compat)):
        k = np.exp(-0.5 * ((f[:, None] - f[None]) ** 2).sum(-1))
        if not self_term:
            np.fill_diagonal(k, 0.0)
        out.append((k, compat))
    return out


def brute_pairwise(img, p, self_term=True, normalisation="symmetric"):
    """N x N matrix A with messages = Q @ A.T: Σ_k w_k D_k K_k D_k (or row-normalised K_k)."""
    a = 0.0
    for k, compat in brute_kernels(img, p, self_term):
        s = k.sum(1)
        if normalisation == "symmetric":
            a = a + compat * k / np.sqrt(s)[:, None] / np.sqrt(s)[None, :]
        else:
            a = a + compat * k / s[:, None]
    return a


def brute_inference(unary, img, p, iterations, **kw):
    a = brute_pairwise(img, p, **kw)
    q = softmax0(-unary)
    for _ in range(iterations):
        q = softmax0(-unary + q @ a.T)
    return q


def smooth_image(rng, h, w):
    """Float colours with structure at the kernel scales (a gradient, a square, noise)."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([8 * xx, 6 * yy, 40 + 0 * xx], -1).astype(np.float64)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] += 60
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.float32)


PARAMS = crf.CRFParams(gauss_sxy=1.7, bilateral_sxy=4.5, bilateral_srgb=13.0, gauss_compat=3.0, bilateral_compat=5.0)


@pytest.mark.parametrize("block_rows", [None, 37, 1, 255, 1000])
def test_blocked_messages_equal_brute_force(block_rows):
    rng = np.random.default_rng(0)
    h, w, n_labels = 15, 17, 3  # N = 255: 37 does not divide it
    img = smooth_image(rng, h, w)
    q = softmax0(rng.normal(0, 2, (n_labels, h * w)))
    ref = q @ brute_pairwise(img, PARAMS).T
    got = np.asarray(crf_exact.messages(q.astype(np.float32), img, PARAMS, block_rows=block_rows))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    dense = np.asarray(crf_exact.messages(q.astype(np.float32), img, PARAMS, dense=True))
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-5)
    # The general blocked filter on its own (appearance features, 5-D): K @ V with the self term.
    (k_b, _), feat = brute_kernels(img, PARAMS)[1], crf_exact.appearance_features(img, 4.5, 13.0)
    v = rng.normal(size=(h * w, 2))
    filt = np.asarray(crf_exact.gaussian_filter(feat, v.astype(np.float32), block_rows))
    np.testing.assert_allclose(filt, k_b @ v, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_rows", [None, 29])
def test_mean_field_equals_brute_force_update(block_rows):
    rng = np.random.default_rng(1)
    h, w, n_labels = 12, 14, 3  # N = 168, 29 does not divide it
    img = smooth_image(rng, h, w)
    unary = rng.uniform(0, 2, (n_labels, h * w))
    got = np.asarray(crf_exact.inference(unary.astype(np.float32), img, PARAMS, block_rows=block_rows))
    np.testing.assert_allclose(got, brute_inference(unary, img, PARAMS, PARAMS.iterations), atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)
    got3 = np.asarray(crf_exact.inference(unary.astype(np.float32), img, PARAMS, 3, block_rows=block_rows))
    np.testing.assert_allclose(got3, brute_inference(unary, img, PARAMS, 3), atol=1e-5)
    q0 = np.asarray(crf_exact.inference(unary.astype(np.float32), img, PARAMS, 0))
    np.testing.assert_allclose(q0, softmax0(-unary), atol=1e-6)  # like pydensecrf's inference(0)


def pydensecrf_case(h, w, n_labels, seed):
    """Flat-coloured discs on green, labels = the discs shifted by up to 2 px, 10% of pixels relabelled."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.int32)
    regions = []
    for lab, colour in zip(range(1, n_labels), (RED, BLUE, YELLOW)):
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        m = disc(cy, cx, rng.integers(h // 6, h // 3), h, w)
        regions.append((m, colour))
        labels[np.roll(m, tuple(rng.integers(-2, 3, 2)), (0, 1))] = lab
    img = paint(rng, regions, h, w)
    flip = rng.random((h, w)) < 0.1
    labels[flip] = rng.integers(0, n_labels, flip.sum())
    p = crf.CRFParams().scaled((h, w))
    return img, crf._unary_LxN(labels, n_labels, p.logit_gap, None), p


def pydensecrf_q(img, unary, p):
    import pydensecrf.densecrf as dcrf

    h, w = img.shape[:2]
    c = dcrf.DenseCRF2D(w, h, unary.shape[0])
    c.setUnaryEnergy(unary)
    c.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
    c.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=img, compat=p.bilateral_compat)
    return np.asarray(c.inference(p.iterations), np.float32)


CASES = [(20, 20, 2, 0), (20, 20, 2, 1), (24, 32, 3, 0), (24, 32, 3, 1), (32, 32, 4, 0), (32, 32, 4, 1)]


@pytest.mark.parametrize("h,w,n_labels,seed", CASES)
def test_agrees_with_pydensecrf(h, w, n_labels, seed):
    # The lattice is an approximation of the same model, so agreement is high but not exact. Measured on
    # these cases (CutLER params scaled to the size, 10 iterations): same argmax on 0.973-0.993 of the
    # pixels, mean |Q - Q_pydensecrf| 0.005-0.021; disagreements are isolated relabelled pixels.
    img, unary, p = pydensecrf_case(h, w, n_labels, seed)
    ref = pydensecrf_q(img, unary, p)
    q = np.asarray(crf_exact.inference(unary, img.astype(np.float32), p))
    agree, mean_abs = (q.argmax(0) == ref.argmax(0)).mean(), np.abs(q - ref).mean()
    print(f"{h}x{w} L={n_labels} seed={seed}: argmax agreement {agree:.4f}, mean |dQ| {mean_abs:.4f}")
    assert agree >= 0.96 and mean_abs <= 0.03, (agree, mean_abs)


def test_self_term_and_symmetric_normalisation_fit_pydensecrf_best():
    # The semantics read from the C++ (self term kept, D K D with D = 1/sqrt(K 1)) are the ones closest to
    # pydensecrf: dropping the self term or normalising by rows agrees clearly worse (measured mean
    # agreement 0.985 vs 0.950 / 0.974 over 9 such cases).
    variants = {"exact": {}, "no self term": {"self_term": False}, "row-normalised": {"normalisation": "row"}}
    agree = {name: [] for name in variants}
    for h, w, n_labels, seed in CASES[::2] + [(24, 24, 3, 2)]:
        img, unary, p = pydensecrf_case(h, w, n_labels, seed)
        ref = pydensecrf_q(img, unary, p).argmax(0)
        for name, kw in variants.items():
            q = brute_inference(unary.astype(np.float64), img.astype(np.float64), p, p.iterations, **kw)
            agree[name].append((q.argmax(0) == ref).mean())
    mean = {name: float(np.mean(v)) for name, v in agree.items()}
    assert mean["exact"] > mean["no self term"] + 0.01 and mean["exact"] > mean["row-normalised"] + 0.003, mean


def two_discs(h, seed):
    """Red and blue discs (scaled with h); labels: red too big, blue too small, both shifted, 8% flipped."""
    rng = np.random.default_rng(seed)
    s = h / 64
    t1, t2 = disc(20 * s, 20 * s, 11 * s, h, h), disc(42 * s, 42 * s, 14 * s, h, h)
    img = paint(rng, [(t1, RED), (t2, BLUE)], h, h)
    labels = np.zeros((h, h), np.int32)
    d = round(2 * s)
    labels[np.roll(ndimage.binary_dilation(t1, iterations=d), (d, -d), (0, 1))] = 1
    labels[np.roll(ndimage.binary_erosion(t2, iterations=d), (-d, d), (0, 1))] = 2
    flip = rng.random((h, h)) < 0.08
    labels[flip] = rng.integers(0, 3, flip.sum())
    return img, labels, (t1, t2)


def test_device_backend_recovers_the_discs():
    img, labels, truths = two_discs(64, 0)
    out, info = crf.refine_labels(img, labels, 3, backend="device")
    host, _ = crf.refine_labels(img, labels, 3)
    assert out.shape == (64, 64) and out.dtype == np.int32 and out.min() >= 0 and out.max() <= 2
    for lab, true in enumerate(truths, 1):
        before, after = iou(labels == lab, true), iou(out == lab, true)
        # Measured: red 0.555 -> 1.000, blue 0.595 -> 0.793 (host pydensecrf: 0.997, 0.781).
        assert after > before + 0.15 and after > 0.75 and after >= iou(host == lab, true) - 0.02, (lab, before, after)
    assert iou(out == 1, truths[0]) > 0.95
    assert info["backend"] == "device" and info["crf_size"] == (64, 64) and info["size"] == 64
    assert info["rejected"] == (False, False) and info["seconds"] > 0
    masks, minfo = crf.refine_masks(img, np.stack([labels == 1, labels == 2]), backend="device")
    np.testing.assert_array_equal(masks, np.stack([out == 1, out == 2]))
    assert minfo["backend"] == "device"


def test_device_backend_at_reduced_size_recovers_the_discs_at_full_resolution():
    img, labels, truths = two_discs(128, 0)
    out, info = crf.refine_labels(img, labels, 3, backend="device", size=(32, 32))
    assert out.shape == (128, 128) and out.dtype == np.int32
    for lab, true in enumerate(truths, 1):
        before, after = iou(labels == lab, true), iou(out == lab, true)
        # Measured: red 0.557 -> 0.834, blue 0.599 -> 0.878. A 4x coarser CRF places edges to about a
        # coarse cell, hence below the full-resolution result.
        assert after > before + 0.2 and after > 0.8, (lab, before, after)
    assert info["crf_size"] == (32, 32) and info["size"] == 32 and info["backend"] == "device"
    assert info["params"] == crf.CRFParams().scaled(32) and info["rejected"] == (False, False)
    # Hard 0/1 soft maps area-average exactly like the labels' one-hot maps: the same result.
    onehot = np.stack([labels == 1, labels == 2]).astype(np.float32)
    soft, _ = crf.refine_labels(img, labels, 3, soft_KxHxW=onehot, backend="device", size=(32, 32))
    np.testing.assert_array_equal(soft, out)
    # Non-square, non-dividing size; the host backend takes a size too.
    for backend in ("device", "host"):
        odd, info = crf.refine_labels(img, labels, 3, backend=backend, size=(32, 24))
        assert odd.shape == (128, 128) and info["crf_size"] == (32, 24)
        assert min(iou(odd == lab, t) for lab, t in enumerate(truths, 1)) > 0.8


def test_area_and_bilinear_resampling_matrices():
    down = crf._area_matrix(3, 7)  # cells of 7/3 pixels
    np.testing.assert_allclose(down.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(down.sum(0), 3 / 7, rtol=1e-6)  # every pixel is spread over cells in full
    np.testing.assert_allclose(crf._area_matrix(2, 4), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    x = np.array([[[0.0, 4.0], [8.0, 12.0]]], np.float32)  # 1 x 2 x 2
    up = crf._bilinear_upsample(x, 4, 3)  # half-pixel centres: 0.25/0.75 blends, clamped at the ends
    np.testing.assert_allclose(up[0, :, 0], [0, 2, 6, 8])
    np.testing.assert_allclose(up[0, 0], [0, 2, 4])  # 2 -> 3: centres at -1/6 (clamped), 1/2, 7/6
    np.testing.assert_allclose(crf._bilinear_upsample(x, 2, 2), x)
    ref = jax.image.resize(x, (1, 8, 6), "bilinear")  # the same convention as jax.image.resize upsampling
    np.testing.assert_allclose(crf._bilinear_upsample(x, 8, 6), ref, atol=1e-5)
    # Integer factors take block means, other sizes the overlap matrices: the same area average.
    img = np.random.default_rng(0).random((3, 12, 8)).astype(np.float32)
    blocks = crf._area_downsample(img, 4, 2)
    np.testing.assert_allclose(blocks, crf._resample(img, crf._area_matrix(4, 12), crf._area_matrix(2, 8)), atol=1e-6)
    assert crf._area_downsample(img, 5, 3).shape == (3, 5, 3)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"backend": "gpu"}, "backend must be one of"),
        ({"backend": None}, "backend must be one of"),
        ({"size": (0, 8)}, "must be positive"),
        ({"size": (8, -1)}, "must be positive"),
        ({"size": (65, 64)}, r"must not exceed the input's H x W \(64, 64\)"),
        ({"size": (32, 128)}, "must not exceed"),
        ({"size": 32}, "pair of ints"),
        ({"size": (32,)}, "pair of ints"),
        ({"size": (32.5, 32)}, "pair of ints"),
    ],
)
def test_bad_backend_or_size_raise(kw, match):
    img, labels, _ = two_discs(64, 0)
    with pytest.raises(crf.CRFInputError, match=match):
        crf.refine_labels(img, labels, 3, **kw)
    with pytest.raises(crf.CRFInputError, match=match):
        crf.refine_masks(img, np.stack([labels == 1, labels == 2]), **kw)
