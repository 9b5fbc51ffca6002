"""Sampling with classifier-free guidance, one jit-compiled program per (batch shape, steps, scheduler).

`guided_sample` is pure and takes any noise predictor `eps_fn(latents, t_B, context)`, so it is tested
against a predictor with a known answer. `make_sampler` binds it to a model bundle (contexts in);
`make_batch_sampler` is the generation program: prompt ids in, images out, the text encoding (with the
learned concept rows spliced in) inside the same compiled program, the batch split over a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp

from ..parallel import sharding
from . import adapter, capture, conditioning, diffusion
from .loading import ModelBundle


@functools.partial(jax.jit, static_argnums=3)
def _noise_program(key, p_B, k_B, shape):
    one = lambda p, k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, p), k), shape)  # noqa: E731
    return jax.vmap(one)(p_B, k_B)


def initial_noise_for(seed: int, p_B, k_B, shape_Zxhxw) -> jnp.ndarray:
    """B x Z x h x w starting noise of images (p_B[i], k_B[i]): entry i depends only on (seed, p, k), so an
    image gets the same noise whatever batch it is made in. One vectorised program per batch (no Python loop
    over images): a batch's noise is ready at once, whatever the number of images."""
    p_B, k_B = jnp.asarray(p_B, jnp.uint32), jnp.asarray(k_B, jnp.uint32)
    return _noise_program(jax.random.key(seed), p_B, k_B, tuple(int(d) for d in shape_Zxhxw))


def guided_sample(eps_fn, scheduler, sched_state, noise_BxZxhxw, cond_BxTxD, uncond_BxTxD,
                  num_steps: int, guidance):
    """Latents after `num_steps` scheduler steps from `noise`; eps = uncond + g (cond - uncond).

    `eps_fn` returns what the model predicts, the noise or v: the scheduler, built from the model's scheduler
    config, reads it by its `prediction_type` (guidance is linear in either).

    The conditional and unconditional halves run as one batch of 2B through the UNet. `guidance` may be
    a traced scalar (a sweep over guidance reuses one program). The conditions are text states or SDXL's
    `SDXLCondition`s (pytrees: joined part by part).
    """
    state = scheduler.set_timesteps(sched_state, num_steps, noise_BxZxhxw.shape)
    latents = noise_BxZxhxw * state.init_noise_sigma
    context_2BxTxD = conditioning.concatenate([uncond_BxTxD, cond_BxTxD])
    batch = noise_BxZxhxw.shape[0]
    # PNDM's PLMS warm-up evaluates the model once more than num_steps: loop over its own timestep list
    num_evals = state.timesteps.shape[0]

    def body(i, carry):
        latents, state = carry
        t = state.timesteps[i]
        x_2B = scheduler.scale_model_input(state, jnp.concatenate([latents, latents]), t)
        eps_2B = eps_fn(x_2B, jnp.full((2 * batch,), t, jnp.int32), context_2BxTxD)
        eps_u, eps_c = eps_2B[:batch], eps_2B[batch:]
        eps = eps_u + guidance * (eps_c - eps_u)
        latents, state = scheduler.step(state, eps.astype(latents.dtype), t, latents, return_dict=False)
        return latents, state

    latents, _ = jax.lax.fori_loop(0, num_evals, body, (latents, state))
    return latents


def _images(nets, schedule, params, noise, cond, uncond, guidance):
    """Guided sampling then decoding: nets = (unet, vae, latent_scale), schedule = (scheduler, its state, steps)."""
    (unet, vae, latent_scale), (sched, sched_state, num_steps) = nets, schedule
    eps_fn = functools.partial(capture.unet_eps, unet, params["unet"])
    latents = guided_sample(eps_fn, sched, sched_state, noise, cond, uncond, num_steps, guidance)
    return jnp.clip(diffusion.decode_latents(vae, params["vae"], latents / latent_scale), -1, 1)


