"""The token-optimisation losses (docs/method.md §2), as pure functions of arrays.

The UNet's output is compared with its training target: the noise for epsilon models, v for v-prediction
models (`diffusion.training_target`); "noise" below is that target.

L_mask: squared error of the noise prediction inside the union of the prompt's concept masks, averaged
over *all* elements (Break-a-Scene does not normalise by mask area, so small concepts weigh less).
L_attn: per concept in the prompt, the mean squared error between its max-normalised cross-attention
map and its mask at the map's resolution; summed over the concepts, averaged over the batch.
"""

from __future__ import annotations

import jax.numpy as jnp


def union_mask(masks_BxCxhxw, present_BxC):
    """B x 1 x h x w: union of the masks of the concepts present in each prompt."""
    chosen = masks_BxCxhxw * present_BxC[:, :, None, None].astype(masks_BxCxhxw.dtype)
    return jnp.max(chosen, axis=1, keepdims=True)


def masked_diffusion_loss(eps_BxZxhxw, noise_BxZxhxw, mask_Bx1xhxw):
    """mean(((eps - noise) * M)^2) over every element."""
    diff = (eps_BxZxhxw.astype(jnp.float32) - noise_BxZxhxw.astype(jnp.float32)) * mask_Bx1xhxw
    return jnp.mean(diff ** 2)


def attention_loss(maps_BxCxhxw, masks_BxCxhxw, present_BxC):
    """sum over present concepts of mean((A_i - M_i)^2), averaged over the batch."""
    per_BxC = jnp.mean((maps_BxCxhxw.astype(jnp.float32) - masks_BxCxhxw) ** 2, axis=(-2, -1))
    return jnp.sum(per_BxC * present_BxC) / maps_BxCxhxw.shape[0]


def diffusion_loss(eps_BxZxhxw, noise_BxZxhxw):
    """Plain eps-MSE (prior preservation)."""
    return jnp.mean((eps_BxZxhxw.astype(jnp.float32) - noise_BxZxhxw.astype(jnp.float32)) ** 2)
