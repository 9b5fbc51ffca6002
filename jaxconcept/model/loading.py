"""Loading a Stable Diffusion model into a small immutable bundle of Flax modules and params.

`load_model(source)` takes
  * a named configuration: "tiny" and "tiny-sdxl" (seeded random weights, for tests and quick runs);
  * a local diffusers-layout folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/, and text_encoder_2/
    tokenizer_2/ for SDXL) with Flax weights (`*.msgpack`) or PyTorch weights (`*.safetensors`, converted
    without torch);
  * a Hugging Face hub id, downloaded (only the files needed) or taken from the local cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from . import adapter, bpe, convert, diffusion
from ..errors import ModelSourceError

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # an SDXL folder's second text encoder

# Stable Diffusion's training noise schedule, used when a folder has no scheduler config.
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """Modules (static, hashable) and params (a pytree) of one Stable Diffusion model.

    SDXL adds a second text encoder (with the projection of its pooled state) and its tokenizer, with params
    under "text_encoder_2"; for SD 1/2 they are None and absent. `model/conditioning.py` encodes prompts for
    either."""

    tokenizer: Any
    text_encoder: Any  # flax.linen.Module: input_ids -> hidden states
    unet: Any  # flax.linen.Module: (latents NCHW, t, context) -> eps
    vae: Any  # flax.linen.Module with .encode / .decode
    scheduler: Any  # diffusers Flax DDPM scheduler (training noise schedule)
    scheduler_state: Any
    params: dict  # {"text_encoder": ..., "unet": ..., "vae": ...}
    dtype: Any = jnp.float32
    source: str = ""
    scheduler_config: dict = dataclasses.field(default_factory=dict)  # as shipped: inference schedulers read it
    text_encoder_2: Any = None  # SDXL: flax.linen.Module: input_ids -> hidden states, projected pooled state
    tokenizer_2: Any = None  # SDXL: the second encoder's tokenizer (the first's vocabulary, its own padding)
    # SDXL pipelines' model_index.json entry: without a negative prompt, guidance's unconditional branch gets zero
    # text states and pooled embedding (SDXL base: true, the pipelines' default) instead of the empty prompt's
    force_zeros_for_empty_prompt: bool = False

    def replace(self, **changes) -> "ModelBundle":
        return dataclasses.replace(self, **changes)

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and SDXL's added (pooled text, time ids) conditioning."""
        return self.text_encoder_2 is not None

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was trained at."""
        return int(self.unet.config.sample_size) * self.vae_factor

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" (the noise) or "v_prediction" (SD 2.x at 768 px), from its scheduler."""
        return str(self.scheduler.config.prediction_type)

    @property
    def max_length(self) -> int:
        """Tokens per prompt, including the start and end tokens."""
        return int(self.text_encoder.config.max_position_embeddings)


