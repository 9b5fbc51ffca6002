"""Set-up of a learning run: inputs checked before the model loads, then the model with the concept tokens,
the cached latents and the prompt table (what `learner.learn` and `jobs.learn_many` start from).

Config values are checked in `settings.py`; this module checks only what needs the files or the model:
that the images and masks exist (before a possibly long download), the resolution's multiple, the
CRF size against the image size, and that mode "user" has a mask for every concept.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from ..model import adapter, conditioning, tokens
from ..runio import images, inputs
from . import data, steps
from ..errors import JaxconceptError
from ..model.loading import ModelBundle, load_model
from .. import settings
from ..settings import Settings

PRIOR_EXTENSIONS, prior_files = inputs.PRIOR_EXTENSIONS, inputs.prior_files  # the class images (runio/inputs.py)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything fixed for the run: model with the concept tokens, inputs, and device-resident data."""

    bundle: ModelBundle
    concepts: tokens.Concepts
    inputs: inputs.Inputs
    images_u8: np.ndarray  # N x H x W x 3
    run_data: dict  # device arrays read by the step: prompt table, latents (+ prior)
    image_ids_IxT: np.ndarray
    image_positions_IxC: np.ndarray
    latent_hw: tuple[int, int]
    zoom_windows: np.ndarray | None = None  # V x 3 (`data.zoom_windows`) when the run trains on zoomed views


def check_inputs(specs) -> tuple:
    """The specs validated, their image and mask files present, and no more concepts per image than the prompt
    table can take (no model needed)."""
    specs = inputs.validate(specs)
    for spec in specs:
        for path in [spec.path] + [c.mask for c in spec.concepts if c.mask]:
            what = "mask" if path != spec.path else "image"
            if os.path.isdir(path):
                raise inputs.InputError(f"{what} {path!r} is a folder, not an image file: give the {what} file itself "
                                        f"(e.g. {os.path.join(path, 'image.png')!r}).")
            if not os.path.isfile(path):
                raise inputs.InputError(f"{what} {path!r} does not exist")
        data.check_concepts_per_image(len(spec.concepts), f"image {spec.path!r}")
    return specs


def crf_where(s: Settings, image_hw, latent_hw) -> tuple[str, tuple[int, int] | None]:
    """(backend, size) of the E-step's CRF: `masks.crf_size` resolved against the image and latent grids."""
    backend, size = s.masks.crf_backend, s.masks.crf_size
    if size == "image":
        return backend, None
    if size == "latent":
        return backend, tuple(int(v) for v in latent_hw)
    if size > max(image_hw):
        raise JaxconceptError(f"masks.crf_size must be 'image', 'latent' or a number of pixels per side up to the "
                              f"image size {max(image_hw)}, got {size!r}.")
    scale = size / max(image_hw)
    return backend, (max(1, round(image_hw[0] * scale)), max(1, round(image_hw[1] * scale)))


def image_size(s: Settings, bundle: ModelBundle) -> int:
    """The side images are resized to (checked against the model's downsampling)."""
    size = s.resolution or bundle.resolution
    multiple = bundle.vae_factor * 2 ** (len(bundle.unet.config.block_out_channels) - 1)
    if size % multiple:
        raise JaxconceptError(f"resolution {size} must be a multiple of {multiple} for this model (VAE and UNet "
                              f"downsampling); the model's own is {bundle.resolution}.")
    return size


