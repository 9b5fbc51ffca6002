"""Pre-training the toy Stable Diffusion from scratch on generated scenes.

    python launch/train_toy.py --config configs/toy_pretrain.py --workdir runs/toy_pretrain
    python launch/train_toy.py --config configs/toy_pretrain.py --config.denoise.steps=2000   # shorter

Re-running on the same --workdir resumes from the latest checkpoint of each phase.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.arch = "toy"  # "toy" (64 px, latent 16x16) or "tiny" (the 32 px test model)
    c.seed = 0
    c.num_scenes = 4096
    c.init_from = ""  # "" = seeded random weights; a toy model folder (or "toy") = a warm start from it
    c.unet_widths = ()  # () = the architecture's own (toy: 32/64/64); multiples of 32
    c.batch_size = 16  # denoising; about 0.8 s/step for the toy UNet + text encoder on 2 cores
    c.checkpoint_every = 250
    c.log_every = 50
    # each 64 px image is 4096 pixels of signal: small VAE batches suffice (0.7 s/step at 8 on 2 cores)
    c.vae = ml_collections.ConfigDict(dict(steps=600, batch_size=8, lr=1e-3, warmup=50, kl_weight=1e-6,
                                         eval_every=0, decoder_only=False))  # eval_every > 0: held-out PSNR every N steps;
    # decoder_only: train the decoder alone on the frozen encoder's means (keeps the latent space)
    c.denoise = ml_collections.ConfigDict(dict(
        steps=6000, lr=1e-3, warmup=200, cfg_dropout=0.1,
        # Attention pull of the words naming each object (colour, pattern, shape) towards its mask.
        # Plain training (0.0) and 0.05 on shape words alone levelled off near IoU 0.27 with every shape
        # word covering all objects; this weight teaches object-vs-object discrimination.
        aux_weight=0.5,
        aux_max_timestep=800,  # no pull at higher noise, where nothing is left to localise
        aux_resolutions=(16, 8),
        min_snr_gamma=0.0,  # > 0: min-SNR-gamma weighting of the eps loss (5 is the paper's value)
        ema_decay=0.0,  # > 0: ship an exponential moving average of the weights (model_raw/: the last ones)
        snapshot_every=0,  # > 0: write snapshots/step_N (and step_N_raw) every N steps, for ablations
    ))
    return c
