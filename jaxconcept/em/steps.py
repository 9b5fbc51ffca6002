"""Jit-compiled steps of the concept learner: the token step (stage 2), the joint step (stage 3) and the
attention pass of the E-step, each with its shardings spelled out at `jax.jit`.

State is a small pytree {"params": trainables, "opt_state", "step"}; in the token stage the only
trainable parameters are the concept rows (N x D), spliced into the frozen embedding table inside the
loss. Frozen weights are arguments (replicated), never closed over, so one compiled program serves
every step, round and stage restart. The step's randomness is `fold_in(base_key, step)`: a resumed run
draws exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from .. import settings
from ..masks import aggregate
from ..model import adapter, capture, conditioning, diffusion
from ..parallel import sharding
from . import data, losses
from ..model.loading import ModelBundle


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What a train step needs besides arrays: its loss's settings, and the decay of the rows' average (hashable:
    part of the compiled program's identity)."""

    batch_size: int = 1
    attn_weight: float = 0.01  # lambda
    attn_resolution: int = 16  # query-grid height of the layers the attention loss reads
    loss_margin: int = 0  # latent cells the masked diffusion loss reaches beyond the masks (outline, holes)
    loss_per_area: bool = False  # L_mask averaged over the masked cells, not over all (small objects weigh as much)
    flip_prob: float = 0.5
    background_swap: float = 0.0  # > 0: run_data holds a background bank ("backgrounds", "background_C")
    prior_weight: float = 1.0  # used only when prior latents are given
    remat: str = "none"  # UNet activations: "none" kept, "full" recomputed in the backward pass, "dots" keep matmuls
    lora_scale: float = 0.0  # alpha / rank of the UNet's adapters, when the trainables hold them ("lora")
    background_prompts: bool = True  # False: draw with run_data["joint_logw_P"] (no prompt names a background)
    context_weight: float = 0.0  # > 0: run_data holds the context prompts ("context_ids", "_target", "_weight")
    min_snr_gamma: float = 0.0  # > 0: the diffusion losses' samples weighted by Min-SNR-gamma (diffusion.py)
    rows_ema: float = 0.0  # the decay of the rows' moving average, kept when the state holds one (init_state)
    outside_weight: float = 0.0  # > 0: run_data holds the starting rows ("start_rows"; losses.outside_loss)


# what jax.checkpoint may keep from the UNet's forward pass (None: nothing but its inputs)
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}  # settings.REMATS names them


# Trainables up to this size (LoRA adapters; a tiny or toy UNet) are updated as one flat vector (`flat`): AdamW
# over a UNet's hundreds of leaves is hundreds of small operations per leaf kind, and XLA compiled them for longer
# than the gradient itself (the tiny UNet's 208 leaves, CPU: gradient 3.2 s, + clip and AdamW 11.1 s, flattened
# 5.3 s). The flat update copies the trainables and their gradient once per step, which a whole SD UNet (3.4 GB)
# cannot afford: it keeps the update per leaf.
FLAT_UPDATE_MAX_BYTES = 64 * 2 ** 20


def flat_update_fits(trainables) -> bool:
    """Whether trainables (arrays or their shapes) are small enough for the flat update (FLAT_UPDATE_MAX_BYTES)."""
    return sharding.tree_bytes(trainables) <= FLAT_UPDATE_MAX_BYTES


def make_optimizer(lr: float, clip: float = 1.0, weight_decay: float = 1e-2,
                   kind: str = "adamw", flat: bool = False) -> optax.GradientTransformation:
    """AdamW with a constant rate after a global-norm clip (Break-a-Scene's settings).

    Low-memory variants for the joint stage: "adamw_bf16" keeps Adam's first moment in bfloat16 (a quarter
    less optimiser memory); "adafactor" keeps factored second moments and no first moment (about half of
    the parameter memory instead of twice). `flat`: the update runs on the trainables raveled into one vector
    (the same arithmetic; FLAT_UPDATE_MAX_BYTES says when)."""
    # one object per setting however it is spelled: the optimizer is a static argument of the steps
    return _optimizer(float(lr), float(clip), float(weight_decay), str(kind), bool(flat))


