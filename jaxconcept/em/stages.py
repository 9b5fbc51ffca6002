"""The stage functions the EM loop (`learner.run`) drives, and their builder for a single run.

A `Stages` holds what differs between one run and J batched jobs (`jobs.jobs_stages`): the initial
state, the token and joint steps, the maps of an image, and where the masks go; the loop, the E-step, the
checkpoints and the run folders are shared.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import settings
from ..model import capture, conditioning, lora
from ..parallel import sharding
from . import data, steps
from .prepare import Setup


def stage_keys(seed: int) -> dict:
    """The random keys of the stages and E-steps: what every run with this seed draws."""
    return dict(zip(("inversion", "token", "estep", "joint"), jax.random.split(jax.random.key(seed), 4)))


@dataclasses.dataclass(frozen=True)
class Stages:
    """The stage functions: what the loop runs, for J jobs (J = 1: a single run). States are pytrees
    {"params", "opt_state", "step"} (a leading job axis when batched); masks are lists of J bool arrays
    C x H x W."""

    jobs: int
    batched: bool  # states and results have a leading job axis
    initial_state: Callable[[], Any]  # token-stage state from the initial rows
    inversion: Callable[[], tuple] | None  # -> (state, step, to_token_state), or None when not asked for
    token_step: Callable[[Any, Any], tuple]  # (state, placed masks) -> (state, metrics)
    joint_state: Callable[[Any], Any]  # token state -> the joint stage's initial state
    joint_step: Callable[[Any], Callable[[Any, Any], tuple]]  # made on first use, for the joint state given
    rows: Callable[[Any], list]  # state -> each job's rows N x D
    maps: Callable[[int, Any, int, Any], Any]  # (job, rows, image, key) -> soft maps C x h x w (latent grid)
    place_masks: Callable[[list], Any]  # masks -> what the steps read (latent grid, on the devices)
    job_metrics: Callable[[dict], list]  # a step's metrics -> one {name: float} per job
    final_like: Callable[[], Any]  # the results' shape {"rows", "unet" or "lora"?, the text encoders' params?}


@dataclasses.dataclass(frozen=True)
class Job:
    run_dir: str
    setup: Setup  # tokens as the user named them
    truth: np.ndarray | None


def loss_config(s: settings.Settings, **changes) -> steps.LossConfig:
    return steps.LossConfig(batch_size=s.tokens.batch_size, attn_weight=s.tokens.attn_weight,
                            attn_resolution=s.tokens.attn_resolution,
                            loss_margin=s.tokens.loss_margin,
                            loss_per_area=s.tokens.loss_per_area, flip_prob=s.flip_prob,
                            prior_weight=s.prior.weight, **changes)


def joint_loss_config(s: settings.Settings) -> steps.LossConfig:
    spec = s.joint.lora
    return loss_config(s, remat=s.joint.remat, lora_scale=spec.scale if spec else 0.0)


def joint_unet(s: settings.Settings, unet_params) -> dict:
    """What the joint stage tunes of the UNet: {"unet": its weights}, or {"lora": fresh adapters} on the frozen
    UNet (the same draw for every run and job of this seed)."""
    spec = s.joint.lora
    if spec is None:
        return {"unet": unet_params}
    return {"lora": lora.init(jax.random.fold_in(jax.random.key(s.seed), 7), unet_params, spec)}


def tuned_text_encoders(s: settings.Settings, params: dict) -> dict:
    """The text encoders the joint stage tunes (joint.text_encoder: each one the model has, SDXL's two), by name;
    {} when they stay frozen."""
    return conditioning.text_params(params) if s.joint.text_encoder else {}


def joint_frozen(s: settings.Settings, frozen: dict) -> dict:
    """What the joint step reads as frozen: the text encoders it does not tune, and the UNet under LoRA
    adapters (a tuned UNet is a trainable)."""
    tuned = tuned_text_encoders(s, frozen)
    return {k: v for k, v in frozen.items() if k not in tuned and (k != "unet" or s.joint.lora is not None)}


def stage_optimizers(s: settings.Settings) -> dict:
    """Each stage's optimiser from its own settings: the inversion and the token stage's from `tokens`, the joint
    stage's from `joint` (`steps.make_optimizer` returns one object per setting: a static argument)."""
    return {"inversion": steps.make_optimizer(s.init.inversion_lr, s.tokens.clip, s.tokens.weight_decay),
            "token": steps.make_optimizer(s.tokens.lr, s.tokens.clip, s.tokens.weight_decay),
            "joint": steps.make_optimizer(s.joint.lr, s.joint.clip, s.joint.weight_decay, s.joint.optimizer)}


def single_run_stages(s: settings.Settings, st: Setup, mesh) -> tuple[Stages, Setup]:
    """The stage functions of one run: the frozen weights replicated (or FSDP-split with mesh.shard_frozen)."""
    b, place, min_size = st.bundle, (lambda tree: sharding.put_replicated(tree, mesh)), s.mesh.fsdp_min_size
    frozen = {**conditioning.text_params(b.params), "unet": b.params["unet"]}
    frozen_sh = sharding.fsdp_shardings(frozen, mesh, min_size) if s.mesh.shard_frozen else None
    frozen = place(frozen) if frozen_sh is None else sharding.put(frozen, frozen_sh)
    run_data = place(st.run_data)
    rows0 = place(jnp.asarray(st.concepts.init_rows))
    loss_cfg = loss_config(s)

    def make(cfg, opt, state_shardings=None, fsh=frozen_sh):
        return steps.make_train_step(b, st.concepts.ids, cfg, opt, mesh, state_shardings=state_shardings,
                                     frozen_shardings=fsh)

    opts = stage_optimizers(s)
    token_opt, joint_opt = opts["token"], opts["joint"]
    maps_fn = steps.make_concept_maps(b, st.concepts.ids, capture.LayerSelector(resolutions=s.masks.resolutions),
                                      s.masks.num_timesteps, st.latent_hw, mesh, frozen_shardings=frozen_sh,
                                      chunk=s.masks.timestep_chunk)
    keys = stage_keys(s.seed)
    frozen_joint = joint_frozen(s, frozen)
    trainable = lambda rows: {"rows": rows, **joint_unet(s, b.params["unet"]),  # noqa: E731
                              **tuned_text_encoders(s, b.params)}

    def inversion():
        inv_fn = make(dataclasses.replace(loss_cfg, attn_weight=0.0), opts["inversion"])
        return (place(steps.init_state({"rows": rows0}, opts["inversion"])),
                inv_fn.bind(frozen, run_data, keys["inversion"]),
                lambda inv: place(steps.init_state({"rows": inv["params"]["rows"]}, token_opt)))

    def joint_state(token_state):
        # fresh buffers: the joint step donates its state, and the base model's params (which a caller such
        # as the benchmark reuses for its next run) must not be donated with it
        params = trainable(token_state["params"]["rows"])
        copied = jax.device_put(params, jax.tree.map(lambda x: x.sharding, params), may_alias=False)
        state = steps.init_state(copied, joint_opt)
        return sharding.put(state, sharding.fsdp_shardings(state, mesh, min_size))  # FSDP over the fsdp axis

    def joint_step(state):
        state_sh = sharding.fsdp_shardings(state, mesh, min_size)
        fn = make(joint_loss_config(s), joint_opt, state_shardings=state_sh,
                  fsh=None if frozen_sh is None else {k: frozen_sh[k] for k in frozen_joint})
        return fn.bind(frozen_joint, run_data, keys["joint"])

    stages = Stages(
        jobs=1, batched=False, initial_state=lambda: place(steps.init_state({"rows": rows0}, token_opt)),
        inversion=inversion if s.init.steps else None,
        token_step=make(loss_cfg, token_opt).bind(frozen, run_data, keys["token"]),
        joint_state=joint_state, joint_step=joint_step, rows=lambda state: [state["params"]["rows"]],
        maps=lambda j, rows, i, key: maps_fn(rows, frozen, run_data["latents"][i, 0],
                                             jnp.asarray(st.image_ids_IxT[i]), jnp.asarray(st.image_positions_IxC[i]),
                                             key),
        place_masks=lambda masks: latent_masks(masks[0], st.latent_hw, mesh),
        job_metrics=lambda m: [{k: float(v) for k, v in m.items()}],
        final_like=lambda: trainable(rows0) if s.joint.steps else {"rows": rows0})
    return stages, dataclasses.replace(st, run_data=run_data)


def latent_masks(masks_CxHxW: np.ndarray, latent_hw, mesh) -> jnp.ndarray:
    """Nearest downsampling to latent size (float32, what the step reads), replicated on the mesh."""
    return sharding.put_replicated(data.nearest_resize(jnp.asarray(masks_CxHxW, jnp.float32), latent_hw), mesh)
