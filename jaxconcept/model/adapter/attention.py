"""The diffusers attention internals the UNet interceptors (`model/capture.py`) rely on: which modules are
cross-attention, GEGLU and a transformer block's input GroupNorm, the attention forward that also returns its
probabilities, PyTorch's exact GELU and GroupNorm eps, and memory-efficient (chunked) attention."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from diffusers.models.attention_flax import FlaxAttention, FlaxGEGLU, FlaxTransformer2DModel


def is_attention_module(module: Any) -> bool:
    return isinstance(module, FlaxAttention)


def is_geglu_module(module: Any) -> bool:
    return isinstance(module, FlaxGEGLU)


def is_transformer_group_norm(module: Any) -> bool:
    """The GroupNorm at the input of a UNet Transformer2D block."""
    return isinstance(module, nn.GroupNorm) and isinstance(module.parent, FlaxTransformer2DModel)


# PyTorch's Transformer2DModel GroupNorm eps (diffusers' Flax port hard-codes 1e-5)
TRANSFORMER_NORM_EPS = 1e-6


def geglu_exact_gelu(module, hidden):
    """diffusers' FlaxGEGLU with PyTorch's exact (erf) GELU instead of the tanh approximation (dropout:
    inference / rate 0)."""
    hidden_linear, hidden_gate = jnp.split(module.proj(hidden), 2, axis=2)
    return hidden_linear * nn.gelu(hidden_gate, approximate=False)


def transformer_group_norm_pytorch_eps(module, hidden):
    """A Transformer2D block's input GroupNorm with PyTorch's eps."""
    norm = module.clone(parent=None, epsilon=TRANSFORMER_NORM_EPS)
    return norm.apply({"params": module.variables["params"]}, hidden)


def with_memory_efficient_attention(unet):
    """The UNet computing attention in query/key chunks (diffusers' `use_memory_efficient_attention`): the same
    values, without holding whole attention matrices. Captured cross-attention layers still form their
    probabilities (Q x T: small); the self-attention layers, whose Q x Q matrices dominate memory, are chunked."""
    return unet.clone(use_memory_efficient_attention=True)


def attention_with_probs(module, hidden_BxQxF, context_BxTxD):
    """diffusers' FlaxAttention forward (non-chunked path) that also returns probs (B x heads x Q x T)."""
    heads, dim_head = module.heads, module.dim_head
    q = module.query(hidden_BxQxF)
    k = module.key(context_BxTxD)
    v = module.value(context_BxTxD)
    batch, num_q, num_t = hidden_BxQxF.shape[0], hidden_BxQxF.shape[1], context_BxTxD.shape[1]
    if module.split_head_dim:
        q = q.reshape(batch, -1, heads, dim_head)
        k = k.reshape(batch, -1, heads, dim_head)
        v = v.reshape(batch, -1, heads, dim_head)
        scores = jnp.einsum("b t n h, b f n h -> b n f t", k, q) * dim_head**-0.5
        probs = nn.softmax(scores, axis=-1)
        out = jnp.einsum("b n f t, b t n h -> b f n h", probs, v).reshape(batch, -1, heads * dim_head)
        probs_BxAxQxT = probs
    else:
        q, k, v = (module.reshape_heads_to_batch_dim(x) for x in (q, k, v))
        scores = jnp.einsum("b i d, b j d->b i j", q, k) * dim_head**-0.5
        probs = nn.softmax(scores, axis=2)
        out = module.reshape_batch_dim_to_heads(jnp.einsum("b i j, b j d -> b i d", probs, v))
        probs_BxAxQxT = probs.reshape(batch, heads, num_q, num_t)
    out = module.proj_attn(out)
    return module.dropout_layer(out, deterministic=True), probs_BxAxQxT