@functools.lru_cache(maxsize=64)
def _optimizer(lr: float, clip: float, weight_decay: float, kind: str, flat: bool) -> optax.GradientTransformation:
    if kind == "adamw":
        inner = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    elif kind == "adamw_bf16":
        inner = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mu_dtype=jnp.bfloat16)
    elif kind == "adafactor":
        inner = optax.adafactor(lr, multiply_by_parameter_scale=False, weight_decay_rate=weight_decay or None)
    else:
        raise ValueError(f"unknown optimizer {kind!r}; use one of {', '.join(settings.OPTIMIZERS)}")
    opt = optax.chain(optax.clip_by_global_norm(clip), inner)
    return optax.flatten(opt) if flat else opt


def init_state(params, opt: optax.GradientTransformation, rows_ema: bool = False) -> dict:
    """A step's state; `rows_ema`: it also keeps a moving average of the rows ("ema_rows", from the rows given),
    which `train_step` updates with `LossConfig.rows_ema` and `handed_rows` hands on."""
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
    if rows_ema:
        state["ema_rows"] = jnp.copy(params["rows"])
    return state


def handed_rows(state):
    """The rows a stage hands on: their moving average where the state keeps one, else the rows as they are."""
    return state.get("ema_rows", state["params"]["rows"])


@dataclasses.dataclass(frozen=True)
class StepModel:
    """What a step's program reads of a model besides its weights: the modules (Flax modules compare by their
    config) and the training noise schedule. A static jit argument: every run of one model and config in a
    process (a notebook's re-run, a benchmark's scenes, a test suite) reuses the program traced and compiled
    by the first, instead of tracing the UNet again."""

    unet: Any
    text_encoder: Any  # what `conditioning.encode` takes: the text encoder (SD 1/2) or both (SDXL's SDXLText)
    num_train_timesteps: int
    prediction_type: str
    alphas_cumprod: tuple[float, ...] = dataclasses.field(repr=False)  # exact: float32 values as Python floats
    alphas_dtype: str = "float32"
    vae_factor: int = 8  # image pixels per latent pixel: SDXL's time ids are the image's size
    _hash: int = dataclasses.field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((self.unet, adapter.StaticModule(self.text_encoder),
                                                self.num_train_timesteps, self.prediction_type, self.alphas_cumprod,
                                                self.alphas_dtype)))

    def __hash__(self) -> int:
        return self._hash

    def alphas(self) -> jnp.ndarray:
        return jnp.asarray(np.asarray(self.alphas_cumprod, self.alphas_dtype))

    def text_states(self, text_params: dict, ids_BxT, latent_hw, concept_ids_N=None, rows_NxD=None):
        """The text states (B x T x D) the UNet cross-attends to for these prompts: the context regulariser's
        measure, for its target (the starting rows) and in every step (the current rows)."""
        cond = self.condition(text_params, ids_BxT, latent_hw, concept_ids_N, rows_NxD)
        return conditioning.unet_inputs(cond)[0]

    def condition(self, text_params: dict, ids_BxT, latent_hw, concept_ids_N=None, rows_NxD=None):
        """The UNet's condition for prompts on training images of `latent_hw` (SDXL: uncropped, their own size
        as original and target size, as diffusers' SDXL trainers condition square resized images)."""
        sdxl = isinstance(self.text_encoder, conditioning.SDXLText)
        time_ids = conditioning.time_ids(tuple(d * self.vae_factor for d in latent_hw)) if sdxl else None
        return conditioning.encode(self.text_encoder, text_params, ids_BxT, concept_ids_N, rows_NxD, time_ids)


