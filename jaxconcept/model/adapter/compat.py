"""Config checks: what in a PyTorch diffusers UNet/VAE config or a transformers CLIP text config the Flax classes
would ignore or misread (refused with the reason), and the config entries the Flax classes take."""

from __future__ import annotations

import dataclasses

from transformers.modeling_flax_utils import ACT2FN

from ...errors import ModelSourceError


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


def flax_config(config: dict, cls, kind: str, what: str) -> dict:
    """The entries of `config` that `cls` takes, after refusing those that would change the computation."""
    problems = config_problems(config, kind)
    if problems:
        raise ModelSourceError(
            f"{what}: this {kind} cannot be run by diffusers' Flax {kind} without computing a different model:\n  "
            + "\n  ".join(problems) + f"\nSuch a {kind} can only be run faithfully by PyTorch diffusers.")
    fields = _flax_fields(cls) - {"dtype"}  # the dtype is an argument, never read from a file
    return {k: v for k, v in hashable_config(config).items() if k in fields}


def hashable_config(config: dict) -> dict:
    # JSON configs hold lists; modules must be hashable to serve as static jit arguments and cache keys
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items() if not k.startswith("_")}


def public_config(cfg) -> dict:
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def text_config_problems(config: dict) -> list[str]:
    """What in a text encoder's config.json transformers' Flax CLIP text model cannot run as PyTorch does.

    Every CLIPTextConfig field PyTorch's CLIPTextModel computes with is read by the Flax one too (its
    `_attn_implementation` picks an equivalent kernel, `initializer_*` only matter for fresh weights,
    `projection_dim` only for CLIPTextModelWithProjection); left are the model type and the activation."""
    out = []
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        out.append(f"model_type={model_type!r}: only CLIP text encoders ('clip_text_model') are supported")
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACT2FN:
        out.append(f"hidden_act={act!r}: the Flax CLIP has only {', '.join(map(repr, ACT2FN))}")
    return out


def check_text_config(config: dict, what: str) -> None:
    problems = text_config_problems(config)
    if problems:
        raise ModelSourceError(f"{what}: this text encoder cannot be run by transformers' Flax CLIP:\n  "
                               + "\n  ".join(problems))
