"""Tiny PyTorch diffusers / transformers models with random weights, saved as a diffusers folder.

The reference every Stable Diffusion user trusts: our loader reads what `save_pretrained` writes, and
our outputs must match these models' outputs.
"""

import os
import re

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


class RecordingProcessor:
    """diffusers' plain attention, recording cross-attention probabilities (B x heads x Q x T)."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch, num_q, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        if encoder_hidden_states is not None:
            self.store[self.name] = probs.reshape(batch, attn.heads, num_q, -1).detach().numpy()
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def record_cross_attention(unet: UNet2DConditionModel) -> dict:
    """Install recording processors; returns the dict they fill, keyed by our layer paths."""
    store: dict = {}
    procs = {}
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        ours = re.sub(r"(\w+)\.(\d+)", r"\1_\2", layer).replace(".", "/")
        procs[name] = RecordingProcessor(store, ours)
    unet.set_attn_processor(procs)
    return store


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))