def step_model(bundle: ModelBundle) -> StepModel:
    alphas = np.asarray(bundle.scheduler_state.common.alphas_cumprod)
    return StepModel(bundle.unet, conditioning.text_model(bundle), int(bundle.scheduler.config.num_train_timesteps),
                     bundle.prediction_type, tuple(alphas.tolist()), str(alphas.dtype), bundle.vae_factor)


class Bound(sharding.Bound):
    """`sharding.Bound` (a jitted function with its statics bound) of a train step, whose stage's fixed arrays
    the loop binds too."""

    def bind(self, frozen, run_data, key, *rest):
        """(state, masks) -> (state, metrics): a train step with a stage's fixed arrays bound, as the loop calls it
        (`jit(state, frozen, run_data, masks, key, *rest)` underneath)."""
        jitted, statics = self.jitted, self.statics

        def step(state, masks):
            return jitted(*statics, state, frozen, run_data, masks, key, *rest)

        return step


@dataclasses.dataclass(frozen=True)
class StepStatics:
    """What a train step's program is specialised on (hashable: static, the compiled program's identity)."""

    model: StepModel
    cfg: LossConfig
    opt: optax.GradientTransformation | None = None  # None: the loss alone
    mesh: Mesh | None = None  # the batch's sharding constraint (None inside the jobs' vmap)
    concept_ids: tuple[int, ...] | None = None  # the rows' vocabulary ids; None: an argument (jobs, traced)


def _noised_batch(key, run_data, masks_Cxhxw, statics: StepStatics):
    """The step's drawn batch (instances, then one class image per instance when prior latents are given) with
    its timesteps, noisy latents, training target and the schedule's alphas_cumprod: a dict of arrays, sharded
    over the mesh when they divide."""
    model, cfg, mesh = statics.model, statics.cfg, statics.mesh
    k_draw, k_t, k_noise, k_prior = jax.random.split(key, 4)
    table = run_data["table"] if cfg.background_prompts else {**run_data["table"], "logw_P": run_data["joint_logw_P"]}
    # zoomed views (prepare.view_latents) come with masks V x C x h x w
    batch = data.draw_batch(k_draw, table, run_data.get("view_latents", run_data["latents"]), masks_Cxhxw,
                            cfg.batch_size, cfg.flip_prob)
    ids, latents = batch["ids"], batch["latents"]
    if cfg.background_swap > 0:  # a key of its own: runs without the swap draw what they always drew
        latents = data.swap_background(jax.random.fold_in(key, 1), latents, batch["masks"], batch["positions"],
                                       run_data["background_C"], run_data["backgrounds"], cfg.background_swap)
    b = cfg.batch_size
    if "prior_latents" in run_data:  # one class image per instance, with the class prompt; no attention loss on it
        idx = jax.random.randint(k_prior, (b,), 0, run_data["prior_latents"].shape[0])
        latents = jnp.concatenate([latents, run_data["prior_latents"][idx]])
        ids = jnp.concatenate([ids, jnp.broadcast_to(run_data["prior_ids"], ids.shape)])
    if mesh is not None and latents.shape[0] % mesh.size == 0:
        latents, ids = (jax.lax.with_sharding_constraint(x, sharding.batch_sharded(mesh)) for x in (latents, ids))
    t = jax.random.randint(k_t, (latents.shape[0],), 0, model.num_train_timesteps)
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    alphas_cumprod = model.alphas()
    return dict(batch, ids=ids, latents=latents, t=t, noisy=diffusion.add_noise(alphas_cumprod, latents, noise, t),
                target=diffusion.training_target(model.prediction_type, alphas_cumprod, latents, noise, t),  # eps or v
                alphas_cumprod=alphas_cumprod)


def _split_params(trainable, frozen):
    """(text encoder params, UNet params): joint tuning moves the UNet (or its LoRA adapters; optionally the text
    encoder) into `trainable`."""
    text_params = {k: trainable.get(k, v) for k, v in conditioning.text_params(frozen).items()}
    text_params.update(conditioning.text_params(trainable))
    return text_params, trainable["unet"] if "unet" in trainable else frozen["unet"]


