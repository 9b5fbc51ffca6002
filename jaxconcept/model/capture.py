"""Cross-attention capture as intercepted Flax modules.

`unet_with_attention` runs the UNet under `flax.linen.intercept_methods`. For each cross-attention
module that the `LayerSelector` keeps, the interceptor replaces the module's call with ours: it forms
the attention probabilities once, uses them for the output (the same ops, in the same order, as
diffusers' plain dot-product path) and sows them. Layers not kept run their own code (flash /
memory-efficient attention included) and store nothing. The context is entered inside the traced
function, so this works under `jax.jit` (around a compiled function it would do nothing).

Every UNet application of the package is here (`unet_with_attention`, `unet_eps`); each runs
`_pytorch_faithful`, which restores the PyTorch model's exact GELU and GroupNorm eps where diffusers' Flax
port differs. The diffusers internals these rely on are named only in `model/adapter/` (`attention.py`).

The condition (`cond`) is SD 1/2's text states (B x T x D) or SDXL's `conditioning.SDXLCondition`, whose
pooled text embedding and time ids go to the UNet's added conditioning; cross-attention reads the text states
in both, so capture is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import LayerGridError
from . import adapter, conditioning, lora as lora_lib

COLLECTION = "intermediates"
SOW_NAME = "cross_attention_probs"


@dataclasses.dataclass(frozen=True)
class LayerSelector:
    """Which cross-attention layers to capture (hashable: usable as a static jit argument).

    resolutions: query-grid heights to keep (e.g. (16,) keeps the 16x16 layers of SD at 512 px);
        None keeps every resolution.
    include: layer-path prefixes to keep, e.g. ("down_blocks_2", "up_blocks_1"); None keeps all.
    exclude: layer-path prefixes to drop, e.g. ("mid_block",).
    """

    resolutions: tuple[int, ...] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def keeps(self, path: str, grid_hw: tuple[int, int]) -> bool:
        if self.resolutions is not None and grid_hw[0] not in self.resolutions:
            return False
        if self.include is not None and not any(path.startswith(p) for p in self.include):
            return False
        return not any(path.startswith(p) for p in self.exclude)


ALL_LAYERS = LayerSelector()


def grid_of(num_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a layer's query grid: the latent grid downsampled by a power of two."""
    h, w = latent_hw
    factor = math.sqrt(h * w / num_queries)
    rows, cols = round(h / factor), round(w / factor)
    if rows * cols != num_queries:
        raise ValueError(f"{num_queries} queries do not tile a latent of {h}x{w}")
    return rows, cols


