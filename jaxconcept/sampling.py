"""Sampling with classifier-free guidance, one jit-compiled program per (shape, steps, scheduler).

`guided_sample` is pure and takes any noise predictor `eps_fn(latents, t_B, context)`, so it is tested
against a predictor with a known answer; `make_sampler` binds it to a model bundle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import adapter, capture, diffusion
from .model import ModelBundle


def guided_sample(eps_fn, scheduler, sched_state, noise_BxCxhxw, cond_BxTxD, uncond_BxTxD,
                  num_steps: int, guidance: float):
    """Latents after `num_steps` scheduler steps from `noise`; eps = uncond + g (cond - uncond).

    The conditional and unconditional halves run as one batch of 2B through the UNet.
    """
    state = scheduler.set_timesteps(sched_state, num_steps, noise_BxCxhxw.shape)
    latents = noise_BxCxhxw * state.init_noise_sigma
    context_2BxTxD = jnp.concatenate([uncond_BxTxD, cond_BxTxD])
    batch = noise_BxCxhxw.shape[0]

    def body(i, carry):
        latents, state = carry
        t = state.timesteps[i]
        x_2B = scheduler.scale_model_input(state, jnp.concatenate([latents, latents]), t)
        eps_2B = eps_fn(x_2B, jnp.full((2 * batch,), t, jnp.int32), context_2BxTxD)
        eps_u, eps_c = eps_2B[:batch], eps_2B[batch:]
        eps = eps_u + guidance * (eps_c - eps_u)
        latents, state = scheduler.step(state, eps.astype(latents.dtype), t, latents, return_dict=False)
        return latents, state

    latents, _ = jax.lax.fori_loop(0, num_steps, body, (latents, state))
    return latents


def make_sampler(bundle: ModelBundle, scheduler: str = "ddim", num_steps: int = 50, guidance: float = 7.5):
    """Jitted (params, noise, cond, uncond) -> images B x H x W x 3 in [-1, 1]."""
    sched, sched_state = adapter.inference_scheduler(scheduler, bundle.scheduler_config)

    @jax.jit
    def sample(params, noise, cond, uncond):
        eps_fn = functools.partial(capture.unet_eps, bundle.unet, params["unet"])
        latents = guided_sample(eps_fn, sched, sched_state, noise, cond, uncond, num_steps, guidance)
        return jnp.clip(diffusion.decode_latents(bundle.vae, params["vae"], latents / bundle.latent_scale), -1, 1)

    return sample