def _context(trainable, text_params, run_data, nb, statics: StepStatics, concept_ids):
    """The batch's text conditioning from the current rows (instances, then the prior's class prompt)."""
    ids, latent_hw, b = nb["ids"], nb["latents"].shape[2:], statics.cfg.batch_size
    if "prior_latents" in run_data and "prior_context" in run_data and "text_encoder" not in trainable:
        # the class prompt's encoding is fixed while the text encoder is: cached once, not re-run each step
        inst = statics.model.condition(text_params, ids[:b], latent_hw, concept_ids, trainable["rows"])
        prior_1 = conditioning.batch_of(run_data["prior_context"], None)  # one prompt, batch axis added
        return conditioning.concatenate([inst, conditioning.broadcast(prior_1, b)])
    return statics.model.condition(text_params, ids, latent_hw, concept_ids, trainable["rows"])


def _attention_term(maps, nb, run_data, masks_BxCxhxw, present_BxC, cfg: LossConfig):
    """L_attn on the instances: each concept's cross-attention map (max-normalised, on the loss's grid) against
    its mask."""
    b, latent_hw = cfg.batch_size, nb["latents"].shape[2:]
    grid = (cfg.attn_resolution, cfg.attn_resolution * latent_hw[1] // latent_hw[0])
    positions, vectors_BxCxV = nb["positions"], None
    if "attn_vector_ids_CxV" in run_data:  # tokens.attn_all_vectors: every vector's map, not the first's only
        positions, vectors_BxCxV = data.vector_positions(nb["ids"][:b], run_data["attn_vector_ids_CxV"])
    attn = aggregate.aggregate_maps({k: v[:b] for k, v in maps.items()}, latent_hw,
                                    jnp.maximum(positions.reshape(b, -1), 0), out_hw=grid, normalize="max")
    attn = attn.reshape(positions.shape + grid)  # B x C x g x g, or B x C x V x g x g per vector
    return losses.attention_loss(attn, data.nearest_resize(masks_BxCxhxw, grid), present_BxC, vectors_BxCxV)


def _outside_term(eps_BxZxhxw, text_params, unet_params, lora, nb, run_data, union_Bx1xhxw, w_inst,
                  statics: StepStatics, concept_ids):
    """L_out: the prediction outside the masks held to the words' (the same noisy latents, the starting rows).
    The reference pass runs without capture, and on stopped inputs, so it is never differentiated. Its prompts'
    encoding is recomputed each step rather than cached: the text pass is small beside the UNet's, and the
    presets that would feel it (SD) keep this loss off."""
    b, model, cfg = statics.cfg.batch_size, statics.model, statics.cfg
    ref = model.condition(text_params, nb["ids"][:b], nb["latents"].shape[2:], concept_ids, run_data["start_rows"])
    unet_params, lora_sg, ref = jax.lax.stop_gradient((unet_params, lora, ref))
    eps_ref = capture.unet_eps(model.unet, unet_params, nb["noisy"][:b], nb["t"][:b], ref,
                               None if lora_sg is None else (lora_sg, cfg.lora_scale))
    return losses.outside_loss(eps_BxZxhxw[:b], eps_ref, union_Bx1xhxw, w_inst)


def concept_loss(trainable, frozen, run_data, masks_Cxhxw, key, statics: StepStatics, concept_ids_N):
    """L_mask + lambda * L_attn (+ the optional terms: outside, prior, context) for one drawn batch; returns
    (loss, metrics)."""
    model, cfg, concept_ids, b = statics.model, statics.cfg, concept_ids_N, statics.cfg.batch_size
    text_params, unet_params = _split_params(trainable, frozen)
    nb = _noised_batch(key, run_data, masks_Cxhxw, statics)
    context = _context(trainable, text_params, run_data, nb, statics, concept_ids)
    selector = capture.LayerSelector(resolutions=(cfg.attn_resolution,))

    def unet_fn(unet_params, adapters, noisy, t, context):
        lora = None if adapters is None else (adapters, cfg.lora_scale)
        return capture.unet_with_attention(model.unet, unet_params, noisy, t, context, selector, lora)

    if cfg.remat != "none":  # trade a second UNet forward for the activations' memory (joint stage)
        unet_fn = jax.checkpoint(unet_fn, policy=REMAT_POLICIES[cfg.remat])
    eps, maps = unet_fn(unet_params, trainable.get("lora"), nb["noisy"], nb["t"], context)

    present_BxC = (nb["positions"] >= 0).astype(jnp.float32)
    masks_BxCxhxw = nb["masks"].astype(jnp.float32)
    union_Bx1xhxw = losses.dilate(losses.union_mask(masks_BxCxhxw, present_BxC), cfg.loss_margin)
    w_inst = w_prior = None  # per-sample weights of the instances and the prior's class images (min-SNR)
    if cfg.min_snr_gamma > 0:
        snr_w = diffusion.min_snr_weights(model.prediction_type, nb["alphas_cumprod"], nb["t"], cfg.min_snr_gamma)
        w_inst, w_prior = snr_w[:b], snr_w[b:]
    target = nb["target"]
    l_mask = losses.masked_diffusion_loss(eps[:b], target[:b], union_Bx1xhxw, cfg.loss_per_area, w_inst)
    l_attn = _attention_term(maps, nb, run_data, masks_BxCxhxw, present_BxC, cfg)
    terms = {"loss_mask": (1.0, l_mask), "loss_attn": (cfg.attn_weight, l_attn)}
    if cfg.outside_weight > 0 and "start_rows" in run_data:
        terms["loss_outside"] = (cfg.outside_weight, _outside_term(
            eps, text_params, unet_params, trainable.get("lora"), nb, run_data, union_Bx1xhxw, w_inst, statics,
            concept_ids))
    if "prior_latents" in run_data:
        terms["loss_prior"] = (cfg.prior_weight, losses.diffusion_loss(eps[b:], target[b:], w_prior))
    if cfg.context_weight > 0 and "context_ids" in run_data:  # the text encoder alone: no UNet pass
        states = model.text_states(text_params, run_data["context_ids"], nb["latents"].shape[2:], concept_ids,
                                   trainable["rows"])
        terms["loss_ctx"] = (cfg.context_weight,
                             losses.context_loss(states, run_data["context_target"], run_data["context_weight"]))
    total = sum(w * v for w, v in terms.values())
    return total, {name: v for name, (_, v) in terms.items()}


def train_step(statics: StepStatics, state, frozen, run_data, masks_Cxhxw, base_key, concept_ids_N=None):
    """One optimisation step of one job: the step's randomness is fold_in(base_key, step). The concept ids are
    `statics.concept_ids` (a single run), or `concept_ids_N` (traced: each of the vmapped jobs its own)."""
    ids_N = jnp.asarray(statics.concept_ids if concept_ids_N is None else concept_ids_N, jnp.int32)
    key = jax.random.fold_in(base_key, state["step"])
    loss_fn = functools.partial(concept_loss, statics=statics, concept_ids_N=ids_N)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, run_data, masks_Cxhxw,
                                                                       key)
    updates, opt_state = statics.opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if "ema_rows" in state:  # why: the last step's rows carry the jitter of the last few batches (lr 1e-2)
        d = statics.cfg.rows_ema
        new["ema_rows"] = d * state["ema_rows"] + (1.0 - d) * params["rows"]
    return new, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))