def as_dtype(dtype) -> Any:
    names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ModelSourceError(f"unknown dtype {dtype!r}: use 'float32' or 'bfloat16'")
        return names[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ModelSourceError(f"unsupported dtype {dtype}: use float32 or bfloat16")
    return dtype


def cast_floating(tree, dtype):
    """Cast floating leaves (diffusers' own to_bf16 uses the removed jax.tree_map)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ------------------------------------------------------------------------------------------ entry point


def load_model(
    source: str = "tiny", dtype="float32", *, revision: str | None = None, variant: str | None = None,
    seed: int = 0,
) -> ModelBundle:
    """Load a model bundle from a named config, a local folder or a hub id (see module docstring)."""
    dtype = as_dtype(dtype)
    if source in NAMED_MODELS:
        return NAMED_MODELS[source](dtype=dtype, seed=seed)
    if os.path.exists(source):
        return load_folder(source, dtype, variant=variant)
    if source.startswith((".", "/", "~")) or source.endswith("/") or source.count("/") > 1:
        raise ModelSourceError(f"model folder {source!r} does not exist")
    if _looks_like_hub_id(source):
        return load_folder(download(source, revision=revision), dtype, variant=variant, source=source)
    raise ModelSourceError(
        f"model source {source!r} is neither a named model ({', '.join(NAMED_MODELS)}), an existing folder, "
        "nor a hub id of the form 'owner/name'."
    )


SAMPLING_FILE = "sampling.json"  # a model folder's recommended {"scheduler", "steps", "guidance"}


def recommended_sampling(source: str) -> dict:
    """The sampling settings a model folder recommends (its `sampling.json`), {} when it has none.

    The shipped toy model's were chosen on validation scenes (see its model card); SD folders have none,
    and the usual DDIM 50 steps, guidance 7.5 apply."""
    folder = _NAMED_FOLDERS.get(source, source)
    path = os.path.join(folder, SAMPLING_FILE) if isinstance(folder, str) and os.path.isdir(folder) else ""
    if not os.path.isfile(path):
        return {}
    settings = read_json(path)
    return {k: settings[k] for k in ("scheduler", "steps", "guidance") if k in settings}


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None


# ------------------------------------------------------------------------------------------ hub


def _hub_patterns(files: list[str] | None, variant: str | None) -> list[str]:
    # an SDXL repo also has text_encoder_2/ and tokenizer_2/; an unknown listing (offline) asks for both
    sdxl = files is None or any(f.startswith("text_encoder_2/") for f in files)
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    configs = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*"]
    configs += ["tokenizer_2/*"] if sdxl else []
    suffix = f".{variant}" if variant else ""
    flax = ["unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack"]
    flax += [f"{e}/flax_model.msgpack" for e in encoders]
    torch = [f"unet/diffusion_pytorch_model{suffix}.safetensors*", f"vae/diffusion_pytorch_model{suffix}.safetensors*"]
    torch += [f"{e}/model{suffix}.safetensors*" for e in encoders]
    if files is not None and all(f in files for f in flax):
        return configs + flax  # a repo with Flax weights: take only those
    if files is not None:
        return configs + torch
    return configs + flax + torch  # unknown listing (offline): the cache decides


def hub_snapshot(repo_id: str, patterns, *, revision: str | None = None, what: str = "model",
                 local_hint: str = "pass a local diffusers folder instead.") -> str:
    """Local folder with a hub repo's files matching `patterns(listing or None)`, downloaded or from the
    local cache; a clear ModelSourceError (what to do) when neither works."""
    from huggingface_hub import HfApi, snapshot_download

    files = None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception as e:  # offline, private, missing: snapshot_download says which below
            log.info("could not list %s on the hub (%s); trying the local cache", repo_id, e)
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns(files), local_files_only=offline)
    except Exception as e:
        raise ModelSourceError(
            f"could not get {what} {repo_id!r}{f' at revision {revision!r}' if revision else ''}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            "It is neither downloadable now nor in the local Hugging Face cache. Either connect to the network "
            f"(unset HF_HUB_OFFLINE; log in with `huggingface-cli login` if the repo is gated), download it once "
            f"with `huggingface-cli download {repo_id}`, or {local_hint}"
        ) from e


def download(repo_id: str, revision: str | None = None, variant: str | None = None) -> str:
    """Local folder with the files `load_folder` needs, from the hub or the local cache."""
    return hub_snapshot(repo_id, lambda files: _hub_patterns(files, variant), revision=revision)


# ------------------------------------------------------------------------------------------ folders


def load_folder(folder: str, dtype=jnp.float32, *, variant: str | None = None, source: str | None = None) -> ModelBundle:
    if not os.path.isdir(folder):
        raise ModelSourceError(f"model folder {folder!r} is not a directory")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise ModelSourceError(
            f"model folder {folder!r} lacks {', '.join(m + '/' for m in missing)}: expected a diffusers-layout "
            "Stable Diffusion folder (as written by save_pretrained) with unet/, vae/, text_encoder/, tokenizer/."
        )
    sdxl = _check_sdxl_layout(folder)
    zeros = sdxl and force_zeros(folder)  # before any weight is read
    unet, unet_params = _load_diffusers_component(folder, "unet", adapter.unet_from_config, dtype, variant)
    vae, vae_params = _load_diffusers_component(folder, "vae", adapter.vae_from_config, dtype, variant)
    text_encoder, text_params = _load_text_encoder(os.path.join(folder, "text_encoder"), dtype, variant)
    tokenizer = _load_tokenizer(folder, "tokenizer")
    params = {"text_encoder": text_params, "unet": unet_params, "vae": vae_params}
    second = {}
    if sdxl:
        text_encoder_2, params["text_encoder_2"] = _load_text_encoder(
            os.path.join(folder, "text_encoder_2"), dtype, variant, projection=True)
        second = dict(text_encoder_2=text_encoder_2, tokenizer_2=_load_tokenizer(folder, "tokenizer_2"))
        check_sdxl_parts(folder, unet, text_encoder, text_encoder_2, tokenizer, second["tokenizer_2"])
    sched_cfg = os.path.join(folder, "scheduler", "scheduler_config.json")
    sched_config = read_json(sched_cfg) if os.path.isfile(sched_cfg) else SD_SCHEDULER
    prediction = sched_config.get("prediction_type", "epsilon")
    if prediction not in diffusion.PREDICTION_TYPES:
        raise ModelSourceError(f"{sched_cfg}: prediction_type={prediction!r} is not supported; this project trains "
                               f"and samples {' and '.join(diffusion.PREDICTION_TYPES)} models.")
    scheduler, scheduler_state = adapter.ddpm_scheduler(sched_config)
    return ModelBundle(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler,
        scheduler_state=scheduler_state, params=cast_floating(params, dtype), dtype=dtype, source=source or folder,
        scheduler_config=dict(sched_config), force_zeros_for_empty_prompt=zeros, **second,
    )


FORCE_ZEROS = "force_zeros_for_empty_prompt"  # an SDXL pipeline's model_index.json entry


def force_zeros(folder: str) -> bool:
    """An SDXL folder's `force_zeros_for_empty_prompt` (model_index.json); true where the folder does not say, as
    StableDiffusionXLPipeline's default and SDXL base's own index have it."""
    path = os.path.join(folder, "model_index.json")
    value = read_json(path).get(FORCE_ZEROS, True) if os.path.isfile(path) else True
    if not isinstance(value, bool):
        raise ModelSourceError(f"{path}: {FORCE_ZEROS} is {value!r}, not true or false.")
    return value


def _load_tokenizer(folder: str, name: str):
    try:
        return adapter.load_tokenizer(os.path.join(folder, name))
    except (OSError, ValueError, TypeError) as e:
        raise ModelSourceError(f"cannot load {name}/ of {folder!r}: {e}") from e


def _check_sdxl_layout(folder: str) -> bool:
    """Whether the folder is SDXL's (text_encoder_2/, tokenizer_2/, a UNet with SDXL's added conditioning),
    refusing the mixtures this project cannot run, before any weight is read."""
    unet_config = os.path.join(folder, "unet", "config.json")
    text_time = os.path.isfile(unet_config) and read_json(unet_config).get("addition_embed_type") == "text_time"
    present = [c for c in SDXL_COMPONENTS if os.path.isdir(os.path.join(folder, c))]
    if text_time and len(present) < len(SDXL_COMPONENTS):
        raise ModelSourceError(
            f"{unet_config}: an SDXL UNet (addition_embed_type='text_time') needs both text encoders, but the folder "
            f"lacks {', '.join(c + '/' for c in SDXL_COMPONENTS if c not in present)}. SDXL base folders have "
            "text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/; the SDXL refiner (second encoder only, "
            "aesthetic-score conditioning) is not supported.")
    if present and not text_time:
        raise ModelSourceError(
            f"{unet_config}: the folder has {', '.join(c + '/' for c in present)} (SDXL's second text encoder) but its "
            "UNet has no SDXL added conditioning (addition_embed_type='text_time'); such a mixture is not a model "
            "this project can run.")
    return text_time


def check_sdxl_parts(folder: str, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2) -> None:
    """The widths SDXL's conditioning needs, and tokenizers that differ in their padding only: the second
    encoder's ids are then derived from the first's inside compiled programs (`conditioning.second_ids`)."""
    cfg, widths = unet.config, (text_encoder.config.hidden_size, text_encoder_2.config.hidden_size)
    pooled, micro = text_encoder_2.config.projection_dim, int(cfg.addition_time_embed_dim or 0)
    problems = []
    if cfg.cross_attention_dim != sum(widths):
        problems.append(f"the UNet's cross_attention_dim is {cfg.cross_attention_dim}, but the two text encoders' "
                        f"states are {widths[0]} + {widths[1]} wide")
    if cfg.projection_class_embeddings_input_dim != pooled + 6 * micro:
        problems.append(f"the UNet's projection_class_embeddings_input_dim is "
                        f"{cfg.projection_class_embeddings_input_dim}, not the pooled embedding ({pooled}) + 6 time ids "
                        f"x {micro} (SDXL base's micro-conditioning: original size, crop, target size)")
    if tokenizer.get_vocab() != tokenizer_2.get_vocab() or tokenizer.bpe_ranks != tokenizer_2.bpe_ranks:
        problems.append("tokenizer/ and tokenizer_2/ have different vocabularies or merges (SDXL's share one)")
    elif (tokenizer.bos_token_id, tokenizer.eos_token_id) != (tokenizer_2.bos_token_id, tokenizer_2.eos_token_id):
        problems.append("tokenizer/ and tokenizer_2/ have different start or end tokens")
    if problems:
        raise ModelSourceError(f"{folder}: not an SDXL model this project can run:\n  " + "\n  ".join(problems))


def read_json(path: str) -> dict:
    """A JSON file, or a ModelSourceError saying which file could not be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"cannot read {path}: {e}") from e