def prepare(s: Settings, specs, bundle: ModelBundle | None = None) -> Setup:
    """Load the model and inputs, add the concept tokens, cache latents and the prompt table (`s`: Settings,
    or a config, checked)."""
    s = settings.resolve(s)
    specs = check_inputs(specs)  # before a possibly long model download
    if s.resolution:  # too-small images refused before a possibly long model download
        inputs.check_sizes(specs, s.resolution, s.resize)
    bundle = bundle or load_model(s.model, s.dtype, seed=s.seed)
    if s.memory_efficient_attention:
        bundle = bundle.replace(unet=adapter.with_memory_efficient_attention(bundle.unet))
    size = image_size(s, bundle)
    crf_where(s, (size, size), (size // bundle.vae_factor,) * 2)  # a bad CRF size fails before any work
    loaded = inputs.load(specs, size, s.resize)  # crop | pad
    if s.mode == "user" and not loaded.has_all_user_masks:
        missing = [c.token for c, m in zip(loaded.concepts, loaded.user_masks) if m is None]
        raise JaxconceptError(f"mode 'user' needs a mask file for every concept; none for {', '.join(missing)}. "
                              "Give them (TOKEN@mask.png), or use mode 'em'.")
    toks = [c.token for c in loaded.concepts]
    bundle, concepts = tokens.add_concept_tokens(bundle, toks, [c.init_word for c in loaded.concepts], seed=s.seed,
                                                 vectors=s.tokens.vectors)
    owner_C = np.asarray(loaded.owner_C)
    # a concept's attention is its first vector's: the positions are of the first vectors
    table = data.prompt_table(bundle.tokenizer, toks, owner_C, concepts.first_ids, bundle.max_length, s.template,
                              s.joiner)
    ids_IxT, pos_IxC = data.image_prompts(bundle.tokenizer, toks, owner_C, concepts.first_ids, bundle.max_length,
                                          s.template, s.joiner)
    latents = data.encode_with_flips(bundle.vae, bundle.params["vae"], loaded.images_IxHxWx3, bundle.latent_scale)
    run_data = {"table": data.table_arrays(table), "latents": jnp.asarray(latents)}
    windows = None
    if s.zoom_views:
        windows = data.zoom_windows(s.zoom_views, s.zoom_min, s.seed)
        run_data["view_latents"] = jnp.asarray(view_latents(bundle, loaded.images_IxHxWx3, latents, windows))
    background_C = [c.kind == "background" for c in loaded.concepts]
    if not s.joint.background_prompts:  # the joint stage draws only prompts without a background concept
        run_data["joint_logw_P"] = jnp.asarray(data.logw_without(table, background_C))
    if s.background_swap:
        run_data.update(background_data(s, bundle, loaded.images_IxHxWx3.shape[1:3], background_C))
    if s.prior.folder:
        run_data.update(prior_data(s, bundle))
    if s.tokens.attn_all_vectors:
        run_data["attn_vector_ids_CxV"] = jnp.asarray(concepts.ids_CxV)
    if s.tokens.outside_weight > 0:  # the outside loss's reference: the prediction with the words' rows
        run_data["start_rows"] = jnp.asarray(concepts.init_rows, bundle.dtype)
    if s.tokens.context_weight > 0:
        run_data.update(context_data(s, bundle, concepts, toks, owner_C, background_C, latents.shape[-2:]))
    return Setup(bundle, concepts, loaded, images.to_uint8(loaded.images_IxHxWx3), run_data, ids_IxT, pos_IxC,
                 tuple(latents.shape[-2:]), windows)


def view_latents(bundle: ModelBundle, images_IxHxWx3, latents_Ix2xZxhxw, windows) -> np.ndarray:
    """I x V x 2 x Z x h x w: the images' latents (view 0, already encoded) and their zoomed views' (`windows`
    past the first), each with its flip."""
    zoomed = data.zoomed_views(images_IxHxWx3, windows[1:])
    i, v = zoomed.shape[:2]
    lat = data.encode_with_flips(bundle.vae, bundle.params["vae"], zoomed.reshape((i * v,) + zoomed.shape[2:]),
                                 bundle.latent_scale)
    return np.concatenate([np.asarray(latents_Ix2xZxhxw)[:, None], lat.reshape((i, v) + lat.shape[1:])], axis=1)


BACKGROUND_BANK = 8  # plain backgrounds (16 latents with their flips) for `background_swap`


def background_data(s: Settings, bundle: ModelBundle, image_hw, background_C) -> dict:
    """The latents of a bank of plain backgrounds of the images' size, and which concepts are backgrounds
    (data.swap_background)."""
    pics = data.background_bank(BACKGROUND_BANK, image_hw, s.seed)
    lat = data.encode_with_flips(bundle.vae, bundle.params["vae"], pics, bundle.latent_scale)
    return {"backgrounds": jnp.asarray(lat.reshape((-1,) + lat.shape[2:])), "background_C": jnp.asarray(background_C)}


def prior_data(s: Settings, bundle: ModelBundle) -> dict:
    """Latents of the class images (prior preservation) and their prompt's ids."""
    pics = np.stack([images.load_image(path, bundle.resolution) for path in prior_files(s.prior.folder)])
    lat = data.encode_with_flips(bundle.vae, bundle.params["vae"], pics, bundle.latent_scale)
    ids = tokens.tokenize(bundle.tokenizer, [s.prior.prompt], bundle.max_length)[0]
    time_ids = conditioning.image_time_ids(bundle, pics.shape[1:3])
    context = conditioning.encode(conditioning.text_model(bundle), bundle.params, jnp.asarray(ids[None]),
                                  time_ids_K=time_ids)
    return {"prior_latents": jnp.asarray(lat.reshape((-1,) + lat.shape[2:])), "prior_ids": jnp.asarray(ids),
            "prior_context": conditioning.batch_of(context, 0)}


def context_data(s: Settings, bundle: ModelBundle, concepts, toks, owner_C, background_C, latent_hw) -> dict:
    """The context regulariser's prompts (data.context_prompts), the text states the starting rows give them (its
    target: fixed, as the text encoder is in the stages that read it) and the positions it reads: every one but
    the concepts' own vectors. Empty when there is nothing to regularise (no phrase, no object concept)."""
    phrases = [p.strip() for p in s.tokens.context_phrases.split("|") if p.strip()]
    texts = data.context_prompts(toks, owner_C, [not b for b in background_C], phrases, s.template, s.joiner)
    if not texts:
        return {}
    ids_KxT = tokens.tokenize(bundle.tokenizer, texts, bundle.max_length)
    weight_KxT = (~np.isin(ids_KxT, np.asarray(concepts.ids_array))).astype(np.float32)
    # the states the step compares with, computed by the step's own conditioning (SDXL's time ids included)
    target = steps.step_model(bundle).text_states(conditioning.text_params(bundle.params), jnp.asarray(ids_KxT),
                                                  tuple(latent_hw), concepts.ids_array,
                                                  jnp.asarray(concepts.init_rows, bundle.dtype))
    return {"context_ids": jnp.asarray(ids_KxT), "context_target": target, "context_weight": jnp.asarray(weight_KxT)}


def truth_masks(setup: Setup, ground_truth=None) -> np.ndarray | None:
    """What the masks are measured against: the given ground truth, else the user's masks when every
    concept has one, else None."""
    if ground_truth is not None:
        return np.asarray(ground_truth, bool)
    return np.stack(setup.inputs.user_masks) if setup.inputs.has_all_user_masks else None
