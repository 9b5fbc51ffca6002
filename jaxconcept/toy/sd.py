"""The toy Stable Diffusion: real component classes (CLIP tokenizer and text encoder, AutoencoderKL,
UNet2DConditionModel, DDPM schedule) at a size that trains on 2 CPU cores.

64 px scenes -> VAE (factor 4) -> 16x16x4 latents; UNet widths 32/64/64 with cross-attention at 16x16
and 8x8; a 2-layer, 64-wide CLIP text encoder over the scene vocabulary (one token per word).
"""

from __future__ import annotations

import jax.numpy as jnp

from ..model import loading as model
from . import scene

IMAGE_SIZE = 64

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64)

# SD's layout in miniature: widths 32/64/64, cross-attention at 16x16 and 8x8 (the shipped weights' layout)
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=TEXT["hidden_size"],
)

# 16 channels at full resolution: a (32, 64, 64) VAE took 12.1 s per batch-32 step on 2 cores, this 3.2 s
VAE = dict(
    sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16, scaling_factor=1.0,
)

# Captions are short; 32 positions keep the text encoder and the attention maps small.
MAX_LENGTH = 32

WEIGHTS = model.TOY_WEIGHTS


def words() -> tuple[str, ...]:
    return tuple(scene.vocabulary())


def architecture(name: str) -> tuple[dict, dict, dict, int]:
    """(text, unet, vae configs, image size) of "toy" or of the smaller "tiny" (for tests)."""
    if name == "toy":
        return TEXT, UNET, VAE, IMAGE_SIZE
    if name == "tiny":
        return model.TINY_TEXT, model.TINY_UNET, model.TINY_VAE, 32
    raise ValueError(f"unknown toy architecture {name!r}: 'toy' or 'tiny'")


def random_toy(arch: str = "toy", seed: int = 0, dtype=jnp.float32, unet_widths: tuple = ()) -> model.ModelBundle:
    """Untrained toy model over the scene vocabulary (the starting point of pre-training); `unet_widths`
    replaces the UNet's block widths (multiples of 32: diffusers' Flax UNet uses 32 groups)."""
    text, unet, vae, _ = architecture(arch)
    if unet_widths:
        if len(unet_widths) != len(unet["block_out_channels"]) or any(w % 32 for w in unet_widths):
            raise ValueError(f"unet_widths {unet_widths}: {len(unet['block_out_channels'])} multiples of 32")
        unet = dict(unet, block_out_channels=tuple(unet_widths))
    return model.build_random(words(), model.Architecture(dict(text), unet, vae), dtype=dtype, seed=seed,
                              source=f"random-{arch}", max_length=MAX_LENGTH)

