"""The toy Stable Diffusion v6: v5 with its decoder trained on again (a second cosine cycle), all else v5's.

    python launch/train_toy.py --config configs/toy_v6.py --workdir runs/toy_v6   # needs runs/toy_v5/model

v5 (decoder alone from v4, 8,000 steps, lr 3e-4 cosine) ended at 29.30 dB held-out PSNR on the validation seeds
and 29.81 dB on the evaluation seeds, still rising (+0.03 dB over its last 1,000 steps at the schedule's
tail). This run restarts the schedule at half v5's peak rate on fresh scenes (seed 5: none of v1-v5's), so
the encoder, the latent scale and the denoiser (text encoder + UNet) stay exactly v4's.
"""

import os

from jaxconcept.toy import recipe_config


def get_config():
    c = recipe_config(os.path.join(os.path.dirname(__file__), "toy_v5.py"))
    c.init_from = "runs/toy_v5/model"
    c.seed = 5  # fresh scenes: seeds 5 * 1_000_003 + i
    c.vae.update(steps=8000, lr=1.5e-4, warmup=100, decoder_only=True, eval_every=1000)
    return c
