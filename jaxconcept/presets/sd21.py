"""Stable Diffusion 2.1 (`stabilityai/stable-diffusion-2-1`): 768 px images, latent 96x96, v-prediction (read from
the model's scheduler config: trained on the v target, sampled as a v model).

Attention layers: the E-step averages the cross-attention maps of the 24x24 layers (down_blocks_2, up_blocks_1)
and the 48x48 layers (down_blocks_1, up_blocks_2); the attention loss reads the 24x24 ones (the same layers as
16x16 and 32x32 at 512 px).

    python -m jaxconcept.train --config sd21 --out runs/dog --concepts "dog.jpg:<dog>=dog,<room>=room/background"
"""

from jaxconcept.presets import stable_diffusion


def get_config():
    return stable_diffusion("stabilityai/stable-diffusion-2-1", 768)
