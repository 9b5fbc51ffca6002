"""The PyTorch format: parameter names both ways and the PyTorch configs.

PyTorch -> Flax (`pt_to_flax_key`, `pt_to_flax_text_key`, `pt_to_flax_clip_key`) are diffusers' / transformers' own
renaming rules, for loading PyTorch weights without torch. Flax -> PyTorch (`flax_to_pt_key`,
`flax_to_pt_text_key`) is their inverse, with the `config.json`s of the PyTorch classes, for writing PyTorch
folders without torch. `jaxconcept.export` checks every name made here by running it back through the forward
rules (the rules the loader uses), so a mistake here fails loudly instead of writing a folder that PyTorch loads
with random weights."""

from __future__ import annotations

import copy
import json

import numpy as np
from diffusers import __version__ as DIFFUSERS_VERSION
from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor
from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor as _hf_rename

from .compat import public_config
from .text import has_projection


def pt_to_flax_key(pt_key: str, tensor, flax_shapes: dict):
    """Map one PyTorch state-dict entry to (flax tuple key, array) using diffusers' own renaming rules."""
    tuple_key = tuple(rename_key(pt_key).split("."))
    return rename_key_and_reshape_tensor(tuple_key, tensor, flax_shapes)


def pt_to_flax_text_key(pt_key: str, tensor, flax_shapes: dict):
    """Map one PyTorch CLIPTextModel entry to (flax tuple key, array) with transformers' rules."""
    return _hf_rename(tuple(pt_key.split(".")), tensor, flax_shapes, "text_model")


def pt_to_flax_clip_key(pt_key: str, tensor, flax_shapes: dict):
    """Map one PyTorch `CLIPModel` entry to (flax tuple key, array) with transformers' rules.

    (`FlaxCLIPModel.from_pretrained` reads a PyTorch `model.safetensors` without torch only with
    `_do_init=True`, i.e. after a full random init of the model; with `_do_init=False` it fails.)
    """
    return _hf_rename(tuple(pt_key.split(".")), tensor, flax_shapes, "clip")


# diffusers' rename_key turns PyTorch's "<list>.<n>" (ModuleList / Sequential items) into Flax's "<list>_<n>";
# these Flax names are spelt with the underscore in PyTorch too (TimestepEmbedding's layers), and the
# forward rule cannot tell them apart, so they are listed (diffusers' own Flax->PT loader exempts them too).
_PT_UNDERSCORE_NAMES = frozenset({"linear_1", "linear_2"})


# the Flax VAE's attention block keeps the old projection names; PyTorch's Attention has to_q/.../to_out.0
_VAE_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# Flax-only config entries that PyTorch's from_pretrained would report as unexpected
_FLAX_ONLY_CONFIG = ("dtype", "param_dtype", "use_memory_efficient_attention", "split_head_dim")


def _pt_leaf(leaf: str, array) -> tuple[str, np.ndarray]:
    """PyTorch parameter name and layout for one Flax leaf."""
    array = np.asarray(array)
    if leaf == "kernel" and array.ndim == 4:
        return "weight", array.transpose(3, 2, 0, 1)  # conv HWIO -> OIHW
    if leaf == "kernel":
        return "weight", array.T  # dense (in, out) -> Linear (out, in)
    if leaf in ("scale", "embedding"):
        return "weight", array  # GroupNorm / LayerNorm scale, Embedding table
    return leaf, array


def flax_to_pt_key(flax_key: tuple, array) -> tuple[str, np.ndarray]:
    """(PyTorch state-dict name, array in PyTorch layout) of one diffusers Flax UNet/VAE parameter."""
    *path, leaf = flax_key
    names = []
    for i, seg in enumerate(path):
        if i == len(path) - 1 and seg in _VAE_ATTENTION_NAMES:
            names.append(_VAE_ATTENTION_NAMES[seg])
            continue
        head, sep, tail = seg.rpartition("_")
        split = sep and head and tail.isdigit() and seg not in _PT_UNDERSCORE_NAMES
        names.append(f"{head}.{tail}" if split else seg)
    name, value = _pt_leaf(leaf, array)
    return ".".join(names + [name]), value


def flax_to_pt_text_key(flax_key: tuple, array) -> tuple[str, np.ndarray]:
    """(PyTorch name, array) of one transformers Flax CLIP text parameter (paths coincide but the leaf)."""
    name, value = _pt_leaf(flax_key[-1], array)
    return ".".join(tuple(flax_key[:-1]) + (name,)), value


def _pt_diffusers_config(module, class_name: str) -> dict:
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in public_config(module.config).items()
           if k not in _FLAX_ONLY_CONFIG}
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **cfg}


def pt_unet_config(unet) -> dict:
    """`config.json` of the PyTorch UNet2DConditionModel equal to this Flax UNet (keys mostly coincide; the
    PyTorch defaults of the keys Flax lacks are what the Flax port hard-codes, e.g. 32 norm groups)."""
    return _pt_diffusers_config(unet, "UNet2DConditionModel")


def pt_vae_config(vae) -> dict:
    return _pt_diffusers_config(vae, "AutoencoderKL")


def pt_text_class(text_encoder) -> str:
    """transformers' PyTorch class of a Flax CLIP text module: CLIPTextModelWithProjection for one that projects
    its pooled state (SDXL's second encoder), else CLIPTextModel."""
    return "CLIPTextModelWithProjection" if has_projection(text_encoder) else "CLIPTextModel"


def pt_text_config(text_encoder) -> dict:
    """`config.json` of the PyTorch CLIPTextModel / CLIPTextModelWithProjection (transformers configs are
    framework-neutral)."""
    cfg = copy.deepcopy(text_encoder.config)
    cfg.architectures = [pt_text_class(text_encoder)]
    return json.loads(cfg.to_json_string(use_diff=True))


def pt_scheduler_config(config: dict) -> dict:
    """`scheduler_config.json` for PyTorch: the model's own schedule, class named without "Flax"
    (DDIM when the model shipped no class: the sampler SD's papers and this project use)."""
    cls = str(config.get("_class_name") or "DDIMScheduler").removeprefix("Flax")
    body = {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "dtype"}
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **body}


def pt_pipeline_index(scheduler_class: str, sdxl: bool = False) -> dict:
    """`model_index.json` of a StableDiffusionPipeline folder without safety checker, or with `sdxl` of a
    StableDiffusionXLPipeline folder (its second encoder and tokenizer; zero unconditional text without a negative
    prompt, as SDXL base ships and as `generate` samples)."""
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    if not sdxl:
        return index
    for key in ("safety_checker", "requires_safety_checker"):  # the SDXL pipeline takes neither
        del index[key]
    return dict(index, _class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                tokenizer_2=["transformers", "CLIPTokenizer"])
