"""Orbax checkpoints of a learning run: one numbering for single runs and batched jobs.

A checkpoint's index is the number of optimisation steps done (inversion + token + joint steps); the
final one, which holds only the results, is `total_steps + 1` (so it never collides with the last step's,
e.g. with no joint steps). Each holds {"meta": {"stage", "round"}, "state": pytree, "masks": uint8 masks
J x C x H x W (J = 1 for a single run)}.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(run_dir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=None))


def save(mngr, index: int, meta: dict, state, masks) -> None:
    if jax.process_count() == 1:  # one transfer for the tree: Orbax would slice every array per device first
        state = jax.device_get(state)
    mngr.save(index, args=ocp.args.Composite(
        meta=ocp.args.JsonSave(meta), state=ocp.args.StandardSave(state),
        masks=ocp.args.StandardSave({"masks": np.asarray(masks, np.uint8)})))
    mngr.wait_until_finished()


def restore(mngr, index: int, state_like, masks_shape):
    """(meta, state shaped like `state_like`, bool masks of `masks_shape`)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    got = mngr.restore(index, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), state=ocp.args.StandardRestore(abstract),
        masks=ocp.args.StandardRestore({"masks": np.zeros(masks_shape, np.uint8)})))
    return got.meta, got.state, np.asarray(got.masks["masks"], bool)


def latest_meta(mngr) -> dict | None:
    """{"stage", "round", "index"} of the newest checkpoint, or None."""
    step = mngr.latest_step()
    if step is None:
        return None
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta, index=step)
