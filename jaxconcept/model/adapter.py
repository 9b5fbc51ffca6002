"""The one place that imports diffusers / transformers model classes.

Flax models end at diffusers 0.39.x and transformers 4.57.x; keeping every import of their classes here
makes replacing them a one-place change. Everything else in jaxconcept sees plain Flax modules, param
pytrees and the small functions below.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class _DropDeprecation(logging.Filter):
    """diffusers' Flax modules log a deprecation warning on every `setup` (i.e. every trace)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("classes are deprecated" in msg and "will be removed" in msg)


_NOISY_LOGGERS = (
    "diffusers.models.attention_flax",
    "diffusers.models.unets.unet_2d_blocks_flax",
    "diffusers.models.unets.unet_2d_condition_flax",
    "diffusers.models.resnet_flax",
    "diffusers.models.vae_flax",
    "diffusers.models.embeddings_flax",
    "diffusers.models.modeling_flax_utils",
    "diffusers.schedulers.scheduling_utils_flax",
    "diffusers.schedulers.scheduling_ddpm_flax",
    "diffusers.schedulers.scheduling_ddim_flax",
    "diffusers.schedulers.scheduling_pndm_flax",
    "diffusers.schedulers.scheduling_dpmsolver_multistep_flax",
    "transformers.modeling_flax_utils",
    "transformers.models.clip.modeling_flax_clip",
)


def _silence_deprecations() -> None:
    # A logger's filters only see records logged on that logger, not those propagated from children:
    # attach to each emitting module logger and to the libraries' own handlers.
    drop = _DropDeprecation()
    targets = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    for lib in ("diffusers", "transformers"):
        targets += logging.getLogger(lib).handlers
    for target in targets:
        if not any(isinstance(f, _DropDeprecation) for f in target.filters):
            target.addFilter(drop)
    # "ftfy or spacy is not installed": harmless, CLIP falls back to its BasicTokenizer.
    logging.getLogger("transformers.models.clip.tokenization_clip").setLevel(logging.ERROR)


_silence_deprecations()

from diffusers import (  # noqa: E402
    FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxDDPMScheduler, FlaxDPMSolverMultistepScheduler, FlaxPNDMScheduler,
    FlaxUNet2DConditionModel,
)
from diffusers.models.attention_flax import FlaxAttention, FlaxGEGLU, FlaxTransformer2DModel  # noqa: E402
from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection,
)
from transformers.models.clip.modeling_flax_clip import (  # noqa: E402
    FlaxCLIPTextModelWithProjectionModule, FlaxCLIPTextModule,
)
from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor as _hf_rename  # noqa: E402

_silence_deprecations()  # again: the imports above created the libraries' handlers

__all__ = [
    "ddpm_scheduler",
    "is_attention_module",
    "load_flax_clip_text",
    "pt_to_flax_text_key",
    "text_init_fn",
    "load_flax_unet",
    "load_tokenizer",
    "pt_to_flax_key",
    "save_flax_components",
    "text_encoder_from_config",
    "text_encoder_with_vocab",
    "tokenizer_from_files",
    "unet_from_config",
    "vae_from_config",
]

def is_attention_module(module: Any) -> bool:
    return isinstance(module, FlaxAttention)


def is_geglu_module(module: Any) -> bool:
    return isinstance(module, FlaxGEGLU)


def is_transformer_group_norm(module: Any) -> bool:
    """The GroupNorm at the input of a UNet Transformer2D block."""
    return isinstance(module, nn.GroupNorm) and isinstance(module.parent, FlaxTransformer2DModel)


# PyTorch's Transformer2DModel GroupNorm eps (diffusers' Flax port hard-codes 1e-5)
TRANSFORMER_NORM_EPS = 1e-6


# ---------------------------------------------------------------- config checks (PyTorch configs, Flax classes)
# A PyTorch diffusers config.json holds every UNet2DConditionModel / AutoencoderKL __init__ argument; diffusers'
# Flax classes take fewer and ignore the rest with a warning. Below is each argument the Flax class lacks
# (diffusers 0.39; tests/test_model.py keeps the lists equal to the signatures), with PyTorch's default, which is
# what the Flax port hard-codes. Any other value would make PyTorch compute another model than the Flax one:
# refused with the reason. The NEUTRAL ones never change what this project computes.