def _load_diffusers_component(folder, name, from_config, dtype, variant):
    """(module, params) of unet/ or vae/: the module from config.json (settings diffusers' Flax class lacks are
    refused there), the params from Flax msgpack or PyTorch safetensors weights."""
    sub = os.path.join(folder, name)
    config_path = os.path.join(sub, "config.json")
    if not os.path.isfile(config_path):
        raise ModelSourceError(f"{sub} has no config.json")
    module = from_config(read_json(config_path), dtype=dtype, what=config_path)
    shapes = adapter.param_shapes(module)
    if os.path.isfile(os.path.join(sub, "diffusion_flax_model.msgpack")):
        return module, convert.read_flax_msgpack(os.path.join(sub, "diffusion_flax_model.msgpack"), shapes,
                                                 what=sub, dtype=dtype)
    stems = [f for f in os.listdir(sub) if f.endswith(".safetensors") or f.endswith(".safetensors.index.json")]
    if not stems:
        only_bin = any(f.endswith(".bin") for f in os.listdir(sub))
        raise ModelSourceError(
            f"{sub} has no Flax (.msgpack) or safetensors weights"
            + (": only PyTorch .bin files, which need torch; re-save them as safetensors." if only_bin else ".")
        )
    state = convert.read_safetensors(sub, "diffusion_pytorch_model", variant)
    return module, convert.pt_state_to_flax(state, shapes, what=sub, dtype=dtype)


