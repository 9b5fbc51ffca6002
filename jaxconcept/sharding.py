"""Meshes and shardings, spelled out at `jax.jit` (pjit is `jax.jit` with shardings today).

Batch dimensions are split over the "data" axis of a mesh built from the available devices; params
are replicated by default.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import capture
from .errors import ShardingError

DATA = "data"


def make_mesh(devices=None, axis: str = DATA) -> Mesh:
    """A 1-D mesh over `devices` (default: all) along the data axis."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
    """Place a pytree replicated on the mesh: a jitted program then sees the same input shardings on its
    first call as on later ones (its own outputs), so it compiles once."""
    return jax.device_put(tree, replicated(mesh))


def batch_sharded(mesh: Mesh, axis: str = DATA) -> NamedSharding:
    """Leading (batch) dimension split over `axis`, the rest whole."""
    return NamedSharding(mesh, P(axis))


def check_batch(batch: int, mesh: Mesh, axis: str = DATA) -> None:
    n = mesh.shape[axis]
    if batch % n:
        raise ShardingError(
            f"batch of {batch} does not split over {n} devices on mesh axis {axis!r}: use a multiple of {n}, "
            "or a mesh over fewer devices."
        )


@functools.lru_cache(maxsize=32)
def _jitted_capture(unet, mesh: Mesh, selector: capture.LayerSelector):
    # modules, meshes and selectors are hashable: equal arguments reuse one compiled program
    fn = functools.partial(capture.unet_with_attention, unet, selector=selector)
    rep, bat = replicated(mesh), batch_sharded(mesh)
    return jax.jit(fn, in_shardings=(rep, bat, bat, bat), out_shardings=(bat, bat))


def jit_attention_capture(bundle_unet, mesh: Mesh, selector: capture.LayerSelector = capture.ALL_LAYERS):
    """Jitted (unet_params, latents, timesteps, context) -> (eps, {layer: probs}), batch-sharded.

    Params are replicated; every batch-led input and output is split over the mesh's data axis.
    """
    jitted = _jitted_capture(bundle_unet, mesh, selector)
    rep, bat = replicated(mesh), batch_sharded(mesh)

    def run(unet_params, latents, timesteps, context):
        check_batch(latents.shape[0], mesh)
        # inputs may sit committed elsewhere (e.g. on device 0 after an eager op): place them explicitly
        unet_params = jax.device_put(unet_params, rep)
        latents, timesteps, context = (jax.device_put(x, bat) for x in (latents, timesteps, context))
        return jitted(unet_params, latents, timesteps, context)

    run.jitted = jitted
    return run