def make_train_step(bundle: ModelBundle, concept_ids, cfg: LossConfig, opt: optax.GradientTransformation,
                    mesh: Mesh, *, state_shardings=None, frozen_shardings=None) -> Bound:
    """jit(state, frozen, run_data, masks, base_key) -> (state, metrics), state donated.

    The drawn batch is split over every device of the mesh when it divides (a batch of 1 runs replicated).
    State and frozen weights are replicated unless shardings are given: `sharding.fsdp_shardings` of the
    state splits the joint stage's UNet, gradients and optimiser moments over the mesh's fsdp axis (the
    frozen weights likewise, when the UNet does not fit one device)."""
    rep = sharding.replicated(mesh)
    state_sh = rep if state_shardings is None else state_shardings
    frozen_sh = rep if frozen_shardings is None else frozen_shardings
    jitted = jax.jit(train_step, static_argnums=(0,), in_shardings=(state_sh, frozen_sh, rep, rep, rep),
                     out_shardings=(state_sh, rep), donate_argnums=(1,))
    return Bound(jitted, StepStatics(step_model(bundle), cfg, opt, mesh, tuple(int(i) for i in concept_ids)))


def job_axis_sharding(mesh: Mesh, num_jobs: int):
    """Jobs spread over the devices when they divide, else every device runs every job."""
    return sharding.batch_sharded(mesh) if num_jobs % mesh.size == 0 else sharding.replicated(mesh)


