"""Model modules as static jit arguments and cache keys (`StaticModule`), and their params' shapes without computing
them (`param_shapes`)."""

from __future__ import annotations

import functools

import jax
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

from .clip import clip_init_fn
from .text import text_init_fn


class StaticModule:
    """A model module as a static jit argument (or cache key): equal when the modules are equal (linen modules
    compare by their fields, a transformers config by its values); hashed by type and config, because
    transformers' config objects are not hashable. Two runs of one model thus share a compiled program, though
    each run builds its own text encoder (`text_encoder_with_vocab`)."""

    def __init__(self, module):
        self.module = module
        config = getattr(module, "config", None)
        digest = config.to_json_string() if hasattr(config, "to_json_string") else module
        self._hash = hash((type(module).__qualname__, digest, str(getattr(module, "dtype", ""))))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return (isinstance(other, StaticModule) and type(other.module) is type(self.module)
                and other.module == self.module)


def param_shapes(module) -> dict:
    """Shapes and dtypes of a model module's params (a tree of ShapeDtypeStructs), without computing them: a
    UNet or VAE from its `init_weights`, a CLIP text or full CLIP module from a dummy input. Traced once per
    module configuration in a process (a UNet's init takes ~1 s to trace, and loaders, tests and notebooks
    build the same model again and again); each call returns its own containers."""
    return jax.tree.map(lambda x: x, _param_shapes(StaticModule(module)))


@functools.lru_cache(maxsize=32)
def _param_shapes(static: StaticModule) -> dict:
    module = static.module
    if hasattr(module, "init_weights"):
        init = module.init_weights
    elif isinstance(module, FlaxCLIPModule):
        init = clip_init_fn(module)
    else:
        init = text_init_fn(module)
    return jax.eval_shape(init, jax.random.key(0))