def _load_text_encoder(sub: str, dtype, variant, projection: bool = False):
    """(module, params) of a CLIP text encoder folder; `projection`: SDXL's second encoder."""
    config_path = os.path.join(sub, "config.json")
    if not os.path.isfile(config_path):
        raise ModelSourceError(f"{sub} has no config.json")
    config = read_json(config_path)
    adapter.check_text_config(config, config_path)
    if os.path.isfile(os.path.join(sub, "flax_model.msgpack")):
        try:
            return adapter.load_flax_clip_text(sub, dtype=dtype, projection=projection)
        except (OSError, ValueError) as e:
            raise ModelSourceError(f"cannot load Flax weights of {sub}: {e}") from e
    module = adapter.text_encoder_from_config(config, dtype=dtype, what=config_path, projection=projection)
    shapes = adapter.param_shapes(module)
    state = convert.read_safetensors(sub, "model", variant)
    return module, convert.pt_state_to_flax(state, shapes, what=sub, dtype=dtype, rename=adapter.pt_to_flax_text_key)


def save_flax(bundle: ModelBundle, folder: str) -> None:
    """Write the bundle as a diffusers-layout folder with Flax weights."""
    os.makedirs(folder, exist_ok=True)
    adapter.save_flax_components(folder, bundle, cast_floating(bundle.params, jnp.float32))
    if bundle.is_sdxl and not bundle.force_zeros_for_empty_prompt:
        # kept beside the Flax pipeline's entries, so that the folder loads back the same; only when false (absent
        # means true): diffusers' Flax SDXL pipeline has no such setting and warns about the entry
        path = os.path.join(folder, "model_index.json")
        index = read_json(path)
        index[FORCE_ZEROS] = False
        with open(path, "w") as f:
            json.dump(index, f, indent=2)