def _jobs_step(statics: StepStatics, states, frozen, run_data, masks_JxCxhxw, keys, concept_ids_JxN):
    one = functools.partial(train_step, statics)
    return jax.vmap(one, in_axes=(0, None, 0, 0, 0, 0))(states, frozen, run_data, masks_JxCxhxw, keys,
                                                        concept_ids_JxN)


def make_jobs_step(bundle: ModelBundle, cfg: LossConfig, opt: optax.GradientTransformation, mesh: Mesh,
                   num_jobs: int) -> Bound:
    """J independent personalisation jobs in one program: jit(states, frozen, run_data, masks, keys,
    concept_ids) -> (states, metrics), every argument but `frozen` with a leading job axis J.

    The jobs share the frozen weights (one UNet for all: the token stage's cost per job falls as J grows,
    the UNet's weights are read once per step for every job); each job keeps its own concept rows,
    optimiser state, data, masks, randomness and concept ids (traced, so jobs with different tokens share
    the program). Per job it computes exactly what `make_train_step` computes. The job axis is split over
    the mesh when J divides over it: in the joint stage each device then tunes its own jobs' UNets."""
    rep, job = sharding.replicated(mesh), job_axis_sharding(mesh, num_jobs)
    jitted = jax.jit(_jobs_step, static_argnums=(0,), in_shardings=(job, rep, job, job, job, job),
                     out_shardings=(job, job), donate_argnums=(1,))
    return Bound(jitted, StepStatics(step_model(bundle), cfg, opt))


@dataclasses.dataclass(frozen=True)
class MapsStatics:
    """What the E-step's attention pass is specialised on (hashable: static, the compiled program's identity)."""

    model: StepModel
    selector: capture.LayerSelector
    num_timesteps: int
    latent_hw: tuple[int, int]
    mesh: Mesh
    concept_ids: tuple[int, ...] | None  # None: an argument (jobs, traced)
    chunk: int = 0  # timesteps per UNet call (0: all in one batch)


def _summed_maps(statics: MapsStatics, frozen, noisy_KxZxhxw, t_K, context_1, positions_C):
    """Sum over the K timesteps of each concept's aggregated cross-attention map, C x h x w, in one UNet call
    (`context_1`: the prompt's condition, a batch of one)."""
    k = noisy_KxZxhxw.shape[0]
    if k % statics.mesh.size == 0:
        noisy_KxZxhxw = jax.lax.with_sharding_constraint(noisy_KxZxhxw, sharding.batch_sharded(statics.mesh))
    context = conditioning.broadcast(context_1, k)
    _, maps = capture.unet_with_attention(statics.model.unet, frozen["unet"], noisy_KxZxhxw, t_K, context,
                                          statics.selector)
    agg_KxCxHxW = aggregate.aggregate_maps(maps, statics.latent_hw, jnp.maximum(positions_C, 0),
                                           out_hw=statics.latent_hw, normalize=None)
    return agg_KxCxHxW if statics.chunk == 0 else jnp.sum(agg_KxCxHxW, axis=0)


