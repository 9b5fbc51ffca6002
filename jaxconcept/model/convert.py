"""PyTorch diffusers weights -> Flax params, without torch.

Reads `*.safetensors` with `safetensors.numpy`, renames and reshapes each entry with diffusers' own rules
against a shape-only tree of the Flax module (`jax.eval_shape` of its init), and checks that every Flax
parameter was filled with the right shape.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file

from . import adapter
from ..errors import ModelSourceError

log = logging.getLogger(__name__)


def read_safetensors(folder: str, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of `<stem>[.<variant>].safetensors`, or of its shards listed in the `.index.json`."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    single, index = os.path.join(folder, name), os.path.join(folder, name + ".index.json")
    if os.path.isfile(single):
        return _load(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(_load(os.path.join(folder, shard)))
        return out
    raise ModelSourceError(f"no {name} (or {name}.index.json) in {folder}")


def _load(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except Exception as first:  # safetensors raises its own error types for truncated/corrupt files
        try:  # numpy has no bfloat16: the Flax reader does (via ml_dtypes)
            from safetensors.flax import load_file as load_flax

            return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_flax(path).items()}
        except Exception:
            raise ModelSourceError(
                f"cannot read weights file {path}: {first}. Re-download or re-save it."
            ) from first


# PyTorch buffers with no Flax counterpart (CLIP's position_ids in older checkpoints)
_BUFFERS = ("position_ids",)


def pt_state_to_flax(
    pt_state: Mapping[str, np.ndarray], shapes: Mapping, *, what: str, dtype=jnp.float32,
    rename=adapter.pt_to_flax_key,
) -> dict:
    """Flax params (nested dict) for a PyTorch state dict, given the module's shape tree.

    rename: (pt_key, tensor, flat_shapes) -> (flax tuple key, tensor); diffusers' rules by default,
    `adapter.pt_to_flax_text_key` for transformers' CLIP.
    """
    flat_shapes = flatten_dict(shapes)
    flat: dict[tuple, np.ndarray] = {}
    unexpected = []
    for pt_key, tensor in pt_state.items():
        if pt_key.endswith(_BUFFERS):
            continue
        key, value = rename(pt_key, tensor, flat_shapes)
        if key not in flat_shapes:
            unexpected.append(pt_key)
            continue
        flat[key] = (pt_key, value)
    return _complete(flat, flat_shapes, unexpected, what, dtype, "PyTorch")


def _complete(flat: dict, flat_shapes: dict, unexpected: list, what: str, dtype, source: str) -> dict:
    """Params from {flax key: (name in the file, array)}, checked against the shape tree: every parameter
    there, each of its shape; weights the module has no place for are logged and dropped."""
    for key, (name, value) in flat.items():
        if tuple(np.shape(value)) != tuple(flat_shapes[key].shape):
            raise ModelSourceError(
                f"{what}: weight {name} has shape {tuple(np.shape(value))} but the model built from its "
                f"config.json expects {tuple(flat_shapes[key].shape)}; config and weights do not match."
            )
    missing = [".".join(k) for k in flat_shapes if k not in flat]
    if missing:
        raise ModelSourceError(
            f"{what}: {len(missing)} parameters are missing from the {source} weights, e.g. {missing[:3]}. "
            "The weights do not belong to this architecture (or use a layout diffusers' Flax models lack)."
        )
    if unexpected:
        log.warning("%s: ignored %d unexpected weights, e.g. %s", what, len(unexpected), unexpected[:3])
    # cast on the host, then one transfer for the tree (per-leaf device arrays cost a dispatch and a compile each)
    return jax.device_put(unflatten_dict({k: np.asarray(v, dtype=np.float32).astype(jnp.dtype(dtype), copy=False)
                                          for k, (_, v) in flat.items()}))


def read_flax_msgpack(path: str, shapes: Mapping, *, what: str, dtype=jnp.float32) -> dict:
    """Params from a Flax `*.msgpack` file (as diffusers' `save_pretrained` writes it), checked against the
    module's shape tree like the PyTorch weights."""
    from flax.serialization import msgpack_restore

    try:
        with open(path, "rb") as f:
            tree = msgpack_restore(f.read())
        flat_file = flatten_dict(tree)
    except Exception as e:  # msgpack raises its own error types for truncated/corrupt files
        raise ModelSourceError(f"cannot read Flax weights {path}: {type(e).__name__}: {e}. "
                               "Re-download or re-save it.") from e
    flat_shapes = flatten_dict(shapes)
    flat = {k: ("/".join(k), v) for k, v in flat_file.items() if k in flat_shapes}
    unexpected = ["/".join(k) for k in flat_file if k not in flat_shapes]
    return _complete(flat, flat_shapes, unexpected, what, dtype, "Flax")
