"""Multi-label DenseCRF refinement of concept masks (docs/method.md §5), run between device steps: on the host
(pydensecrf) or on the device (exact CRF in JAX, `crf_exact`).

Method (CutLER's MaskCut refinement, extended from fg/bg to background + K concepts):

- Unary: −log softmax of per-pixel logits. CutLER uses logits [1 − m, m] for a binary mask m, so the
  current label gets e/(1 + e) ≈ 0.731 and the other 0.269: a *soft* prior that the pairwise terms can
  overturn near colour edges. With L = K + 1 labels the natural extension is logits g·one_hot(label): the
  energy gap between the current label and every other label stays g (= 1 for CutLER), so the pairwise
  terms, tuned by CutLER against that gap, keep the same strength. The current label then gets
  e^g / (e^g + L − 1) (0.731 for L = 2, 0.576 for L = 3), the others share the rest equally.
  `CRFParams.confidence` is the two-label probability (0.731 ↔ g = 1).
  With soft maps m_k ∈ [0, 1] (per-concept, normalised per token, docs/method.md §4) the logits are
  g·[1 − max_k m_k, m_1, …, m_K]: for K = 1 this is exactly CutLER's [1 − m, m], and hard 0/1 maps give
  the same unary as hard labels.
- Pairwise: Gaussian (sxy 3, compat 7) + bilateral (sxy 50, srgb 5, compat 10), Potts compatibility,
  10 mean-field iterations, argmax. Spatial std-devs are in pixels for a 480 px image
  (`reference_size`); `scaled` makes them linear in the size the CRF runs at (floor 0.5 px). srgb is in
  colour units and is not scaled.
- Holes: like CutLER, each concept's refined mask has its holes filled, but only with background pixels,
  so a concept sitting inside another's hole keeps its pixels, and only small holes (up to 10% of the
  mask's area): a ring keeps its hole.
- Rejection: concept k whose refined mask has IoU < `min_iou` with its unrefined mask is rejected and its
  unrefined mask is kept (CutLER: 0.5). Precedence, so masks never overlap: (1) pixels the CRF gave to a
  rejected label but which were not that label before go back to their unrefined label (the CRF's
  verdict there is not trusted); (2) then every rejected label's unrefined pixels are written back, over
  whatever accepted label the CRF put there. A rejected mask is therefore exactly its unrefined mask; an
  accepted mask is its refined mask minus the pixels restored to rejected labels. Labels are the
  reference: a concept absent from the unrefined labels stays absent (IoU 0 → rejected) even if its soft
  map would make it appear.

Backends (`backend=`): "host" runs pydensecrf (permutohedral-lattice filtering, approximate, CPU);
"device" runs `crf_exact` (JAX, exact O(N²) sums over all pixel pairs, same model and update otherwise;
on 20×20–32×32 test scenes its argmax agrees with pydensecrf on 97–99% of pixels, mean |ΔQ| ≤ 0.021, the
rest is the lattice's approximation). Exact is O(N²), so the device backend is meant for small N.

CRF size (`size=`): None runs the CRF at the input's H×W. `size=(h, w)` (no larger than H×W) runs it at
h×w: the image is area-averaged to h×w (float colours; the host backend rounds them to uint8), the unary
is built from area-averaged soft maps (hard labels: their one-hot maps, so hard 0/1 soft maps and labels
still give the same unary), spatial params are scaled to max(h, w), and the final Q is upsampled
bilinearly (half-pixel centres) to H×W and argmax-ed there; holes and rejection then run at H×W. Typical:
the latent resolution (64×64 for 512 px). Edges are then placed to about one coarse cell (a 4× coarser CRF
gives IoU ≈ 0.83–0.88 on test discs that a full-resolution CRF gets to 0.8–1.0).

Cost (measured on this project's 2-core CPU host with a training job running beside it, load ≈ 2, so
upper bounds; 3 labels, 10 iterations, median of 5–7 runs, `info["seconds"]`): 64×64 ≈ 0.015 s;
512×512 ≈ 0.47 s from hard labels, ≈ 0.57 s from soft maps; the rest of the call (unary checks, hole
filling, rejection) adds ≈ 0.02 s at 512². Time grows with pixels and with labels (the bilateral
permutohedral lattice dominates). At latent resolution (64×64) the CRF is negligible beside a device
step; at image resolution it is not, so run it at the resolution the masks are used at.

Device backend on the same 2-core CPU (XLA CPU, no accelerator; load ≈ 0.5, 3 labels, 10 iterations,
median of 7): exact CRF at 64×64 ≈ 0.041 s after compilation (≈ 0.3 s first call per shape; host
pydensecrf at 64×64: 0.009 s, at 512×512: 0.39 s); `refine_labels(512² image, backend="device",
size=(64, 64))` ≈ 0.051 s in `info["seconds"]` (0.064 s the whole call); host with size=(64, 64) ≈ 0.019 s.
An exact CRF at 512×512 (N = 262144) is not practical: use `size`.

Inputs are numpy. pydensecrf (`pydensecrf2` on PyPI) needs C-contiguous arrays, a float32
unary and a uint8 image; everything is copied into that form here, so views (e.g. transposes) are fine.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from jaxconcept.errors import JaxconceptError
from jaxconcept.masks.labels import fill_small_holes


class CRFInputError(JaxconceptError, ValueError):
    """Image, labels, masks or soft maps of the wrong shape, dtype or range for the CRF."""


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """DenseCRF settings (CutLER's), spatial ones in pixels for a `reference_size` px image.

    confidence: probability of the current label in the two-label case (0.731 = e/(1+e), CutLER's
      softmax of [1 − m, m]); sets the logit gap g = log(c / (1 − c)) used for any number of labels.
    gauss_*: smoothness kernel (position only). bilateral_*: appearance kernel (position + colour).
    min_iou: reject a concept's refined mask below this IoU with its unrefined mask.
    fill_holes: fill holes of each refined concept mask with background pixels (CutLER does).
    min_sxy: floor for scaled spatial std-devs, in pixels.
    """

    confidence: float = 0.7310585786300049
    gauss_sxy: float = 3.0
    gauss_compat: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    iterations: int = 10
    min_iou: float = 0.5
    fill_holes: bool = True
    reference_size: int = 480
    min_sxy: float = 0.5

    def __post_init__(self):
        if not 0.0 < self.confidence < 1.0:
            raise CRFInputError(f"CRFParams.confidence must be in (0, 1), got {self.confidence}")
        if self.iterations < 1:
            raise CRFInputError(f"CRFParams.iterations must be >= 1, got {self.iterations}")
        if self.reference_size <= 0:
            raise CRFInputError(f"CRFParams.reference_size must be > 0, got {self.reference_size}")

    @property
    def logit_gap(self) -> float:
        return math.log(self.confidence / (1.0 - self.confidence))

    def scaled(self, size) -> "CRFParams":
        """Copy with both spatial std-devs scaled by size / reference_size (never below min_sxy).

        `size` is the CRF's resolution in pixels: an int, or (H, W) whose longer side is used.
        The result has reference_size = size, so scaling it again is a no-op for the same size.
        """
        size = int(max(size)) if isinstance(size, (tuple, list)) else int(size)
        if size <= 0:
            raise CRFInputError(f"CRF size must be > 0 pixels, got {size}")
        f = size / self.reference_size
        return dataclasses.replace(
            self,
            gauss_sxy=max(self.min_sxy, self.gauss_sxy * f),
            bilateral_sxy=max(self.min_sxy, self.bilateral_sxy * f),
            reference_size=size,
        )


def scaled(params: CRFParams, size) -> CRFParams:
    """`params.scaled(size)`: spatial std-devs linear in the CRF resolution."""
    return params.scaled(size)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CRFInputError(
            f"CRF image must be uint8 H x W x 3 (RGB), got dtype {image.dtype} shape {image.shape}"
        )
    return np.ascontiguousarray(image)


def _unary_LxN(labels_HxW, num_labels: int, gap: float, soft_KxHxW) -> np.ndarray:
    """−log softmax of g·one_hot(labels) or g·[1 − max m, m_1..m_K]; float32, C-contiguous (L, H·W)."""
    if soft_KxHxW is None:
        logits_LxHxW = (labels_HxW[None] == np.arange(num_labels)[:, None, None]).astype(np.float32)
    else:
        bg_1xHxW = 1.0 - soft_KxHxW.max(axis=0, keepdims=True)
        logits_LxHxW = np.concatenate([bg_1xHxW, soft_KxHxW]).astype(np.float32)
    logits_LxN = gap * logits_LxHxW.reshape(num_labels, -1)
    # Stable −log softmax = logsumexp − logit (per pixel constant shifts don't change the CRF).
    top_N = logits_LxN.max(axis=0)
    lse_N = top_N + np.log(np.exp(logits_LxN - top_N).sum(axis=0))
    return np.ascontiguousarray(lse_N - logits_LxN, dtype=np.float32)


BACKENDS = ("host", "device")


def _check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise CRFInputError(f"CRF backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _crf_size(size, h: int, w: int) -> tuple[int, int]:
    """(h, w) the CRF runs at: the input's for None, else a positive pair no larger than the input."""
    if size is None:
        return h, w
    try:
        ch, cw = size
        ok = all(int(v) == v and not isinstance(v, bool) for v in (ch, cw))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CRFInputError(f"CRF size must be None or a pair of ints (h, w), got {size!r}")
    ch, cw = int(ch), int(cw)
    if ch <= 0 or cw <= 0:
        raise CRFInputError(f"CRF size must be positive, got {(ch, cw)}")
    if ch > h or cw > w:
        raise CRFInputError(f"CRF size {(ch, cw)} must not exceed the input's H x W {(h, w)}")
    return ch, cw


def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """n_out x n_in area-averaging weights: output cell i covers [i·s, (i + 1)·s) input pixels, s = n_in/n_out."""
    s = n_in / n_out
    lo_O, hi_O = np.arange(n_out) * s, (np.arange(n_out) + 1) * s
    j_I = np.arange(n_in)
    overlap_OxI = np.clip(np.minimum(hi_O[:, None], j_I[None] + 1) - np.maximum(lo_O[:, None], j_I[None]), 0, None)
    return (overlap_OxI / s).astype(np.float32)


def _linear_taps(n_out: int, n_in: int):
    """Source indices (lo, hi) and weight of hi for linear interpolation, half-pixel centres, clamped."""
    src_O = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo_O = np.floor(src_O).astype(np.int64)
    return lo_O, np.minimum(lo_O + 1, n_in - 1), (src_O - lo_O).astype(np.float32)


def _bilinear_upsample(x_CxhxW, h: int, w: int) -> np.ndarray:
    """Bilinear resize of the last two axes to h x w (half-pixel centres, edges clamped).

    Two-tap gathers rather than matmuls: cheaper, and no BLAS threads left spinning beside the next
    XLA CPU call (see `_area_downsample`).
    """
    lo, hi, f = _linear_taps(w, x_CxhxW.shape[2])
    x_Cxhxw = x_CxhxW[:, :, lo] * (1 - f) + x_CxhxW[:, :, hi] * f
    lo, hi, f = _linear_taps(h, x_CxhxW.shape[1])
    return x_Cxhxw[:, lo] * (1 - f)[:, None] + x_Cxhxw[:, hi] * f[:, None]


def _resample(x_CxHxW, rows_hxH, cols_wxW) -> np.ndarray:
    """rows @ x_c @ cols.T for every channel c: two matmuls (a 3-operand np.einsum loops naively, 100x slower)."""
    return np.matmul(rows_hxH, np.matmul(x_CxHxW, cols_wxW.T))


def _area_downsample(x_CxHxW, h: int, w: int) -> np.ndarray:
    """Area average to C x h x w: block means for integer factors, else overlap-weighted matrices.

    Block means avoid BLAS: on a small CPU host, numpy's OpenBLAS threads keep spinning for a while after
    a large matmul and slow a following XLA CPU call (measured: 0.064 s instead of 0.041 s for the exact
    CRF at 64 x 64 on 2 cores).
    """
    c, big_h, big_w = x_CxHxW.shape
    if big_h % h == 0 and big_w % w == 0:
        return x_CxHxW.reshape(c, h, big_h // h, w, big_w // w).mean(axis=(2, 4), dtype=np.float32)
    return _resample(x_CxHxW, _area_matrix(h, big_h), _area_matrix(w, big_w))


def _crf_q(image, unary_LxN, num_labels: int, sp: CRFParams, backend: str) -> np.ndarray:
    """Final mean-field Q (L x h·w, float32 on the host) from the chosen backend."""
    h, w = image.shape[:2]
    if backend == "device":
        from jaxconcept.masks import crf_exact  # jax code, imported when used

        return np.asarray(crf_exact.inference(unary_LxN, np.asarray(image, np.float32), sp), np.float32)

    import pydensecrf.densecrf as dcrf  # host-only dependency, imported when used

    if image.dtype != np.uint8:  # an area-downsampled image: pydensecrf takes uint8 colours
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    crf = dcrf.DenseCRF2D(w, h, num_labels)  # pydensecrf takes width first
    crf.setUnaryEnergy(unary_LxN)
    crf.addPairwiseGaussian(sxy=sp.gauss_sxy, compat=sp.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=sp.bilateral_sxy, srgb=sp.bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=sp.bilateral_compat
    )
    return np.asarray(crf.inference(sp.iterations), np.float32)


def refine_labels(
    image,
    labels_HxW,
    num_labels: int,
    params: CRFParams | None = None,
    soft_KxHxW=None,
    *,
    backend: str = "host",
    size=None,
    reference_HxW=None,
):
    """Multi-label DenseCRF on a label map: 0 = background, 1..num_labels − 1 = concepts.

    num_labels counts the background (L = K + 1). `image` is uint8 H x W x 3 at the labels' resolution;
    `soft_KxHxW` (optional, values in [0, 1], K = num_labels − 1) replaces the hard-label unary, see the
    module docstring. `params` are for `params.reference_size` px and are scaled to the CRF's size here.
    backend: "host" (pydensecrf) or "device" (exact CRF in JAX, `crf_exact`). size: None (the CRF runs
    at H x W) or (h, w) <= (H, W): the CRF runs at h x w on area-downsampled inputs and its Q is
    upsampled bilinearly to H x W before the argmax (module docstring). reference_HxW (optional labels,
    e.g. the previous EM round's): hysteresis, a concept's refinement is also accepted when its IoU with
    its mask there reaches `min_iou` (rejected pixels still go back to the unrefined labels).

    Returns (labels_HxW int32, info); info["rejected"] and info["iou"] are tuples over concepts
    (index i ↔ label i + 1 ↔ mask i), info["seconds"] the CRF wall time (resampling, unary, inference,
    Q back on the host, argmax), info["params"] the scaled params, info["size"] the size they were
    scaled to (max(h, w)), info["crf_size"] the CRF's (h, w), info["backend"] the backend.
    """
    params = params or CRFParams()
    backend = _check_backend(backend)
    image = _check_image(image)
    h, w = image.shape[:2]
    labels_HxW, num_labels, soft_KxHxW = _checked_labels(labels_HxW, num_labels, soft_KxHxW, h, w)
    k = num_labels - 1
    ch, cw = crf_size = _crf_size(size, h, w)
    sp = params.scaled(crf_size)
    unrefined_HxW = labels_HxW.astype(np.int32)
    info = {
        "rejected": (False,) * k,
        "iou": (1.0,) * k,
        "seconds": 0.0,
        "params": sp,
        "size": max(crf_size),
        "crf_size": crf_size,
        "backend": backend,
    }
    if k == 0 or h * w == 0:
        return unrefined_HxW.copy(), info  # one label (background only): nothing to decide

    t0 = time.perf_counter()
    if crf_size == (h, w):
        unary_LxN = _unary_LxN(unrefined_HxW, num_labels, sp.logit_gap, soft_KxHxW)
        q_LxN = _crf_q(image, unary_LxN, num_labels, sp, backend)
        refined_HxW = q_LxN.argmax(axis=0).reshape(h, w).astype(np.int32)
    else:
        # Area-downsample image and soft maps (hard labels: their one-hot maps), CRF at h x w, then
        # bilinear Q back to H x W and the argmax there.
        image_c = _area_downsample(image.astype(np.float32).transpose(2, 0, 1), ch, cw).transpose(1, 2, 0)
        if soft_KxHxW is None:
            soft_KxHxW = (unrefined_HxW[None] == np.arange(1, num_labels)[:, None, None]).astype(np.float32)
        soft_c = np.clip(_area_downsample(soft_KxHxW, ch, cw), 0.0, 1.0)
        unary_LxN = _unary_LxN(None, num_labels, sp.logit_gap, soft_c)
        q_LxN = _crf_q(np.ascontiguousarray(image_c), unary_LxN, num_labels, sp, backend)
        q_LxHxW = _bilinear_upsample(q_LxN.reshape(num_labels, ch, cw), h, w)
        refined_HxW = q_LxHxW.argmax(axis=0).astype(np.int32)
    info["seconds"] = time.perf_counter() - t0

    if sp.fill_holes:
        for lab in range(1, num_labels):
            # Fill only with background, so a concept inside another's hole keeps its pixels.
            # Small holes only: a ring's hole is not part of it (masks.fill_small_holes).
            take = fill_small_holes(refined_HxW == lab) & (refined_HxW == 0)
            refined_HxW[take] = lab

    if reference_HxW is not None:
        reference_HxW = np.asarray(reference_HxW)
        if reference_HxW.shape != (h, w):
            raise CRFInputError(f"reference labels shape {reference_HxW.shape} does not match image H x W {(h, w)}")
    out_HxW, info["rejected"], info["iou"] = _restore_rejected(refined_HxW, unrefined_HxW, num_labels, sp.min_iou,
                                                               reference_HxW)
    return out_HxW, info


def _checked_labels(labels_HxW, num_labels, soft_KxHxW, h: int, w: int):
    """refine_labels' label map, label count and soft maps, checked (soft maps clipped to [0, 1])."""
    labels_HxW = np.asarray(labels_HxW)
    if labels_HxW.shape != (h, w):
        raise CRFInputError(f"labels shape {labels_HxW.shape} does not match image H x W {(h, w)}")
    if not np.issubdtype(labels_HxW.dtype, np.integer):
        raise CRFInputError(f"labels must be integers (0 = background), got dtype {labels_HxW.dtype}")
    num_labels = int(num_labels)
    if num_labels < 1:
        raise CRFInputError(f"num_labels counts the background and must be >= 1, got {num_labels}")
    if labels_HxW.size and (labels_HxW.min() < 0 or labels_HxW.max() >= num_labels):
        raise CRFInputError(
            f"labels must lie in [0, {num_labels - 1}] for num_labels={num_labels}, "
            f"got [{labels_HxW.min()}, {labels_HxW.max()}]"
        )
    k = num_labels - 1
    if soft_KxHxW is not None:
        soft_KxHxW = np.asarray(soft_KxHxW, np.float32)
        if soft_KxHxW.shape != (k, h, w):
            raise CRFInputError(
                f"soft maps shape {soft_KxHxW.shape} must be (num_labels - 1, H, W) = {(k, h, w)}"
            )
        lo, hi = soft_KxHxW.min(initial=0.0), soft_KxHxW.max(initial=0.0)
        if not np.isfinite(soft_KxHxW).all() or lo < -1e-3 or hi > 1 + 1e-3:
            raise CRFInputError("soft maps must be finite and in [0, 1] (normalise each token's map first)")
        soft_KxHxW = np.clip(soft_KxHxW, 0.0, 1.0)
    return labels_HxW, num_labels, soft_KxHxW


def _restore_rejected(refined_HxW, unrefined_HxW, num_labels: int, min_iou: float, reference_HxW=None):
    """(labels, rejected, ious): a label whose refined mask overlaps its unrefined one by less than
    min_iou (and, with reference labels, its reference mask too) is not trusted; its CRF pixels go back
    and its unrefined mask is restored."""
    ious = tuple(_iou(refined_HxW == lab, unrefined_HxW == lab) for lab in range(1, num_labels))
    rejected = tuple(v < min_iou for v in ious)
    if reference_HxW is not None:  # hysteresis: a refinement close to the previous round's mask stays accepted
        rejected = tuple(r and _iou(refined_HxW == lab, reference_HxW == lab) < min_iou
                         for lab, r in zip(range(1, num_labels), rejected))
    out_HxW = refined_HxW.copy()
    rejected_labels = [lab for lab in range(1, num_labels) if rejected[lab - 1]]
    for lab in rejected_labels:  # (1) untrusted CRF pixels go back to their unrefined label
        back = (refined_HxW == lab) & (unrefined_HxW != lab)
        out_HxW[back] = unrefined_HxW[back]
    for lab in rejected_labels:  # (2) rejected masks are restored exactly, over accepted labels
        out_HxW[unrefined_HxW == lab] = lab
    return out_HxW, rejected, ious


def refine_masks(image, masks_KxHxW, params: CRFParams | None = None, soft=None, *, backend="host", size=None):
    """`refine_labels` over K non-overlapping boolean masks (mask i ↔ label i + 1); returns (masks, info)."""
    _check_backend(backend)
    image = _check_image(image)
    masks_KxHxW = np.asarray(masks_KxHxW)
    if masks_KxHxW.dtype != np.bool_:
        raise CRFInputError(f"masks must be boolean K x H x W, got dtype {masks_KxHxW.dtype}")
    if masks_KxHxW.ndim != 3 or masks_KxHxW.shape[1:] != image.shape[:2]:
        raise CRFInputError(
            f"masks shape {masks_KxHxW.shape} must be K x H x W with H x W = image {image.shape[:2]}"
        )
    counts_HxW = masks_KxHxW.sum(axis=0)
    if (counts_HxW > 1).any():
        raise CRFInputError(
            f"masks overlap on {int((counts_HxW > 1).sum())} pixels; the CRF needs one label per pixel "
            "(take the argmax of the maps, masks.labels_from_maps)"
        )
    k = masks_KxHxW.shape[0]
    ids_Kx1x1 = np.arange(1, k + 1, dtype=np.int32)[:, None, None]
    labels_HxW = (masks_KxHxW * ids_Kx1x1).sum(axis=0, dtype=np.int32)  # no overlaps: a sum is a select
    out_HxW, info = refine_labels(image, labels_HxW, k + 1, params, soft, backend=backend, size=size)
    return out_HxW[None] == np.arange(1, k + 1)[:, None, None], info


def _iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