# ------------------------------------------------------------------------------------------ tiny


TINY_WORDS = tuple((
    "a photo of an and the at in on with by painting drawing sketch "
    "person man woman dog cat bear teddy toy car chair vase cup "
    "background beach forest city street room grass sand snow "
    "red green blue yellow white black striped dotted small big"
).split())

TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
)

# Two levels: cross-attention at 16x16 (3 layers, as SD's finest level has) and in the mid block at 8x8. The tests
# compile its programs hundreds of times; a third level (SD's layout in miniature, the toy model's) made a tiny
# learner run's compiles 1.9x as long (27 s against 14 s) for no path the tests do not already take.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=32,
)

TINY_VAE = dict(
    sample_size=32, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, scaling_factor=0.18215,
)


def random_params(shapes, seed: int) -> dict:
    """Seeded params with Flax's default scaling, from a shape tree: compiling `init` of a UNet on CPU
    takes ~30 s, this takes milliseconds. Kernels lecun-normal, embeddings N(0, 1), scales 1, biases 0."""
    rng = np.random.default_rng(seed)
    flat = flatten_dict(shapes)
    out = {}
    for path in sorted(flat):
        shape, name = flat[path].shape, path[-1]
        if name == "scale":
            value = np.ones(shape, np.float32)
        elif name == "bias":
            value = np.zeros(shape, np.float32)
        elif name == "embedding":
            value = rng.standard_normal(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[:-1])) or 1
            value = rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)
        out[path] = value
    return jax.device_put(unflatten_dict(out))  # one transfer for the tree, not one per leaf


def word_tokenizer(words=TINY_WORDS, max_length: int = 77, **kwargs):
    """A CLIP tokenizer with every word of `words` one token (kwargs: e.g. `pad_token`)."""
    with tempfile.TemporaryDirectory() as d:
        vocab, merges = bpe.write_vocab(d, words)
        return adapter.tokenizer_from_files(vocab, merges, model_max_length=max_length, **kwargs)


