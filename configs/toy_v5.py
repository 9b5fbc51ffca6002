"""The toy Stable Diffusion v5: v4 with its decoder trained on, the encoder, latent space and denoiser kept.

    cp -r jaxconcept/toy/weights runs/toy_v4/model   # v4, as shipped before v5 (or from git history)
    python launch/train_toy.py --config configs/toy_v5.py --workdir runs/toy_v5

v4's VAE run (encoder + decoder, KL 1e-10, 6,000 steps) was still rising when its cosine schedule ended
(27.6 -> 27.9 dB held-out PSNR over its last 1,500 steps, 28.3 dB on the evaluation seeds). v4's encoder is
sharp (it trained at SD's relative KL weight), so this run trains the decoder alone: the posterior means, the
latent scale and so the denoiser (text encoder + UNet) stay exactly as shipped in v4, and the sample gates
change only through the sharper decoder. Fresh scenes (seed 4: none of v1-v4's).
"""

import os

from jaxconcept.toy import recipe_config


def get_config():
    c = recipe_config(os.path.join(os.path.dirname(__file__), "toy_v4.py"))
    c.init_from = "runs/toy_v4/model"  # v4 (shipped as "toy" when v5 was trained)
    c.seed = 4  # fresh scenes: seeds 4 * 1_000_003 + i
    c.vae.update(steps=8000, lr=3e-4, warmup=200, decoder_only=True, eval_every=1000)
    c.denoise.update(steps=0, snapshot_every=0)  # the denoiser is v4's, untouched
    return c
