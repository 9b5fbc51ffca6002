"""Default configuration of the concept learner: the toy model and the bundled toy scene.

    python -m jaxconcept.train                                   # this config, every stage, on the toy scene
    python -m jaxconcept.train --config.mode=attention --out runs/attention_baseline
    python -m jaxconcept.train --concepts "dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background" \\
        --config.model=stabilityai/stable-diffusion-2-1-base

Every field can be overridden with --config.<field>=<value>; `configs/` holds variants.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "toy"  # "toy", "tiny", a diffusers folder or a hub id
    c.dtype = "float32"  # or "bfloat16"
    c.seed = 0
    c.mode = "em"  # "em" (masks re-estimated), "attention" (stage-1 masks kept), "user" (mask files)
    # images and their concepts: a list of {"path", "concepts": [{"token", "init_word", "kind", "mask"}]};
    # empty = the bundled toy scene (or what --concepts names)
    c.images = []
    c.resolution = 0  # images are centre-cropped and resized to this; 0 = the model's own resolution
    # "crop": the centre is kept; "pad": the whole image, padded (the padding is in no concept's mask)
    c.resize = "crop"
    # prompts: template.format(joiner.join(tokens)); the toy model was trained on captions like
    # "a red circle and a blue square on a ..."; configs/em_sd.py uses "a photo of {}" and " and "
    c.template = "a {}"
    c.joiner = " and a "
    c.flip_prob = 0.5
    c.log_every = 10

    # stage 1: tokens from init words (random without one) or a short unmasked inversion after that
    c.init = ml_collections.ConfigDict(dict(method="words", inversion_steps=100, inversion_lr=5e-3))
    # mask estimation (E-step): cross-attention over random timesteps, labels against a background level,
    # DenseCRF on the host, clean-up
    c.masks = ml_collections.ConfigDict(dict(
        num_timesteps=50,
        # query-grid heights averaged: the toy UNet's two (its 16x16 is SD's 64x64 level); SD: (16, 32)
        resolutions=(16, 8),
        background_level=0.55,  # chosen on toy validation scenes (0.35/0.45/0.55: IoU 0.42/0.54/0.63)
        crf=True,
        crf_min_iou=0.5,
        # "host": pydensecrf at image resolution; "device": an exact dense CRF in JAX (crf_exact) at
        # crf_size ("latent": the latent grid, e.g. 64x64 for SD at 512 px; "image"; or pixels per side, "96")
        crf_backend="host",
        crf_size="image",
        # EM settling (settle.py): each round's maps blended with the last round's masks by mask_prior, and
        # the CRF's rejection with hysteresis against them; final masks by a ground-truth-free rule
        # 0: measured on hard bench validation scenes 0-7 (token stage, 200 steps; 2026-12-03): priors 0 / 0.3 /
        # 0.6 took the last rounds' mask change from 0.18 to 0.014 / 0.002 (random init) but em - attention IoU
        # to -0.01 / -0.01 / +0.04 (random) and +0.21 / +0.16 / +0.09 (shape): damping settles the masks by
        # freezing the first estimate, not by improving it
        mask_prior=0.0,
        crf_hysteresis=True,
        # every E-step draws the same timesteps and noise, so the masks move only when the rows do (EM's
        # fixed point is a fixed point of the rows); with fresh noise per round the masks flicker with the draw
        # (docs/em_settling.md section 7, hard validation scenes at lr 1e-2 / attn 0.1: last-round mask change
        # 0.100 -> 0.045, em - attention IoU +0.21 -> +0.23 random init, +0.12 -> +0.12 shape init)
        same_noise=True,
    ))
    # stage 2: token optimisation with L_mask + attn_weight * L_attn, masks re-estimated every estep_every
    # lr 1e-2, attn_weight 0.3 for the toy model (SD presets: Break-a-Scene's 5e-4 and 0.01). The toy text
    # encoder's word rows are ~20-50x SD's (mean row norm 7.6, words ~1.1 apart per coordinate), so at 5e-4 its
    # tokens stay where they start (400 Adam steps move a coordinate by at most 0.2) and EM has nothing to
    # re-estimate from; with a larger lr the rows learn, and a stronger attention loss keeps each token's
    # attention on its mask while they do. Chosen on hard bench validation scenes 0-19 (token stage, bench
    # settings, same_noise; docs/em_settling.md section 7), em - attention object IoU, random / shape init:
    # lr 5e-4, attn 0.01, fresh noise (before) +0.02 / +0.13; 1e-2, 0.1: +0.23 / +0.12; 1e-2, 0.3: +0.25 / +0.18
    # (kept); 1e-2, 1.0: +0.24 / +0.16; colour init stays >= attention (+0.02)
    # vectors: per concept; 0 = one per init word ("purple+ring": two vectors starting at "purple" and at "ring",
    # so the token starts as the words do; one word or none: one vector). loss_margin (latent cells the masked
    # loss reaches past the masks) and loss_per_area (the masked loss averaged over the masked cells) were tried
    # and left off (docs/concepts_back.md)
    c.tokens = ml_collections.ConfigDict(dict(
        steps=400, estep_every=50, lr=1e-2, attn_weight=0.3, attn_resolution=16, loss_margin=0, loss_per_area=False,
        vectors=0, batch_size=1, clip=1.0, weight_decay=1e-2,
    ))
    # stage 3: tokens and UNet (text encoder optional) with the masks fixed
    # remat: "none", "full" (recompute the UNet's activations in the backward pass) or "dots" (keep matmuls);
    # optimizer: "adamw", or low-memory "adamw_bf16" / "adafactor"; checkpoint_every: joint steps between
    # checkpoints (a run stopped there resumes from the last one; 0 = only at the end)
    # lr: 3e-5 for the toy model with one vector per init word (docs/concepts_back.md: on validation scenes 1e-4
    # lost a concept in 1 of 5 scenes, 3e-5 in none); it was 1e-4 with one vector per concept. SD presets use
    # Break-a-Scene's 2e-6
    # lora_rank: 0 tunes the whole UNet; r > 0 tunes low-rank adapters (alpha / r scaled) on the frozen UNet's
    # lora_targets ("attention": q, k, v, out of every transformer block; "+ff", "+proj" add the feed-forward and
    # the blocks' in/out projections); a LoRA run writes lora.safetensors (PEFT layout) instead of unet/
    c.joint = ml_collections.ConfigDict(dict(steps=400, lr=3e-5, text_encoder=False, remat="none",
                                             optimizer="adamw", checkpoint_every=100, clip=1.0, weight_decay=1e-2,
                                             lora_rank=0, lora_alpha=4.0, lora_targets="attention"))
    # devices: a (data, fsdp) mesh over all of them; fsdp > 1 splits the joint stage's UNet, gradients and
    # optimiser state over groups of fsdp devices (and the frozen UNet too with shard_frozen)
    c.mesh = ml_collections.ConfigDict(dict(fsdp=1, shard_frozen=False, fsdp_min_size=2 ** 14))
    # optional prior preservation: a folder of class images and their prompt
    c.prior = ml_collections.ConfigDict(dict(folder="", prompt="a photo at the beach", weight=1.0))
    return c
