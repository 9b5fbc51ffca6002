"""Image metrics of batch evaluation, computed with a Flax CLIP model the user names.

Table 1 of the paper (COCO concepts; 20 prompts x 8 images per concept) has three columns:

* **CLIP-I** (0.9062 ours vs 0.8987 baseline): how much the generated concept looks like the learned one.
  `clip_image_similarity(image_embeddings(clip, generated), image_embeddings(clip, references))` = mean
  cosine over all (generated, reference) pairs of CLIP image embeddings, as DreamBooth defines CLIP-I.
  The paper crops generated objects with a detector first; cropping is the caller's job.
* **cosine** (0.8342 vs 0.8245), a CLIP-T-style prompt fidelity:
  `clip_text_similarity(image_embeddings(clip, generated), text_embeddings(clip, prompts))` = mean cosine
  of each image with its own prompt (with the concept tokens replaced by words CLIP knows, by the caller).
* **LPIPS diversity** (0.40 vs 0.3972): `diversity(clip, images_of_one_prompt)` = mean pairwise
  perceptual distance among the images of one prompt, averaged over prompts by the caller. The distance
  is *LPIPS-style*, not LPIPS: features are CLIP vision-tower layers instead of VGG/AlexNet, and there
  are no learned per-channel weights (see `perceptual_distance`). Absolute values therefore differ from
  the paper's; compare methods with one CLIP model, not numbers across models.

`concept_presence` is no column of the table: it tells, per image, whether each concept of a
multi-concept prompt is visible at all (the failure mode of composing several concepts).

Sources for `load_clip`: "tiny-clip" (seeded random weights, for tests), a local transformers CLIP folder
(`config.json` + `flax_model.msgpack` or PyTorch `model.safetensors`, read without torch), or a hub id
such as "openai/clip-vit-large-patch14" (downloaded, or taken from the local cache).

All array functions are pure; those taking a `ClipBundle` run one `jax.jit` per bundle and function,
compiled once per input shape (the closures live in the bundle, the params are an argument).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..model import adapter, convert, loading as model
from ..errors import ModelSourceError

log = logging.getLogger(__name__)

# CLIPImageProcessor's defaults (OpenAI's training statistics), used when a folder has no preprocessor config
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LPIPS' normalize_tensor epsilon: keeps an all-zero feature vector at zero instead of NaN
_UNIT_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class ClipView:
    """What a CLIP program is specialised on (hashable: a static jit argument): the module and preprocessing."""

    module: adapter.StaticModule
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pixels(self, images_BxHxWx3_u8):
        return preprocess(images_BxHxWx3_u8, self.size, self.mean, self.std)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipBundle:
    """A CLIP model (module static, params a pytree) and its preprocessing settings.

    eq=False: hashed and compared by identity (params are unhashable pytrees). Its programs are jitted with
    the hashable `view()` as a static argument, as every compiled function of the package is: bundles of one
    model and preprocessing share them.
    """

    module: Any  # flax.linen.Module: transformers' FlaxCLIPModule
    params: dict
    tokenizer: Any  # CLIPTokenizer
    image_size: int  # the vision tower's input size (square)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_length: int  # tokens per text, start and end tokens included
    dtype: Any = jnp.float32
    source: str = ""

    def view(self) -> "ClipView":
        return ClipView(adapter.StaticModule(self.module), self.image_size, tuple(self.image_mean),
                        tuple(self.image_std))

    @property
    def logit_scale(self) -> float:
        """CLIP's learned softmax temperature (exp of the stored log; 100 for OpenAI's models)."""
        return float(np.exp(np.asarray(self.params["logit_scale"], np.float32)))

    @property
    def projection_dim(self) -> int:
        return int(self.module.config.projection_dim)


# ------------------------------------------------------------------------------------------ loading


def load_clip(source: str, dtype="float32", *, revision: str | None = None, seed: int = 0) -> ClipBundle:
    """A CLIP bundle from "tiny-clip", a local transformers folder, or a hub id (see module docstring)."""
    dtype = model.as_dtype(dtype)
    if source in NAMED_CLIPS:
        return NAMED_CLIPS[source](dtype=dtype, seed=seed)
    if os.path.exists(source):
        return load_clip_folder(source, dtype)
    if source.startswith((".", "/", "~")) or source.endswith("/") or source.count("/") > 1:
        raise ModelSourceError(f"CLIP model folder {source!r} does not exist")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
        return load_clip_folder(download_clip(source, revision=revision), dtype, source=source)
    raise ModelSourceError(
        f"CLIP source {source!r} is neither a named model ({', '.join(NAMED_CLIPS)}), an existing folder, "
        "nor a hub id of the form 'owner/name' (e.g. 'openai/clip-vit-large-patch14')."
    )


_HUB_CONFIGS = [
    "config.json", "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.json",
]
_HUB_FLAX = ["flax_model.msgpack"]
_HUB_TORCH = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def _hub_patterns(files: list[str] | None) -> list[str]:
    if files is not None and "flax_model.msgpack" in files:
        return _HUB_CONFIGS + _HUB_FLAX  # a repo with Flax weights: take only those
    if files is not None:
        return _HUB_CONFIGS + _HUB_TORCH
    return _HUB_CONFIGS + _HUB_FLAX + _HUB_TORCH  # unknown listing (offline): the cache decides


def download_clip(repo_id: str, revision: str | None = None) -> str:
    """Local folder with the files `load_clip_folder` needs, from the hub or the local cache."""
    return model.hub_snapshot(repo_id, _hub_patterns, revision=revision, what="CLIP model",
                              local_hint="pass a local folder holding a transformers CLIP model (config.json, "
                                         "tokenizer files and flax_model.msgpack or model.safetensors).")


def load_clip_folder(folder: str, dtype=jnp.float32, *, source: str | None = None) -> ClipBundle:
    """A transformers CLIP folder as `save_pretrained` writes it (+ tokenizer, optional preprocessor)."""
    if not os.path.isdir(folder):
        raise ModelSourceError(f"CLIP model folder {folder!r} is not a directory")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelSourceError(f"{folder!r} has no config.json: expected a transformers CLIP model folder")
    config = model.read_json(cfg_path)
    if "vision_config" not in config or "text_config" not in config:
        raise ModelSourceError(
            f"{folder!r} holds a {config.get('model_type', 'non-CLIP')!r} model; the metrics need a full CLIP "
            "model with both towers (config.json with text_config and vision_config), e.g. "
            "'openai/clip-vit-large-patch14'."
        )
    module, params = _load_clip_weights(folder, config, dtype)
    try:
        tokenizer = adapter.load_tokenizer(folder)
    except (OSError, ValueError, TypeError) as e:
        raise ModelSourceError(f"cannot load the CLIP tokenizer of {folder!r} (vocab.json, merges.txt): {e}") from e
    pre_path = os.path.join(folder, "preprocessor_config.json")
    pre = model.read_json(pre_path) if os.path.isfile(pre_path) else {}
    return ClipBundle(
        module=module, params=model.cast_floating(params, dtype), tokenizer=tokenizer,
        image_size=int(module.config.vision_config.image_size),
        image_mean=tuple(float(v) for v in pre.get("image_mean", OPENAI_CLIP_MEAN)),
        image_std=tuple(float(v) for v in pre.get("image_std", OPENAI_CLIP_STD)),
        max_length=int(module.config.text_config.max_position_embeddings), dtype=dtype, source=source or folder,
    )


def _load_clip_weights(folder: str, config: dict, dtype):
    if os.path.isfile(os.path.join(folder, "flax_model.msgpack")):
        try:
            return adapter.load_flax_clip(folder, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelSourceError(f"cannot load the Flax weights of {folder!r}: {e}") from e
    names = os.listdir(folder)
    if not any(f.endswith((".safetensors", ".safetensors.index.json")) for f in names):
        only_bin = any(f.endswith(".bin") for f in names)
        raise ModelSourceError(
            f"{folder!r} has no CLIP weights (flax_model.msgpack or model.safetensors)"
            + (": only PyTorch .bin files, which need torch; re-save them as safetensors." if only_bin else ".")
        )
    module = adapter.clip_from_config(config, dtype=dtype)
    shapes = adapter.param_shapes(module)
    state = convert.read_safetensors(folder, "model")
    return module, convert.pt_state_to_flax(state, shapes, what=folder, dtype=dtype, rename=adapter.pt_to_flax_clip_key)


# ---- tiny-clip

TINY_CLIP_VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
TINY_CLIP_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, max_position_embeddings=77,
)
TINY_CLIP_PROJECTION = 16
CLIP_LOGIT_SCALE_INIT = float(np.log(1 / 0.07))  # CLIP's initial temperature (logit_scale_init_value)


def tiny_clip_config(tokenizer) -> dict:
    """The tiny CLIP's config dict; the text vocabulary is `tokenizer`'s (the tiny SD's word list)."""
    text = dict(
        TINY_CLIP_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return dict(text_config=text, vision_config=dict(TINY_CLIP_VISION), projection_dim=TINY_CLIP_PROJECTION)


def tiny_clip(dtype=jnp.float32, seed: int = 0) -> ClipBundle:
    """A tiny CLIP (32 px images, 16-d embeddings) with seeded random weights: every code path, no download."""
    tokenizer = model.word_tokenizer()
    module = adapter.clip_from_config(tiny_clip_config(tokenizer), dtype=dtype)
    params = model.random_params(adapter.param_shapes(module), seed)
    # random_params draws a scalar "kernel" for the temperature; use CLIP's own initial value instead
    params["logit_scale"] = jnp.asarray(CLIP_LOGIT_SCALE_INIT, jnp.float32)
    return ClipBundle(
        module=module, params=model.cast_floating(params, dtype), tokenizer=tokenizer,
        image_size=TINY_CLIP_VISION["image_size"], image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        max_length=TINY_CLIP_TEXT["max_position_embeddings"], dtype=dtype, source="tiny-clip",
    )


NAMED_CLIPS = {"tiny-clip": tiny_clip}


# ------------------------------------------------------------------------------------------ preprocessing


def center_square(images_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    """The central square crop (CLIP's processor resizes the short side, then centre-crops)."""
    _, h, w, _ = images_BxHxWxC.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images_BxHxWxC[:, top:top + side, left:left + side, :]


def preprocess(
    images_BxHxWx3_u8: jnp.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> jnp.ndarray:
    """uint8 RGB images -> CLIP's normalised B x S x S x 3 float32 input.

    Centre square crop, bicubic resize (antialiased when shrinking, as PIL does) in [0, 1] float, clipped
    back to [0, 1] (PIL's uint8 output clips the bicubic overshoot; it also rounds to uint8, we don't),
    then (x - mean) / std per channel.
    """
    x = center_square(images_BxHxWx3_u8.astype(jnp.float32) / 255.0)
    if x.shape[1] != image_size:
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), method="bicubic", antialias=True)
        x = jnp.clip(x, 0.0, 1.0)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _check_images(images) -> jnp.ndarray:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be B x H x W x 3 (RGB); got shape {tuple(images.shape)}")
    if images.dtype != jnp.uint8:
        # floats are ambiguous ([0, 1]? [-1, 1]? [0, 255]?): a silent mix-up would shift every metric
        raise TypeError(
            f"images must be uint8 in [0, 255]; got {images.dtype}. Convert jaxconcept's [-1, 1] floats with "
            "jaxconcept.runio.images.to_uint8."
        )
    return images


# ------------------------------------------------------------------------------------------ embeddings


def unit(x_BxP: jnp.ndarray, eps: float = 0.0) -> jnp.ndarray:
    """Rows scaled to unit L2 norm (in float32 whatever the model's dtype)."""
    x = x_BxP.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def embed_pixels(module, params, pixels_BxSxSx3: jnp.ndarray) -> jnp.ndarray:
    """Unit image embeddings B x P of already-normalised pixels (pure; the vision tower + projection)."""
    return unit(adapter.clip_image_features(module, params, pixels_BxSxSx3.astype(module.dtype)))


def embed_tokens(module, params, ids_BxT: jnp.ndarray, mask_BxT: jnp.ndarray) -> jnp.ndarray:
    """Unit text embeddings B x P of token ids (pure; the text tower + projection)."""
    return unit(adapter.clip_text_features(module, params, ids_BxT, mask_BxT))


@functools.partial(jax.jit, static_argnums=0)
def _pixel_embeddings(view: ClipView, params, pixels_BxSxSx3):
    return embed_pixels(view.module.module, params, pixels_BxSxSx3)


@functools.partial(jax.jit, static_argnums=0)
def _image_embeddings(view: ClipView, params, images_BxHxWx3_u8):
    return embed_pixels(view.module.module, params, view.pixels(images_BxHxWx3_u8))


def pixel_embeddings(clip: ClipBundle, pixels_BxSxSx3) -> jnp.ndarray:
    """`embed_pixels`, jitted: for inputs already preprocessed elsewhere."""
    return _pixel_embeddings(clip.view(), clip.params, jnp.asarray(pixels_BxSxSx3, jnp.float32))


def image_embeddings(clip: ClipBundle, images_BxHxWx3_u8) -> jnp.ndarray:
    """Unit CLIP image embeddings B x P of uint8 RGB images of any size (see `preprocess`)."""
    return _image_embeddings(clip.view(), clip.params, _check_images(images_BxHxWx3_u8))


def tokenize(clip: ClipBundle, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), both B x max_length int32; longer texts are cut at max_length as CLIP's own
    evaluation does (the end token stays: the tokenizer truncates before adding it)."""
    if isinstance(texts, str):
        texts = [texts]  # a lone string would otherwise be read as a list of characters
    enc = clip.tokenizer(list(texts), padding="max_length", max_length=clip.max_length, truncation=True)
    return np.asarray(enc.input_ids, np.int32), np.asarray(enc.attention_mask, np.int32)


def text_embeddings(clip: ClipBundle, texts: Sequence[str]) -> jnp.ndarray:
    """Unit CLIP text embeddings B x P (padded to max_length, so one compile per batch size)."""
    ids_BxT, mask_BxT = tokenize(clip, texts)
    return _text_embeddings(clip.view(), clip.params, ids_BxT, mask_BxT)


@functools.partial(jax.jit, static_argnums=0)
def _text_embeddings(view: ClipView, params, ids_BxT, mask_BxT):
    return embed_tokens(view.module.module, params, ids_BxT, mask_BxT)


# ------------------------------------------------------------------------------------------ similarities


def cosine_matrix(a_NxP: jnp.ndarray, b_MxP: jnp.ndarray) -> jnp.ndarray:
    """N x M cosines (rows normalised here, so raw features work too)."""
    return unit(a_NxP, 1e-12) @ unit(b_MxP, 1e-12).T


def clip_image_similarity(gen_emb_NxP: jnp.ndarray, ref_emb_MxP: jnp.ndarray) -> jnp.ndarray:
    """CLIP-I: mean cosine over all (generated, reference) pairs."""
    return jnp.mean(cosine_matrix(gen_emb_NxP, ref_emb_MxP))


def clip_text_similarity(img_emb_BxP: jnp.ndarray, txt_emb_BxP: jnp.ndarray) -> jnp.ndarray:
    """CLIP-T-style cosine: mean over i of cos(image i, text i) (paired, not all pairs)."""
    if img_emb_BxP.shape != txt_emb_BxP.shape:
        raise ValueError(
            f"clip_text_similarity pairs image i with text i: got {img_emb_BxP.shape[0]} images and "
            f"{txt_emb_BxP.shape[0]} texts (embeddings {img_emb_BxP.shape} vs {txt_emb_BxP.shape})"
        )
    return jnp.mean(jnp.sum(unit(img_emb_BxP, 1e-12) * unit(txt_emb_BxP, 1e-12), axis=-1))


# ------------------------------------------------------------------------------------------ diversity


def perceptual_features_from_pixels(module, params, pixels_BxSxSx3: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """Per transformer layer, the patch tokens (class token dropped) unit-normalised over channels."""
    states = adapter.clip_vision_layer_states(module, params, pixels_BxSxSx3.astype(module.dtype))
    return tuple(unit(h_BxTxC[:, 1:, :], _UNIT_EPS) for h_BxTxC in states)


def perceptual_features(clip: ClipBundle, images_BxHxWx3_u8) -> tuple[jnp.ndarray, ...]:
    """LPIPS-style features of uint8 images: one B x patches x C array per vision-tower layer."""
    return _perceptual_features(clip.view(), clip.params, _check_images(images_BxHxWx3_u8))


@functools.partial(jax.jit, static_argnums=0)
def _perceptual_features(view: ClipView, params, images_BxHxWx3_u8):
    return perceptual_features_from_pixels(view.module.module, params, view.pixels(images_BxHxWx3_u8))


def perceptual_distance(feats_a: Sequence[jnp.ndarray], feats_b: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """LPIPS-style distance per image pair (B): mean over layers of the spatially averaged squared
    difference of the unit-normalised features, summed over channels.

    Not LPIPS: LPIPS weighs each channel's squared difference with learned linear weights (trained on
    human judgements) and sums the layers; here every channel weighs 1 and the layers are averaged.
    Unit features make each layer's term lie in [0, 4], so the distance does too.
    """
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError(
            f"need the same, non-zero number of layers on both sides; got {len(feats_a)} and {len(feats_b)}"
        )
    per_layer = [jnp.mean(jnp.sum((a - b) ** 2, axis=-1), axis=-1) for a, b in zip(feats_a, feats_b)]
    return jnp.mean(jnp.stack(per_layer), axis=0)


def pairwise_mean_distance(feats: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Mean `perceptual_distance` over the K(K-1)/2 unordered pairs of the K images in `feats`."""
    k = feats[0].shape[0]
    i_idx, j_idx = np.triu_indices(k, 1)  # static: the image count is part of the shape
    return jnp.mean(perceptual_distance([f[i_idx] for f in feats], [f[j_idx] for f in feats]))


def diversity(clip: ClipBundle, images_KxHxWx3_u8) -> jnp.ndarray:
    """LPIPS-style diversity of the K >= 2 images generated for one prompt: mean pairwise distance."""
    images = _check_images(images_KxHxWx3_u8)
    if images.shape[0] < 2:
        raise ValueError(
            f"diversity needs at least 2 images of one prompt (it averages over pairs); got {images.shape[0]}"
        )
    return _diversity(clip.view(), clip.params, images)


@functools.partial(jax.jit, static_argnums=0)
def _diversity(view: ClipView, params, images_KxHxWx3_u8):
    return pairwise_mean_distance(perceptual_features_from_pixels(view.module.module, params,
                                                                  view.pixels(images_KxHxWx3_u8)))


# ------------------------------------------------------------------------------------------ concept presence


NEUTRAL_TEXTS = ("a photo",)


def presence_scores(
    img_emb_BxP: jnp.ndarray, concept_emb_CxP: jnp.ndarray, neutral_emb_NxP: jnp.ndarray, logit_scale: float
) -> jnp.ndarray:
    """B x C scores: for each image and concept, the concept's probability in a softmax over
    [that concept phrase] + the neutral phrases, with CLIP's logits (logit_scale x cosine).

    Each concept competes with the neutral phrases only, never with the other concepts: a multi-concept
    image should score high for all of its concepts at once.
    """
    concept_BxC = logit_scale * cosine_matrix(img_emb_BxP, concept_emb_CxP)
    neutral_B = jax.scipy.special.logsumexp(logit_scale * cosine_matrix(img_emb_BxP, neutral_emb_NxP), axis=-1)
    # softmax prob of the concept among [concept, neutrals] = sigmoid(logit_c - logsumexp(neutral logits))
    return jax.nn.sigmoid(concept_BxC - neutral_B[:, None])


def concept_presence(
    clip: ClipBundle, img_emb_BxP: jnp.ndarray, concept_texts: Sequence[str],
    neutral_texts: Sequence[str] = NEUTRAL_TEXTS,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(score B x C, present B x C bool) for each image and concept phrase ("a photo of a dog").

    Decision rule: a concept is present when its score exceeds 0.5, i.e. when the concept phrase wins
    the softmax against the neutral phrases (`presence_scores`). With the single default neutral phrase
    "a photo" this is exactly cos(image, concept phrase) > cos(image, "a photo"); with several neutral
    phrases the concept must beat their combined (log-sum-exp) logit.
    """
    if not concept_texts or not neutral_texts:
        raise ValueError("concept_presence needs at least one concept phrase and one neutral phrase")
    concept_CxP = text_embeddings(clip, list(concept_texts))
    neutral_NxP = text_embeddings(clip, list(neutral_texts))
    score_BxC = presence_scores(jnp.asarray(img_emb_BxP), concept_CxP, neutral_NxP, clip.logit_scale)
    return score_BxC, score_BxC > 0.5
