"""Orbax checkpoints of a learning run: one numbering for single runs and batched jobs.

A checkpoint's index is the number of optimisation steps done (inversion + token + joint steps); the
final one, which holds only the results, is `total_steps + 1` (so it never collides with the last step's,
e.g. with no joint steps). Each holds {"meta": {"stage", "round"}, "state": pytree, "masks": uint8 masks
J x C x H x W (J = 1 for a single run)}.

A checkpoint that cannot be read (cut short by a crash or a full disk, damaged by a copy) is moved to
`checkpoints_damaged/` beside `checkpoints/` by `restore_newest`, which falls back to the one before. Before
a save, the free disk space is checked against the checkpoint's size: a full disk is one clear error
(`DiskFullError`), not a write that fails halfway in Orbax's threads.
"""

from __future__ import annotations

import errno
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..errors import JaxconceptError
from ..parallel import distributed, sharding

DAMAGED = "checkpoints_damaged"
SPACE_MARGIN = 256 << 10  # bytes beyond the arrays' own (Orbax's metadata and manifests: tens of KiB)


class CheckpointError(JaxconceptError):
    """No checkpoint of a run folder can be read."""


class DiskFullError(JaxconceptError):
    """The disk holding a run folder is full: what was saved before is kept; free space and start again."""


def is_disk_full(e: BaseException) -> bool:
    """Whether an error (an OSError, or Orbax's or TensorStore's ValueError/RuntimeError) is a full disk."""
    if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return True
    text = str(e)
    return isinstance(e, (OSError, ValueError, RuntimeError)) and (
        "No space left on device" in text or "Disk quota exceeded" in text or "os_error_code='28'" in text)


def free_bytes(path: str) -> int | None:
    """Free bytes on the disk holding `path` (its nearest existing parent); None if it cannot be told."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_space(path: str, need: int, what: str) -> None:
    """A DiskFullError (before anything is written) when the disk holding `path` has less than `need` bytes free."""
    free, need = free_bytes(path), need * 1.02 + SPACE_MARGIN
    if free is not None and free < need:
        raise DiskFullError(f"not enough disk space for {what} in {path!r}: {need / 2**20:.1f} MiB needed, "
                            f"{free / 2**20:.1f} MiB free")


def manager(run_dir: str) -> ocp.CheckpointManager:
    root = os.path.join(os.path.abspath(run_dir), "checkpoints")
    remove_partial(root)
    return ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=None))


def remove_partial(root: str) -> None:
    """Remove what a save cut short left (Orbax's `*.orbax-checkpoint-tmp*` folders: never a checkpoint), so that
    a run started again after a full disk gets that space back. Here, and not by Orbax's own
    `cleanup_tmp_directories`, which does it in a thread that a run ending at once leaves failing (a traceback)."""
    if distributed.is_primary() and os.path.isdir(root):
        for name in os.listdir(root):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def saved_steps(run_dir: str) -> list[int]:
    """The indices of the checkpoints in RUN/checkpoints, read from the folder names (no manager needed)."""
    root = os.path.join(run_dir, "checkpoints")
    return sorted(int(e) for e in (os.listdir(root) if os.path.isdir(root) else []) if e.isdigit())


def save(mngr, index: int, meta: dict, state, masks) -> None:
    masks = np.asarray(masks, np.uint8)
    if jax.process_count() == 1:  # one transfer for the tree: Orbax would slice every array per device first
        state = jax.device_get(state)
        check_space(str(mngr.directory), sharding.tree_bytes(state) + masks.nbytes, f"checkpoint {index}")
    mngr.save(index, args=ocp.args.Composite(
        meta=ocp.args.JsonSave(meta), state=ocp.args.StandardSave(state),
        masks=ocp.args.StandardSave({"masks": masks})))
    mngr.wait_until_finished()


def restore(mngr, index: int, state_like, masks_shape):
    """(meta, state shaped like `state_like`, bool masks of `masks_shape`)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    got = mngr.restore(index, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), state=ocp.args.StandardRestore(abstract),
        masks=ocp.args.StandardRestore({"masks": np.zeros(masks_shape, np.uint8)})))
    return got.meta, got.state, np.asarray(got.masks["masks"], bool)


def read_meta(mngr, step: int) -> dict:
    """{"stage", "round", "index"} of checkpoint `step`."""
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta, index=step)


def latest_meta(mngr) -> dict | None:
    """{"stage", "round", "index"} of the newest checkpoint, or None."""
    step = mngr.latest_step()
    return None if step is None else read_meta(mngr, step)


def restore_masks(mngr, step: int, masks_shape) -> np.ndarray:
    """The bool masks (J x C x H x W) of checkpoint `step`."""
    got = mngr.restore(step, args=ocp.args.Composite(
        masks=ocp.args.StandardRestore({"masks": np.zeros(masks_shape, np.uint8)})))
    return np.asarray(got.masks["masks"], bool)


def set_aside(mngr, step: int) -> str:
    """Move checkpoint `step` out of the way (to RUN/checkpoints_damaged/STEP, process 0); returns where to."""
    src = os.path.join(str(mngr.directory), str(step))
    dest_dir = os.path.join(os.path.dirname(str(mngr.directory)), DAMAGED)
    dest, k = os.path.join(dest_dir, str(step)), 2
    while os.path.exists(dest):
        dest, k = os.path.join(dest_dir, f"{step}_{k}"), k + 1
    if distributed.is_primary() and os.path.exists(src):
        os.makedirs(dest_dir, exist_ok=True)
        os.replace(src, dest)
    if jax.process_count() > 1:  # every process sees it gone before reading the list again
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    mngr.reload()
    return dest


def _unreadable(e: BaseException) -> bool:
    """Whether a restore failed on the files (cut short, damaged: TensorStore's and JSON's ValueError, a missing
    file's OSError, a missing key), not on memory or the device."""
    return isinstance(e, (ValueError, OSError, KeyError)) and not is_disk_full(e) and "Out of memory" not in str(e)


def restore_newest(mngr, restore_fn):
    """(meta, restore_fn(meta), notes) of the newest checkpoint that can be read, or (None, None, []) when there
    is none. `restore_fn(meta)` restores it. When the newest cannot be read (cut short by a crash or a full disk)
    and an older one can, the newer ones are set aside (`set_aside`) and `notes` say so; when none can be read
    (a damage of them all, or checkpoints of another version), a CheckpointError, and nothing is moved."""
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = read_meta(mngr, step)
            got = restore_fn(meta)
        except Exception as e:  # noqa: BLE001  (sorted out by _unreadable)
            if not _unreadable(e):
                raise
            failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            continue
        notes = [f"checkpoint {bad} cannot be read ({reason}); moved to {set_aside(mngr, bad)}; resuming from "
                 f"checkpoint {step}, the newest that can be read" for bad, reason in failed]
        return meta, got, notes
    if failed:
        raise CheckpointError(
            f"no checkpoint in {str(mngr.directory)!r} can be read (checkpoint {failed[0][0]}: {failed[0][1]}); "
            "nothing was changed. If they were made by another version of jaxconcept, resume with that version; "
            "to train again from the beginning, give another --out (or move checkpoints/ away).")
    return None, None, []


def steps_by_round(mngr) -> dict[int, int]:
    """round -> the index of the token-stage checkpoint that ends it (its masks are that round's)."""
    out = {}
    for step in mngr.all_steps():
        try:
            meta = read_meta(mngr, step)
        except Exception:  # noqa: BLE001  (a damaged checkpoint: not a source)
            continue
        if meta.get("stage") == "token":
            out[int(meta.get("round", 0))] = step
    return out
