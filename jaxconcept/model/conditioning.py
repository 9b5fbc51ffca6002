"""What the UNet is conditioned on: SD 1/2's text states, or SDXL's text states, pooled embedding and time ids.

SD 1/2: the last hidden states of its one CLIP text encoder (`tokens.text_hidden_states`), a B x T x D array.
SDXL: an `SDXLCondition`, as diffusers' StableDiffusionXLPipeline builds it: both encoders' penultimate hidden
states concatenated (768 + 1280 = 2048 wide in SDXL base), the second encoder's projected pooled state
(`text_embeds`, 1280) and six time ids (original size, crop top-left, target size); `capture` hands the last
two to the UNet as its `added_cond_kwargs`. Either is a pytree, so batching, concatenating, broadcasting and
sharding treat both alike (`jax.tree.map`).

Concept tokens have a row in each encoder's table; `tokens.add_concept_tokens` keeps a vector's two rows side by
side (N x (D1 + D2)), so that the code that trains, saves and batches rows has one array for SD and SDXL.

The second tokenizer differs from the first in its padding only (checked at load, `loading.check_sdxl_parts`):
the second encoder's ids are the first's with every position after the end token set to its padding
(`second_ids`), so prompts are tokenized once, as for SD, and the ids stay one array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import adapter, tokens
from .loading import ModelBundle

NUM_TIME_IDS = 6  # SDXL base: original (h, w), crop top-left (y, x), target (h, w)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the params keys (and bundle fields) of the text encoders


class SDXLCondition(NamedTuple):
    """SDXL's UNet conditioning for a batch of prompts."""

    context_BxTxD: Any  # both encoders' penultimate states, concatenated: what cross-attention reads
    text_embeds_BxP: Any  # the second encoder's projected pooled state
    time_ids_BxK: Any  # micro-conditioning: original size, crop top-left, target size


@dataclasses.dataclass(frozen=True, eq=False)
class SDXLText:
    """SDXL's two text encoders and the ids that derive the second one's input (a static jit argument: hashed
    and compared by the modules' configs, like `adapter.StaticModule`)."""

    text_encoder: Any
    text_encoder_2: Any
    end_id: int  # the tokenizers' end token
    pad_id_2: int  # the second tokenizer's padding ("!" in SDXL)

    def _key(self):
        return (adapter.StaticModule(self.text_encoder), adapter.StaticModule(self.text_encoder_2), self.end_id,
                self.pad_id_2)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other) -> bool:
        return isinstance(other, SDXLText) and self._key() == other._key()


def text_model(bundle: ModelBundle):
    """What `encode` takes as `text`: the text encoder module (SD 1/2) or an `SDXLText`."""
    if not bundle.is_sdxl:
        return bundle.text_encoder
    return SDXLText(bundle.text_encoder, bundle.text_encoder_2, int(bundle.tokenizer.eos_token_id),
                    int(bundle.tokenizer_2.pad_token_id))


def text_params(params: dict) -> dict:
    """The text encoders' entries of a params dict (what `encode` reads): SD 1/2's one, SDXL's two."""
    return {k: params[k] for k in TEXT_ENCODERS if k in params}


def time_ids(original_hw, crop_top_left=(0, 0), target_hw=None) -> np.ndarray:
    """SDXL's micro-conditioning (6,), as the pipeline's `_get_add_time_ids`: original size, crop top-left,
    target size, each (height, width) / (y, x) in pixels; the target defaults to the original (the pipeline's
    defaults for an image generated at its size)."""
    target_hw = original_hw if target_hw is None else target_hw
    return np.asarray(tuple(original_hw) + tuple(crop_top_left) + tuple(target_hw), np.float32)


def image_time_ids(bundle: ModelBundle, image_hw=None):
    """The time ids of an uncropped image of `image_hw` pixels (default: the model's resolution) generated or
    learned at its size; None for SD 1/2, which has none."""
    if not bundle.is_sdxl:
        return None
    return time_ids(tuple(image_hw) if image_hw is not None else (bundle.resolution, bundle.resolution))


