"""Diffusion math and the VAE, as pure functions.

Conventions: images are B x H x W x 3 floats in [-1, 1]; latents are B x C x h x w (the UNet's layout),
unscaled out of the VAE and multiplied by the bundle's `latent_scale` before the UNet sees them.
"""

from __future__ import annotations

import jax.numpy as jnp


def encode_images(vae, vae_params, images_BxHxWx3):
    """(mean, std) of the VAE posterior, each B x C x h x w, unscaled."""
    images_Bx3xHxW = jnp.transpose(images_BxHxWx3, (0, 3, 1, 2))
    dist = vae.apply({"params": vae_params}, images_Bx3xHxW, method=vae.encode).latent_dist
    # diffusers' Flax posterior is channels-last
    return jnp.transpose(dist.mean, (0, 3, 1, 2)), jnp.transpose(dist.std, (0, 3, 1, 2))


def decode_latents(vae, vae_params, latents_BxZxhxw):
    """Images B x H x W x 3 (about [-1, 1]) from unscaled latents."""
    images_Bx3xHxW = vae.apply({"params": vae_params}, latents_BxZxhxw, method=vae.decode).sample
    return jnp.transpose(images_Bx3xHxW, (0, 2, 3, 1))


def add_noise(alphas_cumprod_T, latents_BxZxhxw, noise_BxZxhxw, timesteps_B):
    """Forward process q(z_t | z_0) = sqrt(a_t) z_0 + sqrt(1 - a_t) eps."""
    a_t = alphas_cumprod_T[timesteps_B].astype(latents_BxZxhxw.dtype)[:, None, None, None]
    return jnp.sqrt(a_t) * latents_BxZxhxw + jnp.sqrt(1.0 - a_t) * noise_BxZxhxw


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts: the noise, or v (Salimans & Ho 2022)


def min_snr_weights(prediction_type: str, alphas_cumprod_T, timesteps_B, gamma: float):
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023), B: min(SNR, gamma) / SNR for epsilon models,
    min(SNR, gamma) / (SNR + 1) for v_prediction (its target's error is the noise error times SNR + 1).
    SNR(t) = a_t / (1 - a_t). Why: the squared error of the noise is largest in effect at the low-noise steps
    (huge SNR), where only fine texture is decided; capping the SNR lets the high-noise steps, where colour and
    layout are decided, weigh as much. Steps with SNR <= gamma keep weight 1 (epsilon)."""
    a_B = alphas_cumprod_T[timesteps_B].astype(jnp.float32)
    snr_B = a_B / (1.0 - a_B)
    capped_B = jnp.minimum(snr_B, gamma)
    return capped_B / (snr_B + 1.0) if prediction_type == "v_prediction" else capped_B / snr_B


def training_target(prediction_type: str, alphas_cumprod_T, latents_BxZxhxw, noise_BxZxhxw, timesteps_B):
    """What the UNet's output is regressed on: the noise (epsilon models) or the velocity
    v = sqrt(a_t) eps - sqrt(1 - a_t) z_0 (v_prediction models, e.g. SD 2.x at 768 px)."""
    if prediction_type == "epsilon":
        return noise_BxZxhxw
    if prediction_type != "v_prediction":
        raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    a_t = alphas_cumprod_T[timesteps_B].astype(latents_BxZxhxw.dtype)[:, None, None, None]
    return jnp.sqrt(a_t) * noise_BxZxhxw - jnp.sqrt(1.0 - a_t) * latents_BxZxhxw