def _concept_maps(statics: MapsStatics, rows, frozen, latents_Zxhxw, ids_T, positions_C, key, concept_ids=None):
    model, num_timesteps, fixed_ids = statics.model, statics.num_timesteps, statics.concept_ids
    concept_ids = jnp.asarray(fixed_ids, jnp.int32) if fixed_ids is not None else concept_ids
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (num_timesteps,), 0, model.num_train_timesteps)
    noise = jax.random.normal(k_n, (num_timesteps,) + latents_Zxhxw.shape, latents_Zxhxw.dtype)
    noisy = diffusion.add_noise(model.alphas(), jnp.broadcast_to(latents_Zxhxw, noise.shape), noise, t)
    context = model.condition(frozen, ids_T[None], statics.latent_hw, concept_ids, rows)
    summed = functools.partial(_summed_maps, statics, frozen, context_1=context, positions_C=positions_C)
    if statics.chunk == 0:  # every timestep in one batch
        mean_CxHxW = jnp.mean(summed(noisy, t), axis=0)
    else:  # `chunk` timesteps per UNet call, one after the other: the activations of one chunk at a time
        n, k = divmod(num_timesteps, statics.chunk)[0], statics.chunk
        total = jnp.sum(jax.lax.map(lambda xs: summed(*xs), (noisy[:n * k].reshape((n, k) + noisy.shape[1:]),
                                                             t[:n * k].reshape(n, k))), axis=0)
        if n * k < num_timesteps:
            total = total + summed(noisy[n * k:], t[n * k:])
        mean_CxHxW = total / num_timesteps
    soft_CxHxW = aggregate.normalize_maps(mean_CxHxW, "minmax")
    return jnp.where((positions_C >= 0)[:, None, None], soft_CxHxW, 0.0)


def make_concept_maps(bundle: ModelBundle, concept_ids, selector: capture.LayerSelector, num_timesteps: int,
                      latent_hw: tuple[int, int], mesh: Mesh, frozen_shardings=None, chunk: int = 0):
    """jit(rows, frozen, latents Z x h x w, ids T, positions C, key) -> soft maps C x h x w (latent size).

    Each concept's cross-attention (conditional branch only) averaged over heads, the selected layers and
    `num_timesteps` random timesteps, then min-max normalised; concepts absent from the prompt get zeros.
    The timesteps form one batch, split over the mesh when they divide; with `chunk` > 0, batches of `chunk`
    timesteps one after the other (SD at 512 px: 50 timesteps at once hold 50 self-attention matrices of
    4096 x 4096 per head at the finest level, tens of GB). With `concept_ids=None` the ids are a last argument
    instead (one program for many jobs with different tokens)."""
    rep = sharding.replicated(mesh)
    frozen_sh = rep if frozen_shardings is None else frozen_shardings
    fixed = None if concept_ids is None else tuple(int(i) for i in concept_ids)
    in_sh = (rep, frozen_sh, rep, rep, rep, rep) + ((rep,) if fixed is None else ())
    jitted = Bound(jax.jit(_concept_maps, static_argnums=(0,), in_shardings=in_sh, out_shardings=rep),
                   MapsStatics(step_model(bundle), selector, num_timesteps, tuple(latent_hw), mesh, fixed,
                               chunk if 0 < chunk < num_timesteps else 0))

    def run(rows, frozen, *args):
        # arguments placed like the program's own outputs: one compile for every image and round
        return jitted(sharding.put_replicated(rows, mesh), sharding.put(frozen, frozen_sh),
                      *sharding.put_replicated(args, mesh))

    run.jitted = jitted
    return run