_UNET_FIXED = {  # name: (PyTorch default = what the Flax UNet always does, what another value would change)
    "act_fn": ("silu", "the Flax UNet always uses SiLU activations"),
    "attention_type": ("default", "gated (GLIGEN) attention has no Flax version"),
    "center_input_sample": (False, "the Flax UNet never re-centres its input"),
    "class_embed_type": (None, "class embeddings have no Flax version"),
    "class_embeddings_concat": (False, "class embeddings have no Flax version"),
    "conv_in_kernel": (3, "the Flax UNet's input convolution is always 3x3"),
    "conv_out_kernel": (3, "the Flax UNet's output convolution is always 3x3"),
    "downsample_padding": (1, "the Flax UNet's downsampling convolutions always pad by 1"),
    "dual_cross_attention": (False, "dual cross-attention has no Flax version"),
    "encoder_hid_dim": (None, "a projection of the text states (encoder_hid_proj) has no Flax version"),
    "encoder_hid_dim_type": (None, "a projection of the text states (encoder_hid_proj) has no Flax version"),
    "mid_block_scale_factor": (1, "the Flax middle block never rescales its output"),
    "norm_eps": (1e-5, "the Flax UNet's GroupNorms always use eps 1e-5"),
    "norm_num_groups": (32, "the Flax UNet's GroupNorms always use 32 groups"),
    "num_class_embeds": (None, "class embeddings have no Flax version"),
    "resnet_out_scale_factor": (1.0, "the Flax ResNet blocks never rescale their output"),
    "resnet_skip_time_act": (False, "the Flax ResNet blocks always apply the activation to the time embedding"),
    "resnet_time_scale_shift": ("default", "the Flax ResNet blocks always add the time embedding (no scale-shift)"),
    "reverse_transformer_layers_per_block": (None, "per-block transformer depths of the up blocks have no Flax version"),
    "time_cond_proj_dim": (None, "a timestep-condition projection (LCM) has no Flax version"),
    "time_embedding_act_fn": (None, "the Flax time embedding has no extra activation"),
    "time_embedding_dim": (None, "the Flax time embedding is always 4x the first block's width"),
    "time_embedding_type": ("positional", "the Flax UNet only has sinusoidal (positional) time embeddings"),
    "timestep_post_act": (None, "the Flax time embedding has no post-activation"),
}
_UNET_NEUTRAL = {  # name: why it never changes what is computed here
    "upcast_attention": "it only computes float16 attention scores in float32; Flax runs them in float32 or "
                        "bfloat16, whose range is float32's",
    "mid_block_only_cross_attention": "only UNetMidBlock2DSimpleCrossAttn reads it, which is refused",
    "cross_attention_norm": "only the SimpleCrossAttn blocks read it, which are refused",
}
_UNET_VALUES = {  # Flax fields whose other values the Flax UNet reads wrongly or not at all: (allowed, why)
    "down_block_types": (("CrossAttnDownBlock2D", "DownBlock2D"), "the Flax UNet builds any other as a DownBlock2D"),
    "up_block_types": (("CrossAttnUpBlock2D", "UpBlock2D"), "the Flax UNet builds any other as an UpBlock2D"),
    "mid_block_type": (("UNetMidBlock2DCrossAttn", None), "the Flax UNet has no other middle block"),
    "addition_embed_type": ((None, "text_time"), "the Flax UNet has no other added conditioning than SDXL's"),
}
_VAE_FIXED = {
    "latents_mean": (None, "per-channel latent normalisation is not applied by this project"),
    "latents_std": (None, "per-channel latent normalisation is not applied by this project"),
    "mid_block_add_attention": (True, "the Flax VAE's middle blocks always have attention"),
    "shift_factor": (None, "latent shifting (SD3/Flux VAEs) is not applied by this project"),
    "use_post_quant_conv": (True, "the Flax VAE always has post_quant_conv"),
    "use_quant_conv": (True, "the Flax VAE always has quant_conv"),
}
_VAE_NEUTRAL = {"force_upcast": "it only makes PyTorch pipelines run a float16 VAE in float32"}
_VAE_VALUES = {
    "act_fn": (("silu",), "the Flax VAE always uses SiLU"),
    "down_block_types": (("DownEncoderBlock2D",), "the Flax VAE builds these whatever is named"),
    "up_block_types": (("UpDecoderBlock2D",), "the Flax VAE builds these whatever is named"),
}
_CHECKS = {"UNet": (_UNET_FIXED, _UNET_NEUTRAL, _UNET_VALUES), "VAE": (_VAE_FIXED, _VAE_NEUTRAL, _VAE_VALUES)}


