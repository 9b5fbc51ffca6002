"""What the speed and memory benchmarks run on: the configs of every benchmarked model without weights (SD 1.5,
SD 2.1, SDXL; the tiny ones are `model.loading`'s), the speed benchmark's architectures with their layer choices
(`CONFIGS`: the tiny model, SD 1.5, the tiny SDXL-shaped model, SDXL base; the memory benchmark's are its
`PRESETS`, built from the same configs), the steps' settings, and a prepared workload (a synthetic image with three
concepts, the learner's own data) that ours and the PyTorch reference (`torch_reference.py`) share."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import config
from ..em.prepare import prepare
from ..em.stages import latent_masks
from ..model import adapter, conditioning, loading as model, tokens
from ..parallel import sharding
from ..runio import images, inputs
from ..toy import scene

# ------------------------------------------------------------------------------------------ configurations

SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768,
)

SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)


# SDXL base 1.0: CLIP ViT-L's text tower (all 12 layers run; SDXL reads the penultimate states) and OpenCLIP
# ViT-bigG's with its projection (32 layers, 1280 wide), a three-level UNet (no cross-attention at the finest, 2 and
# 10 transformer blocks at the others) with 2048-wide cross-attention and the text_time added conditioning
SDXL_TEXT = dict(SD15_TEXT)  # CLIP ViT-L/14's text tower, as SD 1.5's
SDXL_TEXT_2 = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)

# SD 2.x: OpenCLIP ViT-H/14's text tower (23 of its 24 layers: SD 2 reads the penultimate one) and a UNet with
# per-level head widths of 64 (5, 10, 20, 20 heads), 1024-wide cross-attention and linear projections
SD21_TEXT = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
)
SD21_UNET = dict(SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True)

SD_VOCAB = 49408  # CLIP's BPE vocabulary (SD 1.x and 2.x, both of SDXL's tokenizers)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A model architecture to benchmark, with the layer choices of the steps as *latent downsampling
    factors*, so that a --resolution override keeps the same layers (SD 1.5 at 512 px: latent 64, attention
    loss at 64 / 4 = 16, E-step maps at 16 and 32)."""

    name: str
    text: dict
    unet: dict
    vae: dict
    words: tuple[str, ...] = model.TINY_WORDS
    vocab_size: int = 0  # pad the token table to this many rows (0: the tokenizer's own size)
    attn_factor: int = 4  # attention loss at latent / attn_factor (Break-a-Scene: the 16x16 layers)
    estep_factors: tuple[int, ...] = (4, 2)  # E-step maps at latent / f for each f (docs/method.md §4: 16 and 32)
    estep_timesteps: int = 50  # T of the E-step's attention pass
    text_2: dict | None = None  # SDXL: the second text encoder (with the projection of its pooled state)

    def build(self, dtype=jnp.float32, seed: int = 0) -> model.ModelBundle:
        """The bundle with seeded random weights (for "tiny" this is exactly `model.tiny_model()`, for "tiny-sdxl"
        `model.tiny_sdxl_model()`)."""
        return model.build_random(self.words, model.Architecture(self.text, self.unet, self.vae, self.text_2),
                                  dtype=dtype, seed=seed, source=self.name)

    def resolution(self, resolution: int = 0) -> int:
        return resolution or self.unet["sample_size"] * 2 ** (len(self.vae["block_out_channels"]) - 1)


