"""The token-optimisation losses (docs/method.md §2), as pure functions of arrays.

The UNet's output is compared with its training target: the noise for epsilon models, v for v-prediction
models (`diffusion.training_target`); "noise" below is that target.

L_mask: squared error of the noise prediction inside the union of the prompt's concept masks, averaged
over *all* elements (Break-a-Scene does not normalise by mask area, so small concepts weigh less).
L_attn: per concept in the prompt, the mean squared error between its max-normalised cross-attention
map and its mask at the map's resolution; summed over the concepts, averaged over the batch.
L_ctx: how far the learned rows move the text states of the *other* words of a prompt ("on a pink sand
background") from where the starting rows put them (CoRe's context regularisation, Wu et al. 2024).
L_out: how far the learned rows move the noise prediction *outside* the prompt's concept masks from the
prediction with the starting rows (the words).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def union_mask(masks_BxCxhxw, present_BxC):
    """B x 1 x h x w: union of the masks of the concepts present in each prompt."""
    chosen = masks_BxCxhxw * present_BxC[:, :, None, None].astype(masks_BxCxhxw.dtype)
    return jnp.max(chosen, axis=1, keepdims=True)


def dilate(mask_Bx1xhxw, cells: int):
    """The mask grown by `cells` latent cells (a (2 cells + 1)^2 max filter). Inside an exact object mask the
    loss never sees the object's outline or holes (a ring's hole is background): a margin of its surroundings
    teaches the token the shape, not only the colour."""
    if cells <= 0:
        return mask_Bx1xhxw
    size = 2 * cells + 1
    return jax.lax.reduce_window(mask_Bx1xhxw, -jnp.inf, jax.lax.max, (1, 1, size, size), (1, 1, 1, 1), "SAME")


def masked_diffusion_loss(eps_BxZxhxw, noise_BxZxhxw, mask_Bx1xhxw, per_area: bool = False, weight_B=None):
    """mean(((eps - noise) * M)^2) over every element; per_area: over the masked elements only; weight_B: each
    sample's error weighted (`diffusion.min_snr_weights`) before the mean over the batch."""
    diff = (eps_BxZxhxw.astype(jnp.float32) - noise_BxZxhxw.astype(jnp.float32)) * mask_Bx1xhxw
    if per_area:
        area_B = jnp.maximum(jnp.sum(mask_Bx1xhxw, axis=(1, 2, 3)), 1.0) * diff.shape[1]
        return jnp.mean(jnp.sum(diff ** 2, axis=(1, 2, 3)) / area_B * (1.0 if weight_B is None else weight_B))
    if weight_B is None:
        return jnp.mean(diff ** 2)
    return jnp.mean(jnp.mean(diff ** 2, axis=(1, 2, 3)) * weight_B)


def attention_loss(maps, masks_BxCxhxw, present_BxC, vectors_BxCxV=None):
    """sum over present concepts of mean((A_i - M_i)^2), averaged over the batch; `maps` B x C x h x w. With
    `vectors_BxCxV` (1 where concept c's v-th vector is in the prompt) the maps are B x C x V x h x w, one per
    vector, and a concept's term is the mean over its vectors: a multi-vector concept weighs what a one-vector
    concept does."""
    if vectors_BxCxV is None:
        maps_BxCxVxhxw, vectors_BxCxV = maps[:, :, None], jnp.ones(maps.shape[:2] + (1,))
    else:
        maps_BxCxVxhxw = maps
    per_BxCxV = jnp.mean((maps_BxCxVxhxw.astype(jnp.float32) - masks_BxCxhxw[:, :, None]) ** 2, axis=(-2, -1))
    per_BxC = jnp.sum(per_BxCxV * vectors_BxCxV, -1) / jnp.maximum(jnp.sum(vectors_BxCxV, -1), 1.0)
    return jnp.sum(per_BxC * present_BxC) / maps.shape[0]


def outside_loss(eps_BxZxhxw, eps_ref_BxZxhxw, union_Bx1xhxw, weight_B=None):
    """The squared difference between the prediction and the reference prediction (the same noisy latents, the
    prompt with its starting rows, the words) outside the prompt's concept masks, over every element. Why: the
    masked loss never reads outside the masks, so nothing stops a token from drawing there what it saw beside its
    object (the source image's other object, in the token's colour); its words do not."""
    return masked_diffusion_loss(eps_BxZxhxw, eps_ref_BxZxhxw, 1.0 - union_Bx1xhxw, weight_B=weight_B)


def diffusion_loss(eps_BxZxhxw, noise_BxZxhxw, weight_B=None):
    """Plain eps-MSE (prior preservation); weight_B as in `masked_diffusion_loss`."""
    sq = (eps_BxZxhxw.astype(jnp.float32) - noise_BxZxhxw.astype(jnp.float32)) ** 2
    return jnp.mean(sq) if weight_B is None else jnp.mean(jnp.mean(sq, axis=(1, 2, 3)) * weight_B)


def context_loss(states_KxTxD, target_KxTxD, weight_KxT):
    """sum_k,t w ||h - h0||^2 / sum_k,t w ||h0||^2: the relative squared change of the weighted positions' text
    states. Why: a causal text encoder lets a concept's vectors rewrite every later word's state; a token that
    learned "the source picture" then drowns the rest of the prompt (another background, a second concept), while
    the starting rows (its words) leave it readable."""
    states, target = states_KxTxD.astype(jnp.float32), target_KxTxD.astype(jnp.float32)
    num = jnp.sum(weight_KxT * jnp.sum((states - target) ** 2, axis=-1))
    return num / jnp.maximum(jnp.sum(weight_KxT * jnp.sum(target ** 2, axis=-1)), 1e-12)