def _flax_fields(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _same(a, b) -> bool:
    return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)


def config_problems(config: dict, kind: str) -> list[str]:
    """One line per setting of a PyTorch UNet ("UNet") or VAE ("VAE") config that diffusers' Flax class would
    ignore or misread while PyTorch computes something else with it; empty when the Flax model is the same."""
    fixed, _, values = _CHECKS[kind]
    out = []
    for name, (default, why) in fixed.items():
        if name in config and not _same(config[name], default):
            out.append(f"{name}={config[name]!r} (PyTorch's default is {default!r}): {why}")
    for name, (allowed, why) in values.items():
        got = config.get(name)
        for v in (got if isinstance(got, (list, tuple)) else [got]) if name in config else []:
            if v not in allowed:
                out.append(f"{name} holds {v!r}, but only {', '.join(repr(a) for a in allowed)} can be used: {why}")
    return out


def _flax_config(config: dict, cls, kind: str, what: str) -> dict:
    """The entries of `config` that `cls` takes, after refusing those that would change the computation."""
    from ..errors import ModelSourceError

    problems = config_problems(config, kind)
    if problems:
        raise ModelSourceError(
            f"{what}: this {kind} cannot be run by diffusers' Flax {kind} without computing a different model:\n  "
            + "\n  ".join(problems) + f"\nSuch a {kind} can only be run faithfully by PyTorch diffusers.")
    fields = _flax_fields(cls) - {"dtype"}  # the dtype is an argument, never read from a file
    return {k: v for k, v in _hashable(config).items() if k in fields}


def geglu_exact_gelu(module, hidden):
    """diffusers' FlaxGEGLU with PyTorch's exact (erf) GELU instead of the tanh approximation (dropout:
    inference / rate 0)."""
    hidden_linear, hidden_gate = jnp.split(module.proj(hidden), 2, axis=2)
    return hidden_linear * nn.gelu(hidden_gate, approximate=False)


def transformer_group_norm_pytorch_eps(module, hidden):
    """A Transformer2D block's input GroupNorm with PyTorch's eps."""
    norm = module.clone(parent=None, epsilon=TRANSFORMER_NORM_EPS)
    return norm.apply({"params": module.variables["params"]}, hidden)


def with_memory_efficient_attention(unet):
    """The UNet computing attention in query/key chunks (diffusers' `use_memory_efficient_attention`): the same
    values, without holding whole attention matrices. Captured cross-attention layers still form their
    probabilities (Q x T: small); the self-attention layers, whose Q x Q matrices dominate memory, are chunked."""
    return unet.clone(use_memory_efficient_attention=True)


