"""The toy Stable Diffusion v3 candidate: v2 (the shipped one) trained on for 4,000 more denoiser steps.

    python launch/train_toy.py --config configs/toy_v3.py --workdir runs/toy_v3

The v2 card's table showed its 1,500-step run still improving (logged eps-MSE falling over its thirds). This
run keeps v2's VAE (encoder and decoder: no VAE steps), its latent scale and every v2 lever (min-SNR 5, weight
average, warm-up + cosine), on fresh scenes again (seed 2: none of v1's or v2's), with a lower peak learning
rate for a continuation, and writes snapshots every 1,000 steps so that the gain per step can be read off.
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location("toy_pretrain", os.path.join(os.path.dirname(__file__), "toy_pretrain.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.init_from = "toy"  # the shipped v2
    c.seed = 2  # fresh scenes: seeds 2 * 1_000_003 + i
    c.num_scenes = 16384
    c.checkpoint_every = 250
    c.vae.update(steps=0, decoder_only=True)  # keep v2's VAE as it is
    c.denoise.update(steps=4000, lr=2e-4, warmup=100, min_snr_gamma=5.0, ema_decay=0.999, snapshot_every=1000)
    return c