def second_ids(ids_BxT, end_id: int, pad_id: int):
    """The second tokenizer's ids from the first's: every position after the first end token is padding."""
    is_end = ids_BxT == end_id
    after_end = (jnp.cumsum(is_end, axis=1) - is_end) > 0
    return jnp.where(after_end, pad_id, ids_BxT).astype(ids_BxT.dtype)


def split_rows(rows_NxE, width_1: int):
    """A vector's rows in the first and the second table."""
    return rows_NxE[:, :width_1], rows_NxE[:, width_1:]


def sdxl_text_states(text: SDXLText, params: dict, ids_BxT, concept_ids_N=None, rows_NxE=None):
    """(context B x T x (D1 + D2), text_embeds B x P): both encoders' penultimate states concatenated and the
    second's projected pooled state, with the concept rows spliced into both tables."""
    params_1, params_2 = params["text_encoder"], params["text_encoder_2"]
    if rows_NxE is not None:
        rows_1, rows_2 = split_rows(rows_NxE, tokens.embedding_table(params_1).shape[1])
        params_1 = tokens.with_rows(params_1, concept_ids_N, rows_1)
        params_2 = tokens.with_rows(params_2, concept_ids_N, rows_2)
    states_1, _ = adapter.text_encoder_outputs(text.text_encoder, params_1, ids_BxT, penultimate=True)
    ids_2 = second_ids(ids_BxT, text.end_id, text.pad_id_2)
    states_2, pooled = adapter.text_encoder_outputs(text.text_encoder_2, params_2, ids_2, penultimate=True)
    return jnp.concatenate([states_1, states_2.astype(states_1.dtype)], axis=-1), pooled


def encode(text, params: dict, ids_BxT, concept_ids_N=None, rows_NxD=None, time_ids_K=None):
    """The UNet's condition for tokenized prompts (first tokenizer's ids), concept rows spliced in.

    text: `text_model(bundle)`; params: a dict with the text encoders' params (e.g. `bundle.params`). SD 1/2: the
    text states (array); SDXL: an `SDXLCondition`, the time ids (K,) the same for every prompt."""
    if not isinstance(text, SDXLText):
        return tokens.text_hidden_states(text, params["text_encoder"], ids_BxT, concept_ids_N, rows_NxD)
    if time_ids_K is None:
        raise ValueError("SDXL's condition needs its time ids (conditioning.time_ids)")
    context, pooled = sdxl_text_states(text, params, ids_BxT, concept_ids_N, rows_NxD)
    batch = ids_BxT.shape[0]
    ids = jnp.broadcast_to(jnp.asarray(time_ids_K, context.dtype), (batch, NUM_TIME_IDS))
    return SDXLCondition(context, pooled, ids)


def without_text(cond: SDXLCondition) -> SDXLCondition:
    """The condition with zero text states and pooled embedding, its time ids kept: SDXL base's unconditional
    branch when no negative prompt is given (its pipelines' `force_zeros_for_empty_prompt`)."""
    return cond._replace(context_BxTxD=jnp.zeros_like(cond.context_BxTxD),
                         text_embeds_BxP=jnp.zeros_like(cond.text_embeds_BxP))


def unet_inputs(cond):
    """(context B x T x D, added_cond_kwargs or None): how diffusers' UNet takes a condition."""
    if isinstance(cond, SDXLCondition):
        return cond.context_BxTxD, {"text_embeds": cond.text_embeds_BxP, "time_ids": cond.time_ids_BxK}
    return cond, None


def batch_of(cond, index):
    """Rows `index` (a slice or index array) of every part of a condition."""
    return jax.tree.map(lambda x: x[index], cond)


def concatenate(conds):
    """Conditions joined along the batch."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *conds)


def broadcast(cond, batch: int):
    """A one-prompt condition repeated for a batch."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), cond)