def attention_with_probs(module, hidden_BxQxF, context_BxTxD):
    """diffusers' FlaxAttention forward (non-chunked path) that also returns probs (B x heads x Q x T)."""
    heads, dim_head = module.heads, module.dim_head
    q = module.query(hidden_BxQxF)
    k = module.key(context_BxTxD)
    v = module.value(context_BxTxD)
    batch, num_q, num_t = hidden_BxQxF.shape[0], hidden_BxQxF.shape[1], context_BxTxD.shape[1]
    if module.split_head_dim:
        q = q.reshape(batch, -1, heads, dim_head)
        k = k.reshape(batch, -1, heads, dim_head)
        v = v.reshape(batch, -1, heads, dim_head)
        scores = jnp.einsum("b t n h, b f n h -> b n f t", k, q) * dim_head**-0.5
        probs = nn.softmax(scores, axis=-1)
        out = jnp.einsum("b n f t, b t n h -> b f n h", probs, v).reshape(batch, -1, heads * dim_head)
        probs_BxAxQxT = probs
    else:
        q, k, v = (module.reshape_heads_to_batch_dim(x) for x in (q, k, v))
        scores = jnp.einsum("b i d, b j d->b i j", q, k) * dim_head**-0.5
        probs = nn.softmax(scores, axis=2)
        out = module.reshape_batch_dim_to_heads(jnp.einsum("b i j, b j d -> b i d", probs, v))
        probs_BxAxQxT = probs.reshape(batch, heads, num_q, num_t)
    out = module.proj_attn(out)
    return module.dropout_layer(out, deterministic=True), probs_BxAxQxT


# ---------------------------------------------------------------- UNet / VAE


def _hashable(config: dict) -> dict:
    # JSON configs hold lists; modules must be hashable to serve as static jit arguments and cache keys
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items() if not k.startswith("_")}


def unet_from_config(config: dict, dtype=jnp.float32, what: str = "UNet config"):
    """The Flax UNet of a (PyTorch or Flax) diffusers config; ModelSourceError for settings Flax lacks."""
    return FlaxUNet2DConditionModel.from_config(
        _flax_config(config, FlaxUNet2DConditionModel, "UNet", what), dtype=dtype)


def vae_from_config(config: dict, dtype=jnp.float32, what: str = "VAE config"):
    return FlaxAutoencoderKL.from_config(_flax_config(config, FlaxAutoencoderKL, "VAE", what), dtype=dtype)


def load_flax_unet(folder: str, dtype=jnp.float32):
    """(module, params) from a folder holding `config.json` + `diffusion_flax_model.msgpack`."""
    module, params = FlaxUNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    return unet_from_config(module.config, dtype), params


def unet_config_dict(module) -> dict:
    return _public_config(module.config)


def vae_config_dict(module) -> dict:
    return _public_config(module.config)


def _public_config(cfg) -> dict:
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def pt_to_flax_key(pt_key: str, tensor, flax_shapes: dict):
    """Map one PyTorch state-dict entry to (flax tuple key, array) using diffusers' own renaming rules."""
    tuple_key = tuple(rename_key(pt_key).split("."))
    return rename_key_and_reshape_tensor(tuple_key, tensor, flax_shapes)


# ---------------------------------------------------------------- text


def text_config_problems(config: dict) -> list[str]:
    """What in a text encoder's config.json transformers' Flax CLIP text model cannot run as PyTorch does.

    Every CLIPTextConfig field PyTorch's CLIPTextModel computes with is read by the Flax one too (its
    `_attn_implementation` picks an equivalent kernel, `initializer_*` only matter for fresh weights,
    `projection_dim` only for CLIPTextModelWithProjection); left are the model type and the activation."""
    from transformers.modeling_flax_utils import ACT2FN

    out = []
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        out.append(f"model_type={model_type!r}: only CLIP text encoders ('clip_text_model') are supported")
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACT2FN:
        out.append(f"hidden_act={act!r}: the Flax CLIP has only {', '.join(map(repr, ACT2FN))}")
    return out


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


def check_text_config(config: dict, what: str) -> None:
    from ..errors import ModelSourceError

    problems = text_config_problems(config)
    if problems:
        raise ModelSourceError(f"{what}: this text encoder cannot be run by transformers' Flax CLIP:\n  "
                               + "\n  ".join(problems))


def text_encoder_with_vocab(module, vocab_size: int):
    """Same text encoder, embedding table of `vocab_size` rows (linen checks param shapes)."""
    cfg = copy.deepcopy(module.config)
    cfg.vocab_size = int(vocab_size)
    return type(module)(cfg, dtype=module.dtype)


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


