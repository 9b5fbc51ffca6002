"""One aggregation of captured cross-attention, shared by the attention loss and mask estimation.

mean over heads and layers per resolution -> upsample each resolution to one size -> mean across
resolutions (each resolution weighs the same, however many layers it has) -> pick tokens -> clamp at 0
and normalise each token's map. Pure and differentiable.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ..model.capture import grid_of

NORMALIZATIONS = ("max", "minmax", None)


def per_resolution(probs_by_layer: Mapping[str, jnp.ndarray], latent_hw) -> dict[tuple[int, int], jnp.ndarray]:
    """{grid (rows, cols): B x rows x cols x T}, the mean over heads and over the layers at that grid."""
    groups: dict[tuple[int, int], list[jnp.ndarray]] = {}
    for name in sorted(probs_by_layer):
        probs_BxAxQxT = probs_by_layer[name]
        grid = grid_of(probs_BxAxQxT.shape[2], latent_hw)
        groups.setdefault(grid, []).append(probs_BxAxQxT.astype(jnp.float32).mean(axis=1))
    return {
        grid: jnp.mean(jnp.stack(maps), axis=0).reshape(maps[0].shape[0], grid[0], grid[1], maps[0].shape[-1])
        for grid, maps in groups.items()
    }


def aggregate_maps(
    probs_by_layer: Mapping[str, jnp.ndarray],
    latent_hw: tuple[int, int],
    token_positions=None,
    out_hw: tuple[int, int] | None = None,
    normalize: str | None = "max",
    method: str = "bilinear",
    eps: float = 1e-8,
) -> jnp.ndarray:
    """Token maps B x K x out_h x out_w from per-layer probs {name: B x heads x Q x T}.

    token_positions: K prompt positions to keep (int array, or (B, K) for per-sample positions);
        None keeps all T.
    out_hw: output size; default the largest captured grid.
    normalize: "max" divides each map by its max (Break-a-Scene's attention loss), "minmax" rescales
        to [0, 1], None leaves the probabilities as they are.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not probs_by_layer:
        raise ValueError("no cross-attention layers were captured: check the LayerSelector")
    grids = per_resolution(probs_by_layer, latent_hw)
    if out_hw is None:
        out_hw = max(grids, key=lambda g: g[0] * g[1])
    resized = []
    for grid, maps_BxhxwxT in grids.items():
        if grid != tuple(out_hw):
            b, _, _, t = maps_BxhxwxT.shape
            maps_BxhxwxT = jax.image.resize(maps_BxhxwxT, (b, out_hw[0], out_hw[1], t), method=method)
        resized.append(maps_BxhxwxT)
    maps_BxHxWxT = jnp.mean(jnp.stack(resized), axis=0)
    maps_BxTxHxW = jnp.moveaxis(maps_BxHxWxT, -1, 1)
    if token_positions is not None:
        pos = jnp.asarray(token_positions)
        if pos.ndim == 1:
            maps_BxTxHxW = maps_BxTxHxW[:, pos]
        else:
            maps_BxTxHxW = jnp.take_along_axis(maps_BxTxHxW, pos[:, :, None, None], axis=1)
    return normalize_maps(jnp.maximum(maps_BxTxHxW, 0.0), normalize, eps)


def normalize_maps(maps_BxCxHxW, normalize: str | None = "max", eps: float = 1e-8):
    if normalize is None:
        return maps_BxCxHxW
    hi = maps_BxCxHxW.max(axis=(-2, -1), keepdims=True)
    if normalize == "max":
        return maps_BxCxHxW / (hi + eps)
    lo = maps_BxCxHxW.min(axis=(-2, -1), keepdims=True)
    return (maps_BxCxHxW - lo) / (hi - lo + eps)
