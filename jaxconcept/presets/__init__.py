"""Ready configurations of the learner for real Stable Diffusion models, usable from any working folder:

    python -m jaxconcept.train --config sd15 --out runs/dog --concepts "dog.jpg:<dog>=dog,<room>=room/background"

| name        | model (hub id)                                | image px | latent | E-step maps | attention loss | predicts |
|-------------|-----------------------------------------------|----------|--------|-------------|----------------|----------|
| `sd15`      | stable-diffusion-v1-5/stable-diffusion-v1-5   | 512      | 64     | 16x16, 32x32 | 16x16         | epsilon  |
| `sd21_base` | stabilityai/stable-diffusion-2-1-base         | 512      | 64     | 16x16, 32x32 | 16x16         | epsilon  |
| `sd21`      | stabilityai/stable-diffusion-2-1              | 768      | 96     | 24x24, 48x48 | 24x24         | v        |
| `sdxl`      | stabilityai/stable-diffusion-xl-base-1.0      | 1024     | 128    | 32x32, 64x64 | 32x32         | epsilon  |

The grids are query-grid heights of the UNet's cross-attention layers (`masks.resolutions`,
`tokens.attn_resolution`): at every resolution the same layers, those of the second and third UNet levels
(docs/method.md §4 skips the finest level, whose maps are noisy, and the coarsest, 8x8 at 512 px):

    E-step    down_blocks_1 (2 layers) and up_blocks_2 (3) at latent/2;  down_blocks_2 (2) and up_blocks_1 (3) at latent/4
    loss      down_blocks_2 and up_blocks_1 (latent/4: Break-a-Scene's 16x16 at 512 px)

SDXL (no cross-attention at its finest level, three levels) by the same rule: latent/4 is its 10-block level
(down_blocks_2, mid_block, up_blocks_0: 60 layers), latent/2 its 2-block level (down_blocks_1, up_blocks_1: 10);
see presets/sdxl.py for why, and for what could not be checked (no real SDXL weights here).

Every preset tunes LoRA adapters in the joint stage (`joint.lora_rank=4` on the attention projections, lr 1e-4),
writing `lora.safetensors` (PyTorch diffusers' `load_lora_weights` reads it) instead of a 3.4 GB UNet;
`--config.joint.lora_rank=0 --config.joint.lr=2e-6` is Break-a-Scene's full UNet tuning. They also compute
self-attention in chunks (`memory_efficient_attention`) and the E-step 10 timesteps per UNet call
(`masks.timestep_chunk`): the same values, in a fraction of the memory (`docs/memory.md`).

What the UNet predicts is read from the model's own scheduler config (`prediction_type`), not set here: SD 2.1
at 768 px is trained on the v target and sampled as a v model. `--config NAME` takes these names (or
`NAME.py`); a path to a config file works as before. Any field can still be overridden
(`--config.model=/path/to/local/sd15-folder`).
"""

from __future__ import annotations

import os

from ..errors import JaxconceptError

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("sd15", "sd21_base", "sd21", "sdxl")
# query-grid height -> UNet blocks holding the cross-attention layers at that grid, for SD 1.x / 2.x
SD_LAYERS_AT = {2: ("down_blocks_1", "up_blocks_2"), 4: ("down_blocks_2", "up_blocks_1")}  # latent / factor
# the same for SDXL: its middle block runs at latent/4 too, and its finest level has no cross-attention
SDXL_LAYERS_AT = {2: ("down_blocks_1", "up_blocks_1"), 4: ("down_blocks_2", "mid_block", "up_blocks_0")}


def stable_diffusion(model: str, resolution: int):
    """The learner's config for an SD 1.x/2.x or SDXL model at `resolution` px: Break-a-Scene's prompts, E-step maps
    at latent/4 and latent/2, attention loss at latent/4 (see the module docstring)."""
    from ..config import get_config

    latent = resolution // 8
    c = get_config()
    c.model = model
    c.resolution = resolution
    c.template, c.joiner = "a photo of {}", " and "  # Break-a-Scene's prompts
    c.masks.resolutions = (latent // 4, latent // 2)
    c.masks.background_level = 0.45  # middle of DiffuMask's 0.35-0.55
    c.tokens.attn_resolution = latent // 4
    c.tokens.lr, c.tokens.attn_weight = 5e-4, 0.01  # Break-a-Scene's for SD (the toy's 1e-2, 0.3 fit its rows' scale)
    # the joint stage tunes LoRA adapters (rank 4 on every attention projection) instead of the whole UNet: it
    # fits where users train (docs/memory.md) and a run writes ~3 MB instead of 3.4 GB; lr 1e-4 is diffusers'
    # LoRA DreamBooth rate, not measured on these models here (no SD weights can be fetched in our CI). For
    # Break-a-Scene's full tuning: --config.joint.lora_rank=0 --config.joint.lr=2e-6
    c.joint.lora_rank, c.joint.lora_alpha, c.joint.lr = 4, 4.0, 1e-4
    # every timestep weighs alike, as in Break-a-Scene: the toy's min-SNR 5 matches how the toy model was trained,
    # which SD was not (docs/concepts_back.md section 21); --config.min_snr_gamma=5 to try it
    c.min_snr_gamma = 0.0
    # the outside loss (the toy's 0.3, docs/concepts_back.md section 25) costs one more UNet pass per step and was
    # measured on the toy model only: off, as in Break-a-Scene; --config.tokens.outside_weight=0.3 to try it
    c.tokens.outside_weight = 0.0
    # the same values in a fraction of the memory (docs/memory.md, SD 1.5: token step 15.2 -> 8.2 GiB, E-step
    # 34.6 -> 4.7 GiB, LoRA joint step 16.9 -> 8.4 GiB): self-attention in chunks, the E-step 10 timesteps a call
    c.memory_efficient_attention, c.masks.timestep_chunk = True, 10
    # the context regulariser (off by default, docs/concepts_back.md section 11), when turned on with
    # --config.tokens.context_weight=..., reads phrases of SD's world, not the toy's
    c.tokens.context_phrases = "on the beach|in the snow|on a city street"
    c.log_every = 25
    return c


def path(name: str) -> str | None:
    """The file of a preset named `name` (with or without ".py"); None if there is none."""
    stem = name[:-3] if name.endswith(".py") else name
    return os.path.join(HERE, f"{stem}.py") if stem in NAMES else None


def resolve_config_arg(argv: list[str]) -> list[str]:
    """argv with `--config NAME` / `--config=NAME` of a preset replaced by its file's path. A value that is an
    existing file is left alone; one that is neither is a JaxconceptError naming the presets."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + _resolve(arg[len("--config="):])
    return out


def _resolve(value: str) -> str:
    file, sep, args = value.partition(":")  # ml_collections: "file.py:arguments"
    if os.path.isfile(file):
        return value
    preset = path(file)
    if preset is None:
        raise JaxconceptError(f"--config {value!r} is neither a config file nor a preset; presets: "
                              f"{', '.join(NAMES)} (see jaxconcept/presets/__init__.py), or give a path to a "
                              "config file such as configs/em_toy.py.")
    return preset + sep + args