def pt_to_flax_text_key(pt_key: str, tensor, flax_shapes: dict):
    """Map one PyTorch CLIPTextModel entry to (flax tuple key, array) with transformers' rules."""
    return _hf_rename(tuple(pt_key.split(".")), tensor, flax_shapes, "text_model")


def tokenizer_from_files(vocab_file: str, merges_file: str, **kwargs):
    return CLIPTokenizer(vocab_file, merges_file, **kwargs)


def load_tokenizer(folder: str):
    return CLIPTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- schedulers


def _accepted(cls, config: dict) -> dict:
    # SD folders ship e.g. a PNDM config; keep the keys this class takes (betas, steps, prediction type)
    names = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in dict(config or {}).items() if k in names and k != "dtype"}


def ddpm_scheduler(config: dict | None = None):
    """(scheduler, state) for the training noise schedule."""
    sched = FlaxDDPMScheduler(**_accepted(FlaxDDPMScheduler, config))
    return sched, sched.create_state()


def ddim_scheduler(config: dict):
    sched = FlaxDDIMScheduler(**_accepted(FlaxDDIMScheduler, config))
    return sched, sched.create_state()


def pndm_scheduler(config: dict):
    # SD's own pipelines run PNDM as PLMS without the Runge-Kutta warm-up (skip_prk_steps=True)
    sched = FlaxPNDMScheduler(**{"skip_prk_steps": True, **_accepted(FlaxPNDMScheduler, config)})
    return sched, sched.create_state()


def dpm_solver_scheduler(config: dict):
    """DPM-Solver++ (2nd order, multistep), as diffusers' SD pipelines configure it."""
    kwargs = {**_accepted(FlaxDPMSolverMultistepScheduler, config), "algorithm_type": "dpmsolver++",
              "solver_order": 2}
    sched = FlaxDPMSolverMultistepScheduler(**kwargs)
    return sched, sched.create_state()


_INFERENCE = {"ddim": ddim_scheduler, "pndm": pndm_scheduler, "dpm++": dpm_solver_scheduler}
INFERENCE_SCHEDULERS = tuple(_INFERENCE)
_ALIASES = {"dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpm": "dpm++", "plms": "pndm"}


def scheduler_name(name: str) -> str:
    """The canonical name of a sampling scheduler (aliases accepted); ValueError for an unknown one."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _INFERENCE:
        raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(INFERENCE_SCHEDULERS)}")
    return key


def inference_scheduler(name: str, config: dict):
    """(scheduler, state) of a sampling scheduler built from a model's scheduler config."""
    return _INFERENCE[scheduler_name(name)](config)


# ---------------------------------------------------------------- saving (Flax format)


def save_flax_unet(folder: str, unet, params) -> None:
    """Write one UNet as a diffusers Flax folder (config.json + msgpack), e.g. a run's tuned UNet."""
    FlaxUNet2DConditionModel.from_config(unet_config_dict(unet)).save_pretrained(folder, params=params)


