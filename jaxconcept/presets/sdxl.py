"""Stable Diffusion XL base 1.0 (`stabilityai/stable-diffusion-xl-base-1.0`): 1024 px images, latent 128x128,
epsilon prediction (read from the model's scheduler config), both text encoders (each concept token has a row in
each table, 768 + 1280 wide).

Attention layers: the E-step averages the cross-attention maps of the 32x32 layers (down_blocks_2, mid_block and
up_blocks_0: 20 + 10 + 30 transformer blocks) and the 64x64 layers (down_blocks_1 and up_blocks_1: 4 + 6); the
attention loss reads the 32x32 ones.

Why: the rule of the SD presets, by grid and not by block name. Break-a-Scene's loss reads SD's 16x16 layers at
512 px, latent/4, and the E-step reads latent/4 and latent/2 (docs/method.md §4 skips the finest level, whose maps
are noisy, and SD's coarsest, 8x8). SDXL has no cross-attention at its finest level (128x128, plain resnet
blocks) and only three levels, so latent/4 = 32x32 is its coarsest, 10-block level (its middle block included,
which also runs at 32x32) and latent/2 = 64x64 its 2-block level: the E-step reads every cross-attention layer
SDXL has (70), the loss the 60 deepest. The grids are also the two that SD's own 16x16 and 32x32 correspond to at
SDXL's size (Break-a-Scene's 16x16 is 1/32 of the image; 32x32 is 1/32 of 1024 px). Not checked on SDXL's maps:
no SDXL weights can be downloaded where this project is tested, so `show_attention` could only be run on the
tiny SDXL-shaped model (tests/test_sdxl.py), whose maps mean nothing. Read them on the real model before relying
on the choice (`python -m jaxconcept.show_attention --model stabilityai/stable-diffusion-xl-base-1.0 ...`);
`--config.masks.resolutions=32` keeps the E-step on the 10-block level alone, the cheaper choice if the 64x64
maps prove noisy.

Break-a-Scene's settings for SD are inherited unchanged (prompts "a photo of {} and {}", token lr 5e-4, attention
loss weight 0.01), and the joint stage tunes rank-4 LoRA adapters (lr 1e-4) as in the SD presets.

    python -m jaxconcept.train --config sdxl --out runs/dog --concepts "dog.jpg:<dog>=dog,<room>=room/background"
"""

from jaxconcept.presets import stable_diffusion


def get_config():
    return stable_diffusion("stabilityai/stable-diffusion-xl-base-1.0", 1024)
