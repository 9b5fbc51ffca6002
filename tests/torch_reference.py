"""Tiny PyTorch diffusers / transformers models with random weights, saved as a diffusers folder.

The reference every Stable Diffusion user trusts: our loader reads what `save_pretrained` writes, and
our outputs must match these models' outputs.
"""

import os

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from jaxconcept.model import loading as jc_model


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random everything, norms and biases included, so a mis-mapped scale or bias cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def build_folder(folder: str, seed: int = 0):
    """Write tiny SD components into `folder`; returns the PyTorch modules."""
    torch.manual_seed(seed)
    tokenizer = jc_model.word_tokenizer()
    unet = UNet2DConditionModel(**jc_model.TINY_UNET).eval()
    vae = AutoencoderKL(**jc_model.TINY_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(
        **jc_model.TINY_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    for i, m in enumerate((unet, vae, text)):
        _perturb(m, seed + i)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    text.save_pretrained(os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    DDIMScheduler(**jc_model.SD_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    return unet, vae, text


def build_sdxl_folder(folder: str, seed: int = 0):
    """Write the tiny SDXL's components (PyTorch weights) into `folder`; returns the PyTorch modules and the
    tokenizers as (unet, vae, text, text_2, tokenizer, tokenizer_2)."""
    torch.manual_seed(seed)
    tokenizer = jc_model.word_tokenizer()
    tokenizer_2 = jc_model.word_tokenizer(pad_token="!")
    unet = UNet2DConditionModel(**jc_model.TINY_SDXL_UNET).eval()
    vae = AutoencoderKL(**jc_model.TINY_SDXL_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**jc_model.text_config_for(tokenizer, jc_model.TINY_TEXT, 77))).eval()
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        **jc_model.text_config_for(tokenizer_2, jc_model.TINY_SDXL_TEXT_2, 77))).eval()
    for i, m in enumerate((unet, vae, text, text_2)):
        _perturb(m, seed + i)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text), ("text_encoder_2", text_2),
                    ("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        m.save_pretrained(os.path.join(folder, name))
    DDIMScheduler(**jc_model.SD_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    return unet, vae, text, text_2, tokenizer, tokenizer_2


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))
