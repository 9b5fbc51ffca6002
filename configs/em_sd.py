"""The EM learner on a real Stable Diffusion (hub id or local diffusers folder), Break-a-Scene's settings: the
`sd21_base` preset (512 px; jaxconcept/presets/ also has `sd15` and `sd21` at 768 px, usable from any folder as
`--config sd15`).

    python -m jaxconcept.train --config configs/em_sd.py --out runs/dog \
        --concepts "dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background"
    python -m jaxconcept.train --config configs/em_sd.py --config.model=/path/to/sd-folder --config.dtype=bfloat16 ...

On an accelerator whose host CPU is weak (Colab TPU), the E-step's CRF can run on the device at the latent
grid: --config.masks.crf_backend=device --config.masks.crf_size=latent (64x64 instead of the host's 512x512;
mask edges are then placed to about one latent cell, 8 px).
"""

from jaxconcept.presets.sd21_base import get_config  # noqa: F401