CONFIGS: dict[str, BenchConfig] = {
    # the learner's own defaults on the tiny model: loss at grid 16 (= latent), E-step at 16 and 8
    "tiny": BenchConfig("tiny", model.TINY_TEXT, model.TINY_UNET, model.TINY_VAE, attn_factor=1,
                        estep_factors=(1, 2), estep_timesteps=8),
    "sd15": BenchConfig("sd15", SD15_TEXT, SD15_UNET, SD15_VAE, vocab_size=SD_VOCAB, attn_factor=4,
                        estep_factors=(4, 2), estep_timesteps=50),
    # SDXL's structure in miniature (`model.tiny_sdxl_model()`, 32 px): cross-attention at 8x8 only, so the loss and
    # the E-step at latent / 2
    "tiny-sdxl": BenchConfig("tiny-sdxl", model.TINY_TEXT, model.TINY_SDXL_UNET, model.TINY_SDXL_VAE, attn_factor=2,
                             estep_factors=(2,), estep_timesteps=8, text_2=model.TINY_SDXL_TEXT_2),
    # SDXL base 1.0 at 1024 px, the `sdxl` preset's layers: the loss at 32x32 (latent / 4), the E-step at 32 and 64
    "sdxl": BenchConfig("sdxl", SDXL_TEXT, SDXL_UNET, SDXL_VAE, vocab_size=49408, attn_factor=4, estep_factors=(4, 2),
                        estep_timesteps=50, text_2=SDXL_TEXT_2),
}

STEPS = ("token", "joint", "joint_lora", "e_attn", "e_crf", "e_step", "sample")
# what --steps selects (estep: e_attn, e_crf, e_step), in the order they run: the LoRA joint step last, since the
# reference adds peft adapters to its UNet for it
GROUPS = ("token", "estep", "sample", "joint", "joint_lora")
LABELS = {"token": "token step", "joint": "joint step", "joint_lora": "joint step, LoRA r{R}",
          "e_attn": "E-step attention (T={T})", "e_crf": "E-step CRF ({C}, shared)", "e_step": "E-step total",
          "sample": "sample ({S} DDIM steps, CFG)"}
