"""The stage functions the EM loop (`learner.run`) drives, and their one builder (`build_stages`).

A `Stages` holds what differs between one run and J batched jobs: the initial state, the token and joint
steps, the maps of an image, and where the masks go; the loop, the E-step, the checkpoints and the run folders
are shared. `build_stages` makes them for either from what every run shares (each stage's optimiser and loss,
the inversion, the joint stage's tuned and frozen weights) and a `Placement`, where the states, data and steps
live: `OneRun` here (`single_run_stages`), `jobs.JobsPlacement` for J jobs (`jobs.jobs_stages`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .. import settings
from ..model import capture, conditioning, lora
from ..model.loading import ModelBundle
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
    final_like: Callable[[], Any]  # the shape of the results {"rows", "unet" or "lora"?, "text_encoder"?}


@dataclasses.dataclass(frozen=True)
class Job:
    run_dir: str
    setup: Setup  # tokens as the user named them
    truth: np.ndarray | None


def swap_prob(s: settings.Settings, stage: str) -> float:
    """`background_swap` in the stage ("tokens" or "joint") if `background_swap_stages` names it, else 0."""
    return s.background_swap if s.background_swap_stages in ("both", stage) else 0.0


def loss_config(s: settings.Settings, **changes) -> steps.LossConfig:
    """The token stage's loss settings, with `changes` (the joint stage's differences)."""
    cfg = steps.LossConfig(batch_size=s.tokens.batch_size, attn_weight=s.tokens.attn_weight,
                           attn_resolution=s.tokens.attn_resolution,
                           loss_margin=s.tokens.loss_margin,
                           loss_per_area=s.tokens.loss_per_area, flip_prob=s.flip_prob,
                           background_swap=swap_prob(s, "tokens"),
                           prior_weight=s.prior.weight, context_weight=s.tokens.context_weight,
                           min_snr_gamma=s.min_snr_gamma, rows_ema=s.tokens.ema,
                           outside_weight=s.tokens.outside_weight)
    return dataclasses.replace(cfg, **changes)


def joint_loss_config(s: settings.Settings) -> steps.LossConfig:
    spec = s.joint.lora
    return loss_config(s, remat=s.joint.remat, lora_scale=spec.scale if spec else 0.0,
                       background_prompts=s.joint.background_prompts, background_swap=swap_prob(s, "joint"))


def frozen_weights(params: dict) -> dict:
    """The weights every stage reads and no stage before the joint one tunes: the text encoders and the UNet."""
    return {**conditioning.text_params(params), "unet": params["unet"]}


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


def joint_tuned(s: settings.Settings, params: dict) -> dict:
    """What the joint stage tunes besides the rows, from the model's params: `joint_unet`, and the text encoders
    with joint.text_encoder."""
    return {**joint_unet(s, params["unet"]), **tuned_text_encoders(s, params)}


def joint_frozen(s: settings.Settings, frozen: dict) -> list[str]:
    """The names of the frozen weights the joint step reads: all but what it tunes (the text encoders with
    joint.text_encoder; the UNet, unless LoRA tunes adapters on it)."""
    tuned = tuned_text_encoders(s, frozen)
    return [name for name in frozen if name not in tuned and not (name == "unet" and s.joint.lora is None)]


def flat_joint_update(s: settings.Settings, params: dict) -> bool:
    """Whether the joint optimiser updates what it tunes (of the model's `params`) as one flat vector: when that is
    small (steps.FLAT_UPDATE_MAX_BYTES) and not FSDP-split, with AdamW (Adafactor factors the leaves' shapes)."""
    if not s.joint.steps or s.mesh.fsdp > 1 or s.joint.optimizer == "adafactor":
        return False
    return steps.flat_update_fits(jax.eval_shape(lambda p: joint_tuned(s, p), params))


def stage_optimizers(s: settings.Settings, params: dict) -> dict:
    """Each stage's optimiser from its own settings: the inversion and the token stage's from `tokens`, the joint
    stage's from `joint` and the size of what it tunes of the model's `params` (`steps.make_optimizer` returns one
    object per setting: a static argument)."""
    return {"inversion": steps.make_optimizer(s.init.inversion_lr, s.tokens.clip, s.tokens.weight_decay),
            "token": steps.make_optimizer(s.tokens.lr, s.tokens.clip, s.tokens.weight_decay),
            "joint": steps.make_optimizer(s.joint.lr, s.joint.clip, s.joint.weight_decay, s.joint.optimizer,
                                          flat_joint_update(s, params))}


class Placement(Protocol):
    """Where the states, the data and the steps live: what one run (`OneRun`) and J batched jobs
    (`jobs.JobsPlacement`) do differently. `build_stages` builds the stage functions from it."""

    jobs: int
    batched: bool  # states and results have a leading job axis
    frozen: dict  # `frozen_weights`, on the devices
    rows0: Any  # the initial rows, as `states` takes them

    def token_step(self, cfg: steps.LossConfig, opt, key) -> Callable:
        """(state, placed masks) -> (state, metrics) of a token-stage state, reading every frozen weight."""

    def joint_step(self, cfg: steps.LossConfig, opt, key, frozen_names: list[str], state) -> Callable:
        """The same for the joint stage's `state`, reading the frozen weights named."""

    def states(self, rows, opt):
        """A token-stage state (or the inversion's) from rows."""

    def inverted_rows(self, inversion_state):
        """An inversion state's rows, as `states` takes them."""

    def joint_state(self, rows, tuned: dict, opt):
        """The joint stage's state from the token stage's rows and what it tunes besides them (`joint_tuned`)."""

    def rows(self, state) -> list:
        """Each job's rows N x D."""

    def maps(self, job: int, rows, image: int, key):
        """Soft maps C x h x w (latent grid) of a job's image."""

    def place_masks(self, masks: list):
        """Each job's masks -> what the steps read (latent grid, on the devices)."""

    def job_metrics(self, metrics: dict) -> list:
        """A step's metrics -> one {name: float} per job."""

    def final_like(self, tuned: Callable | None):
        """The shape of the results: {"rows"}, with `tuned(model params)`'s entries when
        the joint stage runs (`tuned` not None)."""


def build_stages(s: settings.Settings, b: ModelBundle, place: Placement) -> Stages:
    """The stage functions of one run or of J jobs: each stage's optimiser and loss, the inversion (the token
    stage's step without the attention loss, from the initial rows), the joint stage's split of tuned and frozen
    weights, each stage's key; `place` says where the states, data and steps live."""
    loss_cfg, keys, opts = loss_config(s), stage_keys(s.seed), stage_optimizers(s, b.params)
    token_opt, joint_opt = opts["token"], opts["joint"]
    joint_names = joint_frozen(s, place.frozen)

    def inversion():
        inv_opt = opts["inversion"]
        step = place.token_step(dataclasses.replace(loss_cfg, attn_weight=0.0), inv_opt, keys["inversion"])
        return (place.states(place.rows0, inv_opt), step,
                lambda inv: place.states(place.inverted_rows(inv), token_opt))

    def joint_state(token_state):
        tuned = joint_tuned(s, b.params)
        return place.joint_state(steps.handed_rows(token_state), tuned, joint_opt)

    return Stages(
        jobs=place.jobs, batched=place.batched, initial_state=lambda: place.states(place.rows0, token_opt),
        inversion=inversion if s.init.steps else None,
        token_step=place.token_step(loss_cfg, token_opt, keys["token"]), joint_state=joint_state,
        joint_step=lambda state: place.joint_step(joint_loss_config(s), joint_opt, keys["joint"], joint_names,
                                                  state),
        rows=place.rows, maps=place.maps, place_masks=place.place_masks, job_metrics=place.job_metrics,
        final_like=lambda: place.final_like(functools.partial(joint_tuned, s) if s.joint.steps else None))


class OneRun:
    """The `Placement` of one run: the frozen weights replicated (or FSDP-split with mesh.shard_frozen), the
    token state replicated, the joint state FSDP-split over the mesh's fsdp axis."""

    jobs, batched = 1, False

    def __init__(self, s: settings.Settings, st: Setup, mesh):
        self.st, self.mesh, self.min_size = st, mesh, s.mesh.fsdp_min_size
        self.downsample, self.rows_ema = s.tokens.mask_downsample, s.tokens.ema > 0
        frozen = frozen_weights(st.bundle.params)
        self.frozen_sh = sharding.fsdp_shardings(frozen, mesh, self.min_size) if s.mesh.shard_frozen else None
        self.frozen = self._place(frozen) if self.frozen_sh is None else sharding.put(frozen, self.frozen_sh)
        self.run_data = self._place(st.run_data)
        self.rows0 = self._place(jnp.asarray(st.concepts.init_rows))
        self.maps_fn = steps.make_concept_maps(st.bundle, st.concepts.ids,
                                               capture.LayerSelector(resolutions=s.masks.resolutions),
                                               s.masks.num_timesteps, st.latent_hw, mesh,
                                               frozen_shardings=self.frozen_sh, chunk=s.masks.timestep_chunk)

    def _place(self, tree):
        return sharding.put_replicated(tree, self.mesh)

    def _step(self, cfg, opt, key, frozen, frozen_sh, state_shardings=None):
        return steps.make_train_step(self.st.bundle, self.st.concepts.ids, cfg, opt, self.mesh,
                                     state_shardings=state_shardings,
                                     frozen_shardings=frozen_sh).bind(frozen, self.run_data, key)

    def token_step(self, cfg, opt, key):
        return self._step(cfg, opt, key, self.frozen, self.frozen_sh)

    def joint_step(self, cfg, opt, key, frozen_names, state):
        state_sh = sharding.fsdp_shardings(state, self.mesh, self.min_size)
        fsh = None if self.frozen_sh is None else {k: self.frozen_sh[k] for k in frozen_names}
        return self._step(cfg, opt, key, {k: self.frozen[k] for k in frozen_names}, fsh, state_sh)

    def states(self, rows, opt):
        return self._place(steps.init_state({"rows": rows}, opt, self.rows_ema))

    def inverted_rows(self, inversion_state):
        return inversion_state["params"]["rows"]

    def joint_state(self, rows, tuned, opt):
        # fresh buffers: the joint step donates its state, and the base model's params (which a caller such
        # as the benchmark reuses for its next run) must not be donated with it
        params = {"rows": rows, **tuned}
        copied = jax.device_put(params, jax.tree.map(lambda x: x.sharding, params), may_alias=False)
        state = steps.init_state(copied, opt)
        return sharding.put(state, sharding.fsdp_shardings(state, self.mesh, self.min_size))  # FSDP: fsdp axis

    def rows(self, state):
        return [state["params"]["rows"]]

    def maps(self, job, rows, image, key):
        st = self.st
        return self.maps_fn(rows, self.frozen, self.run_data["latents"][image, 0], jnp.asarray(st.image_ids_IxT[image]),
                            jnp.asarray(st.image_positions_IxC[image]), key)

    def place_masks(self, masks):
        return latent_masks(masks[0], self.st.latent_hw, self.mesh, self.downsample, self.st.zoom_windows)

    def job_metrics(self, metrics):
        return [{k: float(v) for k, v in metrics.items()}]

    def final_like(self, tuned):
        params = self.st.bundle.params
        return {"rows": self.rows0, **(tuned(params) if tuned else {})}


def single_run_stages(s: settings.Settings, st: Setup, mesh) -> tuple[Stages, Setup]:
    """The stage functions of one run (`OneRun`), and its setup with the run data on the devices."""
    place = OneRun(s, st, mesh)
    return build_stages(s, st.bundle, place), dataclasses.replace(st, run_data=place.run_data)


def latent_masks(masks_CxHxW: np.ndarray, latent_hw, mesh, downsample: str = "nearest", windows=None) -> jnp.ndarray:
    """The masks at latent size (float32, what the step reads), replicated on the mesh: `downsample` "nearest"
    (Break-a-Scene's) or "area" (each cell's object share, `data.area_resize`). With zoom `windows` (V x 3), the
    masks of each view, V x C x h x w, cut from the image-size masks as the views' images were."""
    resize = data.area_resize if downsample == "area" else data.nearest_resize
    full = np.asarray(masks_CxHxW, np.float32) if windows is None else data.zoomed_masks(masks_CxHxW, windows)
    return sharding.put_replicated(resize(jnp.asarray(full), latent_hw), mesh)
