"""The toy Stable Diffusion v3: v2 trained on for 4,000 more denoiser steps (v4, configs/toy_v4.py, builds on it).

    python launch/train_toy.py --config configs/toy_v3.py --workdir runs/toy_v3

The v2 card's table showed its 1,500-step run still improving (logged eps-MSE falling over its thirds). This
run is v2's recipe (configs/toy_v2.py: min-SNR 5, weight average, warm-up + cosine, 16,384 scenes) started from
v2, with what differs spelled out below: no VAE steps (v2's encoder, decoder and latent scale kept),
fresh scenes again (seed 2: none of v1's or v2's), more steps at a lower peak learning rate for a continuation,
and snapshots every 1,000 steps so that the gain per step can be read off.
"""

import os

from jaxconcept.toy import recipe_config


def get_config():
    c = recipe_config(os.path.join(os.path.dirname(__file__), "toy_v2.py"))
    c.init_from = "runs/toy_v2/model"  # v2 (shipped as "toy" when v3 was trained; "toy" is now v4)
    c.seed = 2  # fresh scenes: seeds 2 * 1_000_003 + i
    c.vae.update(steps=0, eval_every=0)  # keep v2's VAE as it is; its held-out PSNR logged once
    c.denoise.update(steps=4000, lr=2e-4, snapshot_every=1000)
    return c