ESTEP_EVERY = 50
TOKEN_LR, JOINT_LR, CLIP, WEIGHT_DECAY, ATTN_WEIGHT, GUIDANCE = 5e-4, 2e-6, 1.0, 1e-2, 0.01, 7.5
LORA_RANK, LORA_ALPHA, LORA_LR = 4, 4.0, 1e-4  # the SD presets' LoRA joint stage
STAGE_LR = {"token": TOKEN_LR, "joint": JOINT_LR, "joint_lora": LORA_LR}
BACKGROUND_LEVEL = 0.55
# docs/method.md §7, SD 1.5 at 512 px, batch 1 (TFLOP)
SD15_TFLOP = {"unet_forward": 0.80, "unet_fwd_bwd_all": 2.39, "unet_fwd_bwd_text": 1.67, "sample_50": 82.0}
# bf16 dense peaks (FLOP/s) by device kind: docs/method.md §7's measured H100 figure, vendors' figures otherwise
QUOTED_BF16_PEAK = {"H100": 790e12, "H200": 790e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
CONCEPTS = (("<c1>", "dog", "object"), ("<c2>", "cat", "object"), ("<bg>", "background", "background"))


# ------------------------------------------------------------------------------------------ inputs


def synthetic_scene(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image (size x size x 3 uint8) of a two-object toy scene, and its concept masks (C x size x size
    bool: the two objects and the background), a partition like the E-step's."""
    sc = scene.make_scene(seed, size, num_objects=2)
    names = [o.name for o in sc.objects] + ["background"]
    return sc.image, np.stack([np.asarray(sc.masks[n], bool) for n in names])


def write_scene(folder: str, size: int, seed: int = 0) -> tuple[inputs.ImageSpec, np.ndarray]:
    image, masks_CxHxW = synthetic_scene(size, seed)
    path = os.path.join(folder, "scene.png")
    images.save_image(image, path)
    spec = inputs.ImageSpec(path, tuple(inputs.ConceptSpec(t, w, k) for t, w, k in CONCEPTS))
    return spec, masks_CxHxW


def pad_vocab(bundle: model.ModelBundle, vocab_size: int) -> model.ModelBundle:
    """The bundle with its token table (SDXL: both) padded to `vocab_size` rows (rows never used; real CLIP size)."""
    modules, params = {}, {}
    for name, text in conditioning.text_params(bundle.params).items():
        table = tokens.embedding_table(text)
        if vocab_size <= table.shape[0]:
            continue
        extra = jnp.asarray(np.random.default_rng(1).standard_normal((vocab_size - table.shape[0], table.shape[1]),
                                                                      np.float32), table.dtype)
        params[name] = tokens.with_embedding_table(text, jnp.concatenate([table, extra]))
        modules[name] = adapter.text_encoder_with_vocab(getattr(bundle, name), vocab_size)
    return bundle.replace(params={**bundle.params, **params}, **modules) if params else bundle


def learner_config(resolution: int):
    c = config.get_config()
    c.resolution, c.template, c.joiner = resolution, "a photo of {}", " and "
    return c


@dataclasses.dataclass(frozen=True)
class Workload:
    """What both implementations run on: shapes and host copies of the prepared data."""

    bench: BenchConfig
    resolution: int
    latent: int
    batch: int
    timesteps: int
    sample_steps: int
    vocab_size: int
    concept_ids: tuple[int, ...]
    table: dict  # numpy: ids_PxT, positions_PxC, image_P, weight_P
    latents_Ix2xZxhxw: np.ndarray
    masks_Cxhxw: np.ndarray  # float32, latent size
    image_u8: np.ndarray
    image_ids_T: np.ndarray
    image_positions_C: np.ndarray
    kinds: tuple[str, ...]
    sample_ids_2xT: np.ndarray  # uncond, cond

    @property
    def time_ids_K(self) -> np.ndarray | None:
        """SDXL's micro-conditioning of the workload's (square, uncropped) image; None for SD 1/2."""
        return None if self.bench.text_2 is None else conditioning.time_ids((self.resolution, self.resolution))

    @property
    def attn_grid(self) -> int:
        return self.latent // self.bench.attn_factor

    @property
    def estep_grids(self) -> tuple[int, ...]:
        return tuple(self.latent // f for f in self.bench.estep_factors)


def prepare_ours(bench: BenchConfig, resolution: int, dtype, batch: int, timesteps: int, sample_steps: int,
                 folder: str, seed: int = 0):
    """(learner Setup, Workload): the model with 3 concept tokens, a synthetic image, random masks."""
    res = bench.resolution(resolution)
    spec, masks_CxHxW = write_scene(folder, res, seed)
    setup = prepare(learner_config(res), [spec], bench.build(dtype, seed))
    if bench.vocab_size:
        setup = dataclasses.replace(setup, bundle=pad_vocab(setup.bundle, bench.vocab_size))
    b = setup.bundle
    t = setup.run_data["table"]
    weight_P = np.exp(np.asarray(t["logw_P"], np.float64))
    lat_masks = np.asarray(latent_masks(masks_CxHxW, setup.latent_hw, sharding.make_mesh(jax.devices()[:1])))
    names = [c for c, _, _ in CONCEPTS]
    ids = tokens.tokenize(b.tokenizer, ["", "a photo of " + " and ".join(names[:2])], b.max_length)
    work = Workload(
        bench=bench, resolution=res, latent=setup.latent_hw[0], batch=batch, timesteps=timesteps,
        sample_steps=sample_steps, vocab_size=int(tokens.embedding_table(b.params["text_encoder"]).shape[0]),
        concept_ids=tuple(setup.concepts.ids),
        table={"ids_PxT": np.asarray(t["ids_PxT"]), "positions_PxC": np.asarray(t["positions_PxC"]),
               "image_P": np.asarray(t["image_P"]), "weight_P": weight_P / weight_P.sum()},
        latents_Ix2xZxhxw=np.asarray(setup.run_data["latents"], np.float32), masks_Cxhxw=lat_masks,
        image_u8=setup.images_u8[0], image_ids_T=setup.image_ids_IxT[0],
        image_positions_C=setup.image_positions_IxC[0], kinds=tuple(setup.inputs.kinds), sample_ids_2xT=ids)
    return setup, work


