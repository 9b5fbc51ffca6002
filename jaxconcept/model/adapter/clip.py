"""The full CLIP model (vision + text towers with their projections) that `jaxconcept.eval.metrics` scores
generated images with. Only this module knows transformers' CLIP class and attribute names."""

from __future__ import annotations

import jax.numpy as jnp
from transformers import CLIPConfig, FlaxCLIPModel
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

from .compat import public_config


def clip_from_config(config: dict, dtype=jnp.float32):
    """Full CLIP as a plain Flax module, from a `config.json`-style dict (text_config / vision_config)."""
    return FlaxCLIPModule(CLIPConfig.from_dict(public_config(config)), dtype=dtype)


def load_flax_clip(folder: str, dtype=jnp.float32):
    """(module, params) from a transformers CLIP folder with `flax_model.msgpack`."""
    model, params = FlaxCLIPModel.from_pretrained(folder, dtype=dtype, _do_init=False)
    return model.module, params


def clip_init_fn(module):
    """rng -> params of a full CLIP module (for shape trees; one token, one image is enough)."""
    size = module.config.vision_config.image_size

    def init(rng):
        ids = jnp.zeros((1, 1), jnp.int32)
        pixels = jnp.zeros((1, size, size, 3), jnp.float32)
        return module.init(rng, ids, pixels, jnp.ones_like(ids), jnp.zeros_like(ids))["params"]

    return init


def clip_image_features(module, params, pixels_BxSxSx3):
    """Projected image features (not normalised) of already-normalised NHWC pixels."""

    def features(m, pixels):
        pooled = m.vision_model(pixel_values=pixels, deterministic=True)[1]
        return m.visual_projection(pooled)

    return module.apply({"params": params}, pixels_BxSxSx3, method=features)


def clip_text_features(module, params, ids_BxT, mask_BxT):
    """Projected text features (not normalised): the end-token state of the text tower, projected."""
    position_ids = jnp.broadcast_to(jnp.arange(ids_BxT.shape[1], dtype=jnp.int32), ids_BxT.shape)

    def features(m, ids, mask, pos):
        pooled = m.text_model(input_ids=ids, attention_mask=mask, position_ids=pos, deterministic=True)[1]
        return m.text_projection(pooled)

    return module.apply({"params": params}, ids_BxT, mask_BxT, position_ids, method=features)


def clip_vision_layer_states(module, params, pixels_BxSxSx3) -> tuple:
    """Output of every transformer layer of the vision tower: a tuple of B x (1 + patches) x C arrays
    (token 0 is the class token). The embedding input (hidden_states[0]) is left out."""

    def states(m, pixels):
        out = m.vision_model(pixel_values=pixels, deterministic=True, output_hidden_states=True, return_dict=True)
        return tuple(out.hidden_states[1:])

    return module.apply({"params": params}, pixels_BxSxSx3, method=states)