def save_flax_components(folder: str, *, unet, vae, text_encoder, tokenizer, scheduler, params,
                         text_encoder_2=None, tokenizer_2=None) -> None:
    """Write a diffusers-layout folder with Flax weights (msgpack), loadable by `load_model(folder)` and by
    diffusers' `FlaxStableDiffusionPipeline.from_pretrained(folder)` (SDXL, with `text_encoder_2`:
    `FlaxStableDiffusionXLPipeline`)."""
    import json
    import os

    unet_cls = FlaxUNet2DConditionModel.from_config(unet_config_dict(unet))
    unet_cls.save_pretrained(os.path.join(folder, "unet"), params=params["unet"])
    vae_cls = FlaxAutoencoderKL.from_config(vae_config_dict(vae))
    vae_cls.save_pretrained(os.path.join(folder, "vae"), params=params["vae"])
    te = FlaxCLIPTextModel(text_encoder.config, _do_init=False)
    te.save_pretrained(os.path.join(folder, "text_encoder"), params=params["text_encoder"])
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    if text_encoder_2 is not None:
        te2 = FlaxCLIPTextModelWithProjection(text_encoder_2.config, _do_init=False)
        te2.save_pretrained(os.path.join(folder, "text_encoder_2"), params=params["text_encoder_2"])
        tokenizer_2.save_pretrained(os.path.join(folder, "tokenizer_2"))
    scheduler.save_config(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(flax_pipeline_index(sdxl=text_encoder_2 is not None), f, indent=2)


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


# ---------------------------------------------------------------- CLIP (evaluation metrics)
# The full CLIP model (vision + text towers with their projections) that `jaxconcept.metrics` scores
# generated images with. Only this section knows transformers' class and attribute names.

from transformers import CLIPConfig, FlaxCLIPModel  # noqa: E402
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule  # noqa: E402


def clip_from_config(config: dict, dtype=jnp.float32):
    """Full CLIP as a plain Flax module, from a `config.json`-style dict (text_config / vision_config)."""
    return FlaxCLIPModule(CLIPConfig.from_dict(_public_config(config)), dtype=dtype)


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


def pt_to_flax_clip_key(pt_key: str, tensor, flax_shapes: dict):
    """Map one PyTorch `CLIPModel` entry to (flax tuple key, array) with transformers' rules.

    (`FlaxCLIPModel.from_pretrained` reads a PyTorch `model.safetensors` without torch only with
    `_do_init=True`, i.e. after a full random init of the model; with `_do_init=False` it fails.)
    """
    return _hf_rename(tuple(pt_key.split(".")), tensor, flax_shapes, "clip")


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


# ---------------------------------------------------------------- export (Flax -> PyTorch names)
# The inverse of diffusers' / transformers' PyTorch -> Flax naming, for writing PyTorch folders without torch.
# `jaxconcept.export` checks every name made here by running it back through `pt_to_flax_key` /
# `pt_to_flax_text_key` (the rules the loader uses), so a mistake here fails loudly instead of writing a
# folder that PyTorch loads with random weights.

import numpy as _np  # noqa: E402
from diffusers import __version__ as DIFFUSERS_VERSION  # noqa: E402

# diffusers' rename_key turns PyTorch's "<list>.<n>" (ModuleList / Sequential items) into Flax's "<list>_<n>";
# these Flax names are spelt with the underscore in PyTorch too (TimestepEmbedding's layers), and the
# forward rule cannot tell them apart, so they are listed (diffusers' own Flax->PT loader exempts them too).
_PT_UNDERSCORE_NAMES = frozenset({"linear_1", "linear_2"})
# the Flax VAE's attention block keeps the old projection names; PyTorch's Attention has to_q/.../to_out.0
_VAE_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Flax-only config entries that PyTorch's from_pretrained would report as unexpected
_FLAX_ONLY_CONFIG = ("dtype", "param_dtype", "use_memory_efficient_attention", "split_head_dim")


def _pt_leaf(leaf: str, array) -> tuple[str, _np.ndarray]:
    """PyTorch parameter name and layout for one Flax leaf."""
    array = _np.asarray(array)
    if leaf == "kernel" and array.ndim == 4:
        return "weight", array.transpose(3, 2, 0, 1)  # conv HWIO -> OIHW
    if leaf == "kernel":
        return "weight", array.T  # dense (in, out) -> Linear (out, in)
    if leaf in ("scale", "embedding"):
        return "weight", array  # GroupNorm / LayerNorm scale, Embedding table
    return leaf, array


def flax_to_pt_key(flax_key: tuple, array) -> tuple[str, _np.ndarray]:
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


def flax_to_pt_text_key(flax_key: tuple, array) -> tuple[str, _np.ndarray]:
    """(PyTorch name, array) of one transformers Flax CLIP text parameter (paths coincide but the leaf)."""
    name, value = _pt_leaf(flax_key[-1], array)
    return ".".join(tuple(flax_key[:-1]) + (name,)), value


def _pt_diffusers_config(module, class_name: str) -> dict:
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in _public_config(module.config).items()
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
    import json

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
