"""Writing diffusers-layout folders with Flax weights (msgpack): one tuned UNet, or a whole pipeline that
`load_model` and diffusers' Flax pipelines load."""

from __future__ import annotations

import json
import os

from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
from diffusers import __version__ as DIFFUSERS_VERSION
from transformers import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

from .unet_vae import unet_config_dict, vae_config_dict


def save_flax_unet(folder: str, unet, params) -> None:
    """Write one UNet as a diffusers Flax folder (config.json + msgpack), e.g. a run's tuned UNet."""
    FlaxUNet2DConditionModel.from_config(unet_config_dict(unet)).save_pretrained(folder, params=params)


def save_flax_components(folder: str, bundle, params) -> None:
    """Write a diffusers-layout folder with Flax weights (msgpack), loadable by `load_model(folder)` and by
    diffusers' `FlaxStableDiffusionPipeline.from_pretrained(folder)` (SDXL, with `text_encoder_2`:
    `FlaxStableDiffusionXLPipeline`). bundle: a `ModelBundle` (its modules, tokenizers and scheduler are
    written); params: its params as they are to be written."""
    unet_cls = FlaxUNet2DConditionModel.from_config(unet_config_dict(bundle.unet))
    unet_cls.save_pretrained(os.path.join(folder, "unet"), params=params["unet"])
    vae_cls = FlaxAutoencoderKL.from_config(vae_config_dict(bundle.vae))
    vae_cls.save_pretrained(os.path.join(folder, "vae"), params=params["vae"])
    te = FlaxCLIPTextModel(bundle.text_encoder.config, _do_init=False)
    te.save_pretrained(os.path.join(folder, "text_encoder"), params=params["text_encoder"])
    bundle.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    if bundle.text_encoder_2 is not None:
        te2 = FlaxCLIPTextModelWithProjection(bundle.text_encoder_2.config, _do_init=False)
        te2.save_pretrained(os.path.join(folder, "text_encoder_2"), params=params["text_encoder_2"])
        bundle.tokenizer_2.save_pretrained(os.path.join(folder, "tokenizer_2"))
    bundle.scheduler.save_config(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(flax_pipeline_index(sdxl=bundle.text_encoder_2 is not None), f, indent=2)


def flax_pipeline_index(sdxl: bool = False) -> dict:
    """`model_index.json` for diffusers' FlaxStableDiffusionPipeline (or FlaxStableDiffusionXLPipeline)
    .from_pretrained (no safety checker).

    The pipeline only samples with DDIM, PNDM, LMS or DPM-Solver, so the index names DDIM; it reads the
    folder's schedule (betas, prediction type) from scheduler_config.json, which keeps the training class.

    The absent safety checker and feature extractor are listed as (library, null): diffusers' Flax loader drops
    a [null, null] entry and then fails ("expected ... but only ... were passed") unless the caller passes
    safety_checker=None, feature_extractor=None; a known library with a null class loads as None by itself."""
    index = {
        "_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": ["transformers", None], "safety_checker": ["stable_diffusion", None],
        "scheduler": ["diffusers", "FlaxDDIMScheduler"], "text_encoder": ["transformers", "FlaxCLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "FlaxUNet2DConditionModel"],
        "vae": ["diffusers", "FlaxAutoencoderKL"],
    }
    if not sdxl:
        return index
    del index["feature_extractor"], index["safety_checker"]  # the SDXL pipeline takes neither
    return dict(index, _class_name="FlaxStableDiffusionXLPipeline",
                text_encoder_2=["transformers", "FlaxCLIPTextModelWithProjection"],
                tokenizer_2=["transformers", "CLIPTokenizer"])