def _interceptor(selector: LayerSelector, latent_hw, grids_seen: set, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not adapter.is_attention_module(module):
        return next_fun(*args, **kwargs)
    hidden = args[0]
    ctx = args[1] if len(args) > 1 else kwargs.get("context")
    if ctx is None:  # self-attention
        return next_fun(*args, **kwargs)
    grid_hw = grid_of(hidden.shape[1], latent_hw)
    grids_seen.add(grid_hw)
    if not selector.keeps("/".join(module.scope.path), grid_hw):
        return next_fun(*args, **kwargs)
    out, probs = adapter.attention_with_probs(module, hidden, ctx)
    module.sow(COLLECTION, SOW_NAME, probs)
    return out


def _pytorch_faithful(next_fun, args, kwargs, context):
    """Undo two departures of diffusers' Flax UNet from the PyTorch model that SD weights were trained in:
    its GEGLU uses tanh-approximated GELU (PyTorch: exact erf GELU), and its Transformer2D GroupNorm has
    eps 1e-5 (PyTorch: 1e-6). Measured on a random tiny UNet: eps relative error vs PyTorch 7.4e-5
    without this, ~1e-6 with it."""
    module = context.module
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if adapter.is_geglu_module(module):
        return adapter.geglu_exact_gelu(module, args[0])
    if adapter.is_transformer_group_norm(module):
        return adapter.transformer_group_norm_pytorch_eps(module, args[0])
    return next_fun(*args, **kwargs)


def _collect(tree, prefix=()) -> dict[str, jnp.ndarray]:
    """{layer path: probs} from the sown intermediates tree."""
    out = {}
    for key, value in tree.items():
        if key == SOW_NAME:
            out["/".join(prefix)] = value[0]
        elif isinstance(value, dict) or hasattr(value, "items"):
            out.update(_collect(value, prefix + (key,)))
    return out


def _adapted(lora):
    """The LoRA interceptor's context for `lora` = (adapters, scale); none for None. Entered first, so it
    sees the Dense layers that the other interceptors' code calls."""
    return contextlib.nullcontext() if lora is None else nn.intercept_methods(lora_lib.interceptor(*lora))


def unet_with_attention(unet, unet_params, latents_BxZxhxw, timesteps_B, cond,
                        selector: LayerSelector = ALL_LAYERS, lora=None):
    """(eps_BxZxhxw, {layer path: probs_BxAxQxT}) for the cross-attention layers the selector keeps;
    `cond`: text states B x T x D or an SDXLCondition; `lora` = (adapters, scale) adds low-rank adapters to the
    frozen UNet (model/lora.py)."""
    latent_hw = tuple(latents_BxZxhxw.shape[2:])
    context_BxTxD, added = conditioning.unet_inputs(cond)
    grids_seen: set = set()  # filled while tracing: the check below costs nothing at run time
    with _adapted(lora), nn.intercept_methods(_pytorch_faithful), \
            nn.intercept_methods(functools.partial(_interceptor, selector, latent_hw, grids_seen)):
        out, state = unet.apply(
            {"params": unet_params}, latents_BxZxhxw, timesteps_B, context_BxTxD, added, mutable=[COLLECTION]
        )
    _check_resolutions(selector, grids_seen, latent_hw)
    return out.sample, _collect(state.get(COLLECTION, {}))


def _check_resolutions(selector: LayerSelector, grids_seen: set, latent_hw) -> None:
    """A grid asked for that no cross-attention layer has would silently drop out of the maps' average."""
    missing = sorted(set(selector.resolutions or ()) - {h for h, _ in grids_seen}, reverse=True)
    if missing:
        have = ", ".join(f"{h}x{w}" for h, w in sorted(grids_seen, reverse=True)) or "none"
        raise LayerGridError(
            f"attention maps asked for at query grid{'s' * (len(missing) > 1)} "
            f"{', '.join(f'{r}x{r}' for r in missing)}, but at this size (latent {latent_hw[0]}x{latent_hw[1]}) the "
            f"model's cross-attention layers have grids {have}. Choose among those "
            "(--config.masks.resolutions, --config.tokens.attn_resolution).")


def unet_eps(unet, unet_params, latents_BxZxhxw, timesteps_B, cond, lora=None):
    """The UNet's noise prediction, no capture (`cond` as for `unet_with_attention`)."""
    context_BxTxD, added = conditioning.unet_inputs(cond)
    with _adapted(lora), nn.intercept_methods(_pytorch_faithful):
        return unet.apply({"params": unet_params}, latents_BxZxhxw, timesteps_B, context_BxTxD, added).sample


def layer_names(unet, unet_params, latents_BxZxhxw, cond, selector: LayerSelector = ALL_LAYERS):
    """{layer path: (grid_hw, heads)} of captured layers, from shapes only (no compute)."""
    t = jnp.zeros((latents_BxZxhxw.shape[0],), jnp.int32)
    _, maps = jax.eval_shape(
        functools.partial(unet_with_attention, unet, selector=selector), unet_params, latents_BxZxhxw, t, cond
    )
    hw = tuple(latents_BxZxhxw.shape[2:])
    return {k: (grid_of(v.shape[2], hw), v.shape[1]) for k, v in maps.items()}
