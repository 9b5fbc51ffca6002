"""The toy Stable Diffusion v2: a warm start from v1 with the levers that helped.

    python launch/train_toy.py --config configs/toy_pretrain.py --workdir runs/toy_v1    # v1 from scratch
    python launch/train_toy.py --config configs/toy_v2.py --workdir runs/toy_v2          # v2 from runs/toy_v1
    python launch/train_toy.py --config configs/toy_v2.py --config.init_from=path/to/v1 ...   # v1 elsewhere

v2 keeps v1's encoder, so its latent space and latent scale, and:
  1. fine-tunes the VAE decoder alone on the encoder's posterior means (v1's decoder saw latents with noise
     of std ~0.2 against a latent std of 1: its KL weight, applied to a per-image sum against a per-pixel mean
     reconstruction, was ~10^4 times SD's relative weight; this is where the rainbow specks at objects'
     top-left edges came from);
  2. continues the text encoder and UNet on fresh scenes (another seed: 16,384 scenes none of which v1 saw),
     min-SNR-5 loss weighting, warm-up + cosine decay, and ships the exponential moving average of the weights.
The model card (jaxconcept/toy/weights/README.md) has the table of measured levers.
"""

import os

from jaxconcept.toy import recipe_config


def get_config():
    c = recipe_config(os.path.join(os.path.dirname(__file__), "toy_pretrain.py"))
    c.init_from = "runs/toy_v1/model"
    c.seed = 1  # fresh scenes: seeds 1_000_003 + i, disjoint from v1's 0..4095
    c.num_scenes = 16384
    c.checkpoint_every = 250
    c.vae.update(steps=1000, lr=5e-4, warmup=50, decoder_only=True, eval_every=250)
    c.denoise.update(steps=1500, lr=3e-4, warmup=100, min_snr_gamma=5.0, ema_decay=0.999, snapshot_every=0)
    return c
