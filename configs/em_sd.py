"""The EM learner on a real Stable Diffusion (hub id or local diffusers folder), Break-a-Scene's settings.

    python -m jaxconcept.train --config configs/em_sd.py --out runs/dog \
        --concepts "dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background"
    python -m jaxconcept.train --config configs/em_sd.py --config.model=/path/to/sd-folder --config.dtype=bfloat16 ...

On an accelerator whose host CPU is weak (Colab TPU), the E-step's CRF can run on the device at the latent
grid: --config.masks.crf_backend=device --config.masks.crf_size=latent (64x64 instead of the host's 512x512;
mask edges are then placed to about one latent cell, 8 px).
"""

from jaxconcept.config import get_config as _default


def get_config():
    c = _default()
    c.model = "stabilityai/stable-diffusion-2-1-base"  # 512 px, latent 64: attention-loss maps at 16x16
    c.template, c.joiner = "a photo of {}", " and "  # Break-a-Scene's prompts
    c.masks.resolutions = (16, 32)  # DESIGN §3: skip 8x8, average 16 and 32
    c.masks.background_level = 0.45  # middle of DiffuMask's 0.35-0.55
    c.tokens.attn_resolution = 16
    c.log_every = 25
    return c
