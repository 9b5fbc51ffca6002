"""The CLIP text encoder (transformers' Flax CLIP text module, with or without the projection of SDXL's second
encoder) and its tokenizer: built from a config, loaded, grown to a larger vocabulary, run."""

from __future__ import annotations

import copy

import jax.numpy as jnp
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModelWithProjectionModule, FlaxCLIPTextModule

from .compat import check_text_config


def text_encoder_from_config(config: dict, dtype=jnp.float32, what: str = "text encoder config",
                             projection: bool = False):
    """The Flax CLIP text module of a config; `projection`: with the projection of its pooled state (SDXL's
    second encoder, PyTorch's CLIPTextModelWithProjection)."""
    check_text_config(config, what)
    cls = FlaxCLIPTextModelWithProjectionModule if projection else FlaxCLIPTextModule
    return cls(CLIPTextConfig(**config), dtype=dtype)


def has_projection(text_encoder) -> bool:
    """Whether a text module projects its pooled state (returns `text_embeds`)."""
    return isinstance(text_encoder, FlaxCLIPTextModelWithProjectionModule)


def text_encoder_outputs(text_encoder, text_params, input_ids_BxT, penultimate: bool = False):
    """(states B x T x D, pooled B x P) of a CLIP text module, all positions attended (as SD's pipelines run it).

    states: the last hidden states after the final LayerNorm (SD 1/2), or with `penultimate` the input of the
    last layer, without that LayerNorm (what SDXL's pipeline feeds its UNet: `hidden_states[-2]`). pooled: the
    end token's final state, projected for a module with a projection (its `text_embeds`)."""
    batch, length = input_ids_BxT.shape
    position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    out = text_encoder.apply({"params": text_params}, input_ids_BxT, jnp.ones_like(input_ids_BxT), position_ids,
                             deterministic=True, output_hidden_states=penultimate)
    states = out.hidden_states[-2] if penultimate else out.last_hidden_state
    pooled = out.text_embeds if has_projection(text_encoder) else out.pooler_output
    return states, pooled


def text_encoder_with_vocab(module, vocab_size: int):
    """Same text encoder, embedding table of `vocab_size` rows (linen checks param shapes)."""
    cfg = copy.deepcopy(module.config)
    cfg.vocab_size = int(vocab_size)
    return type(module)(cfg, dtype=module.dtype)


def load_flax_clip_text(folder: str, dtype=jnp.float32, projection: bool = False):
    """(module, params) from a transformers folder with `flax_model.msgpack` (`projection`: SDXL's second
    encoder, FlaxCLIPTextModelWithProjection)."""
    cls = FlaxCLIPTextModelWithProjection if projection else FlaxCLIPTextModel
    model, params = cls.from_pretrained(folder, dtype=dtype, _do_init=False)
    return model.module, params


def text_init_fn(module, length: int | None = None):
    """rng -> params of a CLIP text module (for shape trees)."""
    length = length or module.config.max_position_embeddings

    def init(rng):
        ids = jnp.zeros((1, length), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(length), ids.shape)
        return module.init(rng, ids, jnp.ones_like(ids), pos)["params"]

    return init


def tokenizer_from_files(vocab_file: str, merges_file: str, **kwargs):
    return CLIPTokenizer(vocab_file, merges_file, **kwargs)


def load_tokenizer(folder: str):
    return CLIPTokenizer.from_pretrained(folder)
