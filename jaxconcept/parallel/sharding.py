"""Meshes and shardings, spelled out at `jax.jit` (pjit is `jax.jit` with shardings today).

A mesh has two axes, "data" and "fsdp" (`make_mesh(fsdp=1)` keeps every device on "data"). Batch
dimensions are split over both axes (every device gets its share of the batch); params are replicated,
or, with FSDP, each large array is split along one of its dimensions over the "fsdp" axis and gathered
by XLA where a layer needs it (the joint stage's UNet, its gradients and AdamW moments).
"""

from __future__ import annotations


import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..model import capture
from ..errors import ShardingError

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)


def tree_bytes(tree) -> int:
    """Bytes of a tree's arrays (or ShapeDtypeStructs), PRNG keys left out: what it holds on one device, whole."""
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")
                   and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all, across hosts), `fsdp` devices per param shard group."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ShardingError(f"fsdp={fsdp} does not divide the {len(devices)} devices: use a divisor of "
                            f"{len(devices)} (1 = no parameter sharding).")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree, shardings):
    """device_put that also works across hosts: there a host-local value (numpy, or an array on this host's
    devices; it must be the same on every process, which is not checked) goes through numpy onto the global
    sharding, and an array already spread over the mesh is resharded by a compiled identity. `shardings`: one
    sharding or a matching tree."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x, s: put(x, s), tree, shardings)

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_equivalent_to(shardings, x.ndim):
                return x
            return jax.jit(lambda a: a, out_shardings=shardings)(x)
        # built from this host's copy, shard by shard: jax.device_put would first check across hosts that the
        # value is the same everywhere (an allgather of the whole array and a compiled identity per shape: for a
        # UNet, hundreds of compiles and its weights sent between hosts); the caller promises it is
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, shardings, lambda index: value[index])

    return jax.tree.map(one, tree)


def put_replicated(tree, mesh: Mesh):
    """Place a pytree replicated on the mesh: a jitted program then sees the same input shardings on its
    first call as on later ones (its own outputs), so it compiles once."""
    return put(tree, replicated(mesh))


def _batch_axes(mesh: Mesh):
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return axes if len(axes) > 1 else axes[0]


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh, the rest whole."""
    return NamedSharding(mesh, P(_batch_axes(mesh)))


def check_batch(batch: int, mesh: Mesh) -> None:
    n = mesh.size
    if batch % n:
        raise ShardingError(
            f"batch of {batch} does not split over {n} devices: use a multiple of {n}, or a mesh over fewer "
            "devices."
        )


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2 ** 14) -> P:
    """Split the largest dimension that `fsdp_size` divides; small arrays (biases, norms) stay whole, since
    gathering them costs more than keeping copies."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            return P(*([None] * dim + [FSDP]))
    return P()


def fsdp_shardings(tree, mesh: Mesh, min_size: int = 2 ** 14):
    """NamedShardings for a pytree of arrays (or shape structs): FSDP-split where it pays, else replicated.
    Adam's moments have their params' shapes, so they are split exactly like them."""
    size = mesh.shape[FSDP] if FSDP in mesh.axis_names else 1
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size, min_size)), tree)


class Bound:
    """A jitted function with its static arguments (the leading ones) bound: calls and `lower` take the
    array arguments only. The package's one way of reusing compiled programs: a module-level function whose
    first argument is a hashable statics object, jitted where it is used with its shardings spelled out; equal
    statics and shardings give the same program, traced and compiled once (jax's own cache)."""

    def __init__(self, jitted, *statics):
        self.jitted, self.statics = jitted, statics

    def __call__(self, *args):
        return self.jitted(*self.statics, *args)

    def lower(self, *args):
        return self.jitted.lower(*self.statics, *args)


def _capture(statics, unet_params, latents, timesteps, context):
    unet, selector = statics
    return capture.unet_with_attention(unet, unet_params, latents, timesteps, context, selector)


def jit_attention_capture(bundle_unet, mesh: Mesh, selector: capture.LayerSelector = capture.ALL_LAYERS):
    """Jitted (unet_params, latents, timesteps, context) -> (eps, {layer: probs}), batch-sharded.

    Params are replicated; every batch-led input and output is split over the mesh's data axis.
    """
    rep, bat = replicated(mesh), batch_sharded(mesh)
    jitted = Bound(jax.jit(_capture, static_argnums=0, in_shardings=(rep, bat, bat, bat), out_shardings=(bat, bat)),
                   (bundle_unet, selector))

    def run(unet_params, latents, timesteps, context):
        check_batch(latents.shape[0], mesh)
        # inputs may sit committed elsewhere (e.g. on device 0 after an eager op): place them explicitly
        unet_params = jax.device_put(unet_params, rep)
        latents, timesteps, context = (jax.device_put(x, bat) for x in (latents, timesteps, context))
        return jitted(unet_params, latents, timesteps, context)

    run.jitted = jitted
    return run