def text_config_for(tokenizer, text_config: dict, max_length: int) -> dict:
    """A text encoder config whose vocabulary and special tokens are the tokenizer's."""
    return dict(text_config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=max_length)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model without weights: the configs of its text encoder, UNet and VAE (transformers / diffusers config
    dicts) and, for an SDXL-shaped model, of its second text encoder (with projection)."""

    text: dict
    unet: dict
    vae: dict
    text_2: dict | None = None


def build_random(words, arch: Architecture, *, dtype=jnp.float32, seed: int = 0, source: str = "random",
                 max_length: int = 77) -> ModelBundle:
    """A model of `arch` with seeded random weights and a vocabulary of `words` (each one token); with
    `arch.text_2` an SDXL-shaped one (second encoder with projection, its tokenizer padding with "!" as
    SDXL's does)."""
    tokenizer = word_tokenizer(words, max_length)
    text_encoder = adapter.text_encoder_from_config(text_config_for(tokenizer, arch.text, max_length), dtype=dtype)
    unet = adapter.unet_from_config(arch.unet, dtype=dtype)
    vae = adapter.vae_from_config(arch.vae, dtype=dtype)
    params = {
        "text_encoder": random_params(adapter.param_shapes(text_encoder), seed),
        "unet": random_params(adapter.param_shapes(unet), seed + 1),
        "vae": random_params(adapter.param_shapes(vae), seed + 2),
    }
    second = {}
    if arch.text_2 is not None:
        tokenizer_2 = word_tokenizer(words, max_length, pad_token="!")
        text_encoder_2 = adapter.text_encoder_from_config(text_config_for(tokenizer_2, arch.text_2, max_length),
                                                          dtype=dtype, projection=True)
        params["text_encoder_2"] = random_params(adapter.param_shapes(text_encoder_2), seed + 3)
        second = dict(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        check_sdxl_parts(source, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2)
    scheduler, scheduler_state = adapter.ddpm_scheduler(SD_SCHEDULER)
    return ModelBundle(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler,
        scheduler_state=scheduler_state, params=cast_floating(params, dtype), dtype=dtype, source=source,
        scheduler_config=dict(SD_SCHEDULER), force_zeros_for_empty_prompt=arch.text_2 is not None, **second,
    )


def tiny_model(dtype=jnp.float32, seed: int = 0) -> ModelBundle:
    """A tiny SD (latent 16x16, image 32x32) with seeded random weights: every real code path, no download."""
    return build_random(TINY_WORDS, Architecture(TINY_TEXT, TINY_UNET, TINY_VAE), dtype=dtype, seed=seed,
                        source="tiny")


# SDXL's structure in miniature: no cross-attention at the finest level, more transformer blocks at the coarser
# one (SDXL: 1 unused, 2, 10; here 1 unused, 2), linear projections, two text encoders whose states are
# concatenated (SDXL: 768 + 1280 = 2048; here 32 + 64 = 96), the pooled embedding of the second (SDXL: 1280; here
# 32) and 6 time ids (SDXL: 256 wide each; here 8) as added conditioning.
TINY_SDXL_TEXT_2 = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
)

TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    cross_attention_dim=TINY_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_SDXL_TEXT_2["projection_dim"] + 6 * 8,
)

TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025)  # SDXL's VAE scale


def tiny_sdxl_model(dtype=jnp.float32, seed: int = 0) -> ModelBundle:
    """A tiny SDXL-shaped model (latent 16x16, image 32x32) with seeded random weights."""
    return build_random(TINY_WORDS, Architecture(TINY_TEXT, TINY_SDXL_UNET, TINY_SDXL_VAE, TINY_SDXL_TEXT_2),
                        dtype=dtype, seed=seed, source="tiny-sdxl")


# the shipped, pre-trained toy model (`jaxconcept.toy.sd` describes it; the toy package builds on this module)
TOY_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy", "weights")


def _toy_model(dtype=jnp.float32, seed: int = 0) -> ModelBundle:
    if not os.path.isdir(os.path.join(TOY_WEIGHTS, "unet")):
        raise ModelSourceError(
            f"the toy model's weights are not in {TOY_WEIGHTS}: train them with `python launch/train_toy.py` "
            "and copy the run's model/ folder there."
        )
    return load_folder(TOY_WEIGHTS, dtype, source="toy")


NAMED_MODELS = {"tiny": tiny_model, "tiny-sdxl": tiny_sdxl_model, "toy": _toy_model}
# named models that live in a folder of the package (their recommended sampling settings are read there)
_NAMED_FOLDERS = {"toy": os.path.join(os.path.dirname(os.path.dirname(__file__)), "toy", "weights")}
