"""The Flax UNet and VAE: built from a (PyTorch or Flax) diffusers config after the checks of `compat`, loaded from
a Flax folder, their configs as plain dicts."""

from __future__ import annotations

import jax.numpy as jnp
from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

from .compat import flax_config, public_config


def unet_from_config(config: dict, dtype=jnp.float32, what: str = "UNet config"):
    """The Flax UNet of a (PyTorch or Flax) diffusers config; ModelSourceError for settings Flax lacks."""
    return FlaxUNet2DConditionModel.from_config(
        flax_config(config, FlaxUNet2DConditionModel, "UNet", what), dtype=dtype)


def vae_from_config(config: dict, dtype=jnp.float32, what: str = "VAE config"):
    return FlaxAutoencoderKL.from_config(flax_config(config, FlaxAutoencoderKL, "VAE", what), dtype=dtype)


def load_flax_unet(folder: str, dtype=jnp.float32):
    """(module, params) from a folder holding `config.json` + `diffusion_flax_model.msgpack`."""
    module, params = FlaxUNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    return unet_from_config(module.config, dtype), params


def unet_config_dict(module) -> dict:
    return public_config(module.config)


def vae_config_dict(module) -> dict:
    return public_config(module.config)
