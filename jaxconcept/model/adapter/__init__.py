"""The adapter: the ONLY place in jaxconcept that imports diffusers / transformers model classes (the PyTorch
reference of the benchmarks, `bench/torch_reference.py`, aside).

Flax models end at diffusers 0.39.x and transformers 4.57.x; keeping every import of their classes here makes
replacing them a one-place change. Everything else in jaxconcept sees plain Flax modules, param pytrees and the
small functions re-exported below (`from jaxconcept.model import adapter; adapter.unet_from_config(...)`).

One module per concern:
- `quiet`: silences the libraries' deprecation logs (imported first: before diffusers is);
- `compat`: config checks, what of a PyTorch UNet/VAE/text config the Flax classes would ignore or misread;
- `attention`: the diffusers attention internals the UNet interceptors (`model/capture.py`) rely on;
- `unet_vae`: the Flax UNet and VAE from a config or a Flax folder;
- `text`: the CLIP text encoder and its tokenizer;
- `static`: modules as static jit arguments (`StaticModule`) and their params' shapes (`param_shapes`);
- `schedulers`: DDPM for training, DDIM / PNDM / DPM-Solver++ for sampling;
- `flax_folder`: writing diffusers-layout Flax folders (a tuned UNet, a whole pipeline);
- `clip`: the full CLIP model of the evaluation metrics;
- `pt_format`: PyTorch parameter names both ways and the PyTorch configs (loading and export without torch).
"""

from . import quiet  # first: the deprecation filters are in place before diffusers is imported
from .attention import (
    TRANSFORMER_NORM_EPS, attention_with_probs, geglu_exact_gelu, is_attention_module, is_geglu_module,
    is_transformer_group_norm, transformer_group_norm_pytorch_eps, with_memory_efficient_attention,
)
from .clip import (
    clip_from_config, clip_image_features, clip_init_fn, clip_text_features, clip_vision_layer_states, load_flax_clip,
)
from .compat import check_text_config, config_problems, text_config_problems
from .flax_folder import flax_pipeline_index, save_flax_components, save_flax_unet
from .pt_format import (
    DIFFUSERS_VERSION, flax_to_pt_key, flax_to_pt_text_key, pt_pipeline_index, pt_scheduler_config, pt_text_class,
    pt_text_config, pt_to_flax_clip_key, pt_to_flax_key, pt_to_flax_text_key, pt_unet_config, pt_vae_config,
)
from .schedulers import (
    INFERENCE_SCHEDULERS, ddim_scheduler, ddpm_scheduler, dpm_solver_scheduler, inference_scheduler, pndm_scheduler,
    scheduler_name,
)
from .static import StaticModule, param_shapes
from .text import (
    has_projection, load_flax_clip_text, load_tokenizer, text_encoder_from_config, text_encoder_outputs,
    text_encoder_with_vocab, text_init_fn, tokenizer_from_files,
)
from .unet_vae import load_flax_unet, unet_config_dict, unet_from_config, vae_config_dict, vae_from_config

quiet.silence_deprecations()  # again: the imports above created the libraries' handlers

__all__ = [
    # attention
    "TRANSFORMER_NORM_EPS", "attention_with_probs", "geglu_exact_gelu", "is_attention_module", "is_geglu_module",
    "is_transformer_group_norm", "transformer_group_norm_pytorch_eps", "with_memory_efficient_attention",
    # clip
    "clip_from_config", "clip_image_features", "clip_init_fn", "clip_text_features", "clip_vision_layer_states",
    "load_flax_clip",
    # compat
    "check_text_config", "config_problems", "text_config_problems",
    # flax_folder
    "flax_pipeline_index", "save_flax_components", "save_flax_unet",
    # pt_format
    "DIFFUSERS_VERSION", "flax_to_pt_key", "flax_to_pt_text_key", "pt_pipeline_index", "pt_scheduler_config",
    "pt_text_class", "pt_text_config", "pt_to_flax_clip_key", "pt_to_flax_key", "pt_to_flax_text_key",
    "pt_unet_config", "pt_vae_config",
    # schedulers
    "INFERENCE_SCHEDULERS", "ddim_scheduler", "ddpm_scheduler", "dpm_solver_scheduler", "inference_scheduler",
    "pndm_scheduler", "scheduler_name",
    # static
    "StaticModule", "param_shapes",
    # text
    "has_projection", "load_flax_clip_text", "load_tokenizer", "text_encoder_from_config", "text_encoder_outputs",
    "text_encoder_with_vocab", "text_init_fn", "tokenizer_from_files",
    # unet_vae
    "load_flax_unet", "unet_config_dict", "unet_from_config", "vae_config_dict", "vae_from_config",
]