@dataclasses.dataclass(frozen=True)
class SampleStatics:
    """What a sampling program is specialised on (hashable: a static jit argument)."""

    unet: Any
    vae: Any
    latent_scale: float
    text_encoder: adapter.StaticModule  # of `conditioning.text_model`: the text encoder, or SDXL's two
    scheduler_config: str  # the model's scheduler config as sorted JSON
    scheduler: str
    num_steps: int
    concept_ids: tuple[int, ...] | None = None  # the rows' vocabulary ids; None: a base model (rows ignored)
    time_ids: tuple[float, ...] | None = None  # SDXL: the images' micro-conditioning; None: SD 1/2
    zero_uncond: bool = False  # SDXL: zero unconditional text and pooled embedding (no negative prompt)

    def schedule(self) -> tuple:
        sched, sched_state = adapter.inference_scheduler(self.scheduler, json.loads(self.scheduler_config))
        return sched, sched_state, self.num_steps

    def nets(self) -> tuple:
        return self.unet, self.vae, self.latent_scale


def sample_statics(bundle: ModelBundle, scheduler: str, num_steps: int, concept_ids=None,
                   zero_uncond: bool = False) -> SampleStatics:
    sched_key = json.dumps(bundle.scheduler_config, sort_keys=True, default=str)
    ids = None if concept_ids is None else tuple(int(i) for i in concept_ids)
    time_ids = conditioning.image_time_ids(bundle)
    time_ids = None if time_ids is None else tuple(float(v) for v in time_ids)
    return SampleStatics(bundle.unet, bundle.vae, bundle.latent_scale,
                         adapter.StaticModule(conditioning.text_model(bundle)), sched_key, scheduler, num_steps, ids,
                         time_ids, bool(zero_uncond))


def _sample_contexts(statics: SampleStatics, params, noise, cond, uncond, guidance):
    return _images(statics.nets(), statics.schedule(), params, noise, cond, uncond, guidance)


def make_sampler(bundle: ModelBundle, scheduler: str = "ddim", num_steps: int = 50, guidance: float = 7.5):
    """Jitted (params, noise, cond, uncond) -> images B x H x W x 3 in [-1, 1] (contexts given)."""
    bound = sharding.Bound(jax.jit(_sample_contexts, static_argnums=0), sample_statics(bundle, scheduler, num_steps))
    return lambda params, noise, cond, uncond: bound(params, noise, cond, uncond, guidance)


def _sample_ids(statics: SampleStatics, params, rows_NxD, noise, cond_ids, uncond_ids, guidance):
    ids = None if statics.concept_ids is None else jnp.asarray(statics.concept_ids, jnp.int32)
    encode = functools.partial(conditioning.encode, statics.text_encoder.module, params, concept_ids_N=ids,
                               rows_NxD=None if ids is None else rows_NxD, time_ids_K=statics.time_ids)
    cond, uncond = encode(cond_ids), encode(uncond_ids)
    if statics.zero_uncond:
        uncond = conditioning.without_text(uncond)
    return _images(statics.nets(), statics.schedule(), params, noise, cond, uncond, guidance)


def zeros_for_uncond(bundle: ModelBundle, negative_prompt: str = "") -> bool:
    """Whether guidance's unconditional branch is zero text states and pooled embedding: an SDXL model whose
    pipeline says `force_zeros_for_empty_prompt` (SDXL base does), sampled without a negative prompt, as
    StableDiffusionXLPipeline does; otherwise the negative prompt (or the empty one) is encoded."""
    return bool(bundle.is_sdxl and bundle.force_zeros_for_empty_prompt and not negative_prompt)


def make_batch_sampler(bundle: ModelBundle, scheduler: str, num_steps: int, mesh, concept_ids=None,
                       zero_uncond: bool = False):
    """Jitted (params, rows_NxD, noise_BxZxhxw, cond_ids_BxT, uncond_ids_BxT, guidance) -> images B x H x W x 3.

    Params, the concept rows and guidance are replicated; noise, ids and images are split over the mesh's
    data axis (B must be a multiple of its size). `concept_ids` (static) are the rows' vocabulary ids;
    None for a base model (rows ignored). SDXL: the images' time ids are their size, uncropped (the pipeline's
    defaults); `zero_uncond` (`zeros_for_uncond`) makes the unconditional text states and pooled embedding zeros
    instead of the encoded negative prompt. generate() called again (a notebook),
    or on another run of the same model with the same settings (evaluate with several --run), reuses the
    compiled program.
    """
    rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    jitted = jax.jit(_sample_ids, static_argnums=0, in_shardings=(rep, rep, bat, bat, bat, rep), out_shardings=bat)
    return sharding.Bound(jitted, sample_statics(bundle, scheduler, num_steps, concept_ids, zero_uncond))
