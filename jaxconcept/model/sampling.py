"""Sampling with classifier-free guidance, one jit-compiled program per (batch shape, steps, scheduler).

`guided_sample` is pure and takes any noise predictor `eps_fn(latents, t_B, context)`, so it is tested
against a predictor with a known answer. `make_sampler` binds it to a model bundle (contexts in);
`make_batch_sampler` is the generation program: prompt ids in, images out, the text encoding (with the
learned concept rows spliced in) inside the same compiled program, the batch split over a mesh.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp

from ..parallel import sharding
from . import adapter, capture, conditioning, diffusion
from .loading import ModelBundle


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


def make_sampler(bundle: ModelBundle, scheduler: str = "ddim", num_steps: int = 50, guidance: float = 7.5):
    """Jitted (params, noise, cond, uncond) -> images B x H x W x 3 in [-1, 1] (contexts given)."""
    sched, sched_state = adapter.inference_scheduler(scheduler, bundle.scheduler_config)

    @jax.jit
    def sample(params, noise, cond, uncond):
        return _images((bundle.unet, bundle.vae, bundle.latent_scale), (sched, sched_state, num_steps), params,
                       noise, cond, uncond, guidance)

    return sample


def make_batch_sampler(bundle: ModelBundle, scheduler: str, num_steps: int, mesh, concept_ids=None,
                       zero_uncond: bool = False):
    """Jitted (params, rows_NxD, noise_BxZxhxw, cond_ids_BxT, uncond_ids_BxT, guidance) -> images B x H x W x 3.

    Params, the concept rows and guidance are replicated; noise, ids and images are split over the mesh's
    data axis (B must be a multiple of its size). `concept_ids` (static) are the rows' vocabulary ids;
    None for a base model (rows ignored). SDXL: the images' time ids are their size, uncropped (the pipeline's
    defaults); `zero_uncond` makes the unconditional text states and pooled embedding zeros instead of the
    encoded negative prompt (SDXL base's `force_zeros_for_empty_prompt`).
    """
    # cached: generate() called again (a notebook) or on another run of the same model with the same settings
    # (evaluate with several --run) reuses the compiled program
    sched_key = json.dumps(bundle.scheduler_config, sort_keys=True, default=str)
    ids = None if concept_ids is None else tuple(int(i) for i in concept_ids)
    text = adapter.StaticModule(conditioning.text_model(bundle))
    time_ids = conditioning.image_time_ids(bundle)
    time_ids = None if time_ids is None else tuple(float(v) for v in time_ids)
    return _batch_program((bundle.unet, bundle.vae, bundle.latent_scale), text, sched_key, scheduler,
                          num_steps, mesh, ids, (time_ids, bool(zero_uncond)))


@functools.lru_cache(maxsize=16)
def _batch_program(nets, text, sched_key, scheduler, num_steps, mesh, concept_ids, sdxl_options):
    sched, sched_state = adapter.inference_scheduler(scheduler, json.loads(sched_key))
    ids = None if concept_ids is None else jnp.asarray(concept_ids, jnp.int32)
    time_ids, zero_uncond = sdxl_options

    def sample(params, rows_NxD, noise, cond_ids, uncond_ids, guidance):
        rows = None if ids is None else rows_NxD
        encode = functools.partial(conditioning.encode, text.module, params, concept_ids_N=ids, rows_NxD=rows,
                                   time_ids_K=time_ids)
        cond, uncond = encode(cond_ids), encode(uncond_ids)
        if zero_uncond:
            uncond = conditioning.without_text(uncond)
        return _images(nets, (sched, sched_state, num_steps), params, noise, cond, uncond, guidance)

    rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(sample, in_shardings=(rep, rep, bat, bat, bat, rep), out_shardings=bat)
