"""Stable Diffusion 1.5 (the community mirror `stable-diffusion-v1-5/stable-diffusion-v1-5`): 512 px images,
latent 64x64, epsilon prediction.

Attention layers: the E-step averages the cross-attention maps of the 16x16 layers (down_blocks_2, up_blocks_1)
and the 32x32 layers (down_blocks_1, up_blocks_2); the attention loss reads the 16x16 ones.

    python -m jaxconcept.train --config sd15 --out runs/dog --concepts "dog.jpg:<dog>=dog,<room>=room/background"
"""

from jaxconcept.presets import stable_diffusion


def get_config():
    return stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5", 512)
