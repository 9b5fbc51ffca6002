"""Memory of our training steps, from the compiled programs' own figures, without any weights.

    python -m jaxconcept.bench.memory                                   # every preset, program and option, CPU
    python -m jaxconcept.bench.memory --presets sd15 --programs joint --options fp32,lora4
    python -m jaxconcept.bench.memory --presets sd21 --programs token,estep,joint:lora4+bf16_adafactor_remat_full
    python -m jaxconcept.bench.memory --presets sd21 --programs joint:lora4 --target tpu-v5e     # needs libtpu
    python -m jaxconcept.bench.memory --report                          # docs/memory.md from docs/memory.json
    python -m jaxconcept.bench.memory --presets tiny --out /tmp/memory.json                  # seconds
    python -m jaxconcept.bench.memory --presets sd15 --target gpu --execute   # on a GPU: also the device's peak

Each program is built exactly as a run builds it (`em/stages.py`: the settings of the preset, `loss_config`,
`joint_loss_config`, `frozen_weights`, `joint_tuned`, `joint_frozen`, `stage_optimizers`; `em/steps.py`:
`make_train_step`, `make_concept_maps`) from abstract parameters (`adapter.param_shapes`, `jax.eval_shape`: shapes
and dtypes, no values), lowered and compiled for one target, and XLA's `compiled.memory_analysis()` is read:

  arguments    every input buffer: the frozen weights, the state (trainables, optimiser state, step), the run's
               prompt table, latents and masks
  outputs      the new state and the metrics (or the E-step's maps)
  aliased      outputs written into donated inputs (the train steps donate their state)
  temporaries  XLA's buffer assignment of everything else: activations, gradients, the optimiser's update
  peak         arguments + outputs - aliased + temporaries; the backend's own `peak_memory_in_bytes` (the heap
               simulation of the buffer assignment) is kept as `xla_peak_bytes` (meaningful on TPU; the CPU
               backend reports the arguments' size there); "what fits" uses the larger of the two

Programs: `token` (stage 2: concept rows trainable, text encoder and UNet frozen), `estep` (the E-step's
attention pass: 50 timesteps of the frozen UNet in one batch, maps at latent/4 and latent/2), `joint` (stage 3:
rows and the UNet, or LoRA adapters on the frozen UNet, trainable). Batch 1 at the preset's resolution, one image
with 3 concepts (2 objects and the background, one vector each: 15 prompts of 77 tokens), the token table of SD's
49408 rows plus the 3 concept rows. Option sets (`OPTIONS`) change the joint stage's optimiser, remat and LoRA,
and the model's dtype; the token step and the E-step depend on the dtype only (`fp32`, `bf16`).

Targets: `cpu` (this machine's XLA CPU backend: a proxy for a GPU, whose compiler fuses and schedules
differently), `gpu` / `tpu` (this machine's own accelerator; with `--execute` each program also runs once on
placeholder inputs, in a process of its own, and the device allocator's peak is kept: `bench/run_peak.py`), and TPUs
ahead of time, `tpu-v5e` (= `tpu-v5e:1x1`), `tpu-v5e:2x2`, `tpu-v6e:1x1`, ... (libtpu
must be importable: `pip install libtpu`): `jax.experimental.topologies` gives the chips of a topology to compile
for on this CPU; the executable cannot run here, but its memory analysis is the TPU compiler's own. On several
chips the mesh's fsdp axis spans them all: the state and the frozen weights are FSDP-split
(`sharding.fsdp_shardings`), and the figures are per chip.

Results go to `--out` (docs/memory.json), one entry per preset, program, options and target, with a fingerprint
of everything that determines it (architecture, shapes, settings of the program, target, jax / jaxlib / libtpu
versions): an entry already there with the same fingerprint is skipped (`--force` recomputes), and the file is
written after each entry, so a killed run keeps what it did (a TPU compile of SD 1.5's joint step takes ~14
minutes on 2 cores). `--md` (docs/memory.md next to it) is rendered from the whole file after each entry;
`--report` renders it only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import sys
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .. import config as config_lib
from .. import settings as settings_lib
from ..em import data, stages, steps
from ..errors import JaxconceptError
from ..model import adapter, capture, conditioning
from ..model import loading as model
from ..parallel import sharding
from . import run_peak
from .torch_reference import torch_training_memory
from .workload import (SD15_TEXT, SD15_UNET, SD15_VAE, SD21_TEXT, SD21_UNET, SD_VOCAB, SDXL_TEXT, SDXL_TEXT_2,
                       SDXL_UNET, SDXL_VAE)

SCHEMA = 1  # bump when what an entry measures changes: every entry is recomputed
GIB = 2 ** 30
MIB = 2 ** 20

# ------------------------------------------------------------------------------------------ presets

NUM_CONCEPTS = 3  # 2 objects and the background, one image, one vector each


def _preset_config(name: str):
    return importlib.import_module(f"jaxconcept.presets.{name}").get_config()


def _tiny_config(model_name: str = "tiny"):
    c = config_lib.get_config()
    c.model = model_name
    if model_name == "tiny-sdxl":
        c.masks.resolutions, c.tokens.attn_resolution = (8,), 8  # cross-attention at 8x8 only
    return c


@dataclasses.dataclass(frozen=True)
class Preset:
    """An architecture without weights and the learner config that trains it."""

    name: str
    text: dict
    unet: dict
    vae: dict
    prediction_type: str  # what the UNet predicts (SD 2.1 at 768 px: v)
    vocab_size: int  # token table rows before the concept rows (0: the tiny model's word tokenizer's)
    make_config: Callable[[], Any]
    text_2: dict | None = None  # SDXL: the second text encoder (with projection)

    def settings(self, overrides: dict) -> settings_lib.Settings:
        c = self.make_config()
        for field, value in overrides.items():
            group, _, name = field.rpartition(".")
            setattr(c[group] if group else c, name, value)
        return settings_lib.resolve(c)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def resolution(self, s: settings_lib.Settings) -> int:
        return s.resolution or self.unet["sample_size"] * self.vae_factor

    def base_vocab(self) -> int:
        return self.vocab_size or len(model.word_tokenizer(model.TINY_WORDS))


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", model.TINY_TEXT, model.TINY_UNET, model.TINY_VAE, "epsilon", 0, _tiny_config),
    "sd15": Preset("sd15", SD15_TEXT, SD15_UNET, SD15_VAE, "epsilon", SD_VOCAB,
                   functools.partial(_preset_config, "sd15")),
    "sd21_base": Preset("sd21_base", SD21_TEXT, dict(SD21_UNET, sample_size=64), SD15_VAE, "epsilon", SD_VOCAB,
                        functools.partial(_preset_config, "sd21_base")),
    "sd21": Preset("sd21", SD21_TEXT, dict(SD21_UNET, sample_size=96), SD15_VAE, "v_prediction", SD_VOCAB,
                   functools.partial(_preset_config, "sd21")),
    "tiny-sdxl": Preset("tiny-sdxl", model.TINY_TEXT, model.TINY_SDXL_UNET, model.TINY_SDXL_VAE, "epsilon", 0,
                        functools.partial(_tiny_config, "tiny-sdxl"), model.TINY_SDXL_TEXT_2),
    "sdxl": Preset("sdxl", SDXL_TEXT, SDXL_UNET, SDXL_VAE, "epsilon", SD_VOCAB,
                   functools.partial(_preset_config, "sdxl"), SDXL_TEXT_2),
}
DEFAULT_PRESETS = ("sd15", "sd21_base", "sd21")

# ------------------------------------------------------------------------------------------ options

# named option sets: config overrides on BASE_OPTIONS (the joint stage's; "dtype" changes every program). Every
# set names what it measures whatever the preset's defaults (the SD presets tune LoRA rank 4 by default)
BASE_OPTIONS = {"dtype": "float32", "joint.optimizer": "adamw", "joint.remat": "none", "joint.lora_rank": 0,
                "memory_efficient_attention": False, "masks.timestep_chunk": 0}
OPTIONS: dict[str, dict] = {
    "fp32": {},  # float32 params, the whole UNet tuned with AdamW (float32 moments), no remat
    "bf16": {"dtype": "bfloat16"},
    "adamw_bf16": {"joint.optimizer": "adamw_bf16"},
    "adafactor": {"joint.optimizer": "adafactor"},
    "remat_dots": {"joint.remat": "dots"},
    "remat_full": {"joint.remat": "full"},
    "adafactor_remat_full": {"joint.optimizer": "adafactor", "joint.remat": "full"},
    "bf16_adafactor_remat_full": {"dtype": "bfloat16", "joint.optimizer": "adafactor", "joint.remat": "full"},
    "lora4": {"joint.lora_rank": 4},
    "lora16": {"joint.lora_rank": 16},
    "lora4_remat_full": {"joint.lora_rank": 4, "joint.remat": "full"},
    "bf16_lora4": {"dtype": "bfloat16", "joint.lora_rank": 4},
    # memory-efficient (chunked) self-attention in every program; the E-step's timesteps 10 per UNet call
    "mea": {"memory_efficient_attention": True},
    "chunk10": {"masks.timestep_chunk": 10},
    "mea_chunk10": {"memory_efficient_attention": True, "masks.timestep_chunk": 10},
    "mea_lora4": {"memory_efficient_attention": True, "joint.lora_rank": 4},
    "bf16_mea_chunk10": {"dtype": "bfloat16", "memory_efficient_attention": True, "masks.timestep_chunk": 10},
    "bf16_mea_lora4": {"dtype": "bfloat16", "memory_efficient_attention": True, "joint.lora_rank": 4},
    "bf16_mea": {"dtype": "bfloat16", "memory_efficient_attention": True},  # the whole UNet (SDXL: FSDP over chips)
}
PROGRAMS = ("token", "estep", "joint")
# the token step and the E-step depend on the dtype, the attention and (the E-step) the timestep chunk only
STEP_OPTIONS = ("fp32", "bf16", "mea", "chunk10", "mea_chunk10", "bf16_mea_chunk10")


def option_overrides(name: str) -> dict:
    """The config overrides of an option set: BASE_OPTIONS with the set's changes."""
    return {**BASE_OPTIONS, **OPTIONS[name]}


def program_options(program: str, names) -> list[str]:
    """The option sets that apply to a program, in the order given."""
    return [n for n in names if program == "joint" or n in STEP_OPTIONS]


# ------------------------------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: tuple
    kind: str  # the device kind (e.g. "TPU v5 lite")
    versions: dict  # what the compiler's figures depend on

    @property
    def chips(self) -> int:
        return len(self.devices)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_topology(target: str) -> str:
    """"tpu-v5e" -> "v5e:1x1", "tpu-v5e:2x2" -> "v5e:2x2"."""
    topo = target[len("tpu-"):]
    return topo if ":" in topo else topo + (":1x1x1" if topo.startswith(("v4", "v5p")) else ":1x1")


@functools.lru_cache(maxsize=8)
def make_target(name: str) -> Target:
    versions = {"jax": jax.__version__, "jaxlib": _version("jaxlib")}
    if name == "cpu":
        devices = tuple(jax.devices("cpu")[:1])
    elif name in ("gpu", "tpu"):  # this machine's own accelerator (the first one)
        try:
            devices = tuple(jax.devices(name)[:1])
        except RuntimeError as e:
            hint = "`pip install -U 'jax[cuda12]'`" if name == "gpu" else "`pip install -U 'jax[tpu]'` on a TPU VM"
            raise JaxconceptError(f"target {name!r}: jax sees no {name.upper()} here ({e}); install jax for it "
                                  f"({hint}) on a machine with one, or use --target cpu") from e
        versions["platform_version"] = devices[0].client.platform_version
    elif name.startswith("tpu-"):
        if not libtpu_available():
            raise JaxconceptError(f"target {name!r} compiles for TPUs ahead of time with libtpu, which is not "
                                  "installed: `pip install libtpu` (or use --target cpu)")
        from jax.experimental import topologies

        topo = tpu_topology(name)
        try:
            devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=topo).devices)
        except Exception as e:  # noqa: BLE001 - libtpu's own message says what is wrong
            raise JaxconceptError(f"target {name!r}: no TPU topology {topo!r} ({e})") from e
        versions["libtpu"] = _version("libtpu")
        versions["topology"] = topo
    else:
        raise JaxconceptError(f"unknown target {name!r}: use cpu, gpu, tpu (this machine's own) or tpu-<topology> "
                              "(ahead of time: tpu-v5e, tpu-v5e:2x2, tpu-v6e:1x1, ...)")
    return Target(name, devices, devices[0].device_kind, versions)


# ------------------------------------------------------------------------------------------ abstract inputs


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))


def _cast(tree, dtype):
    """Abstract `loading.cast_floating`: floating leaves in `dtype`."""
    return jax.tree.map(lambda x: _sds(x.shape, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@dataclasses.dataclass
class Setup:
    """Everything a program is built from: the settings, a bundle of modules with abstract params, abstract run
    data (what `em/prepare.py` makes), the concept rows and ids, the mesh."""

    preset: Preset
    settings: settings_lib.Settings
    bundle: model.ModelBundle
    concept_ids: tuple[int, ...]
    rows: Any
    run_data: dict
    masks: Any
    key: Any
    latent_hw: tuple[int, int]
    ids_T: Any
    positions_C: Any
    mesh: Any
    shard_frozen: bool


def _text_encoders(preset: Preset, dtype, vocab: int) -> dict:
    """The bundle's text entries: the encoder(s) as modules, stand-ins for the tokenizers (the ids SDXL's
    conditioning reads: the end token, the second tokenizer's padding "!", id 0 in CLIP's vocabulary) and their
    abstract params."""
    ids = dict(bos_token_id=SD_VOCAB - 2, eos_token_id=SD_VOCAB - 1, pad_token_id=SD_VOCAB - 1)
    text_encoder = adapter.text_encoder_from_config(dict(preset.text, vocab_size=vocab, **ids), dtype=dtype)
    out = {"text_encoder": text_encoder, "tokenizer": types.SimpleNamespace(**ids),
           "params": {"text_encoder": _cast(adapter.param_shapes(text_encoder), dtype)}}
    if preset.text_2 is None:
        return out
    text_encoder_2 = adapter.text_encoder_from_config(dict(preset.text_2, vocab_size=vocab, **ids), dtype=dtype,
                                                      projection=True)
    out["params"]["text_encoder_2"] = _cast(adapter.param_shapes(text_encoder_2), dtype)
    return dict(out, text_encoder_2=text_encoder_2, tokenizer_2=types.SimpleNamespace(**dict(ids, pad_token_id=0)))


def make_setup(preset: Preset, option: str, target: Target) -> Setup:
    s = preset.settings(option_overrides(option))
    dtype = model.as_dtype(s.dtype)
    base = preset.base_vocab()
    concept_ids = tuple(range(base, base + NUM_CONCEPTS))
    text = _text_encoders(preset, dtype, base + NUM_CONCEPTS)
    unet = adapter.unet_from_config(preset.unet, dtype=dtype)
    if s.memory_efficient_attention:  # as em/prepare.py does
        unet = adapter.with_memory_efficient_attention(unet)
    sched_cfg = dict(model.SD_SCHEDULER, prediction_type=preset.prediction_type)
    scheduler, scheduler_state = adapter.ddpm_scheduler(sched_cfg)
    params = {**text.pop("params"), "unet": _cast(adapter.param_shapes(unet), dtype)}
    # the VAE module (no params: no program runs it) tells the steps the image size per latent pixel
    bundle = model.ModelBundle(unet=unet, vae=adapter.vae_from_config(preset.vae, dtype=dtype), scheduler=scheduler,
                               scheduler_state=scheduler_state, params=params, dtype=dtype, source=preset.name,
                               scheduler_config=sched_cfg, **text)
    latent = preset.resolution(s) // preset.vae_factor
    latents_dtype = dtype  # the VAE's latents come in the model's dtype
    z = preset.unet["in_channels"]
    length = int(preset.text["max_position_embeddings"])
    prompts = data.num_prompts([NUM_CONCEPTS])
    table = {"ids_PxT": _sds((prompts, length), jnp.int32), "positions_PxC": _sds((prompts, NUM_CONCEPTS), jnp.int32),
             "image_P": _sds((prompts,), jnp.int32), "logw_P": _sds((prompts,), jnp.float32)}
    run_data = {"table": table, "latents": _sds((1, 2, z, latent, latent), latents_dtype)}
    width = int(preset.text["hidden_size"]) + int((preset.text_2 or {}).get("hidden_size", 0))  # SDXL: D1 + D2
    fsdp = target.chips
    mesh = sharding.make_mesh(target.devices, fsdp=fsdp)
    return Setup(preset, s, bundle, concept_ids, _sds((NUM_CONCEPTS, width), jnp.float32), run_data,
                 _sds((NUM_CONCEPTS, latent, latent), jnp.float32), jax.eval_shape(lambda: jax.random.key(0)),
                 (latent, latent), _sds((length,), jnp.int32), _sds((NUM_CONCEPTS,), jnp.int32), mesh,
                 shard_frozen=fsdp > 1)


def _frozen(st: Setup) -> tuple[dict, Any]:
    """The frozen weights and their shardings (None: replicated; FSDP-split over several chips)."""
    b = st.bundle
    frozen = stages.frozen_weights(b.params)
    sh = sharding.fsdp_shardings(frozen, st.mesh, st.settings.mesh.fsdp_min_size) if st.shard_frozen else None
    return frozen, sh



# LossConfig fields added after entries were computed: part of the fingerprint only when set (not at their default)
LATER_LOSS_FIELDS = ("context_weight", "min_snr_gamma")


def loss_statics(cfg) -> str:
    """The loss config as its repr read before LATER_LOSS_FIELDS existed, followed by those of them that are set."""
    fields = [f for f in dataclasses.fields(cfg) if f.repr]
    old = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in fields if f.name not in LATER_LOSS_FIELDS)
    later = "".join(f", {f.name}={getattr(cfg, f.name)!r}" for f in fields
                    if f.name in LATER_LOSS_FIELDS and getattr(cfg, f.name) != f.default)
    return f"{type(cfg).__qualname__}({old}){later}"


def program_statics(program: str, st: Setup) -> dict:
    """What the program is specialised on besides the shapes (part of the fingerprint), without tracing it."""
    s = st.settings
    # options added later count only when set, so that the entries made before them keep their fingerprints
    extra = {"memory_efficient_attention": True} if s.memory_efficient_attention else {}
    if program == "estep":
        chunk = {"chunk": s.masks.timestep_chunk} if 0 < s.masks.timestep_chunk < s.masks.num_timesteps else {}
        return {"selector": repr(capture.LayerSelector(resolutions=s.masks.resolutions)),
                "timesteps": s.masks.num_timesteps, **chunk, **extra}
    if program == "token":
        return {"loss": loss_statics(stages.loss_config(s)),
                "optimizer": ["adamw", s.tokens.clip, s.tokens.weight_decay], **extra}
    if program == "joint":
        flat = {"flat_update": True} if stages.flat_joint_update(s, st.bundle.params) else {}
        return {"loss": loss_statics(stages.joint_loss_config(s)), "text_encoder": s.joint.text_encoder,
                "optimizer": [s.joint.optimizer, s.joint.clip, s.joint.weight_decay], "lora": repr(s.joint.lora),
                **flat, **extra}
    raise JaxconceptError(f"unknown program {program!r}: use one of {', '.join(PROGRAMS)}")


def build_program(program: str, st: Setup) -> tuple[Any, dict]:
    """(the program lowered on abstract arguments, the bytes of its abstract trees), built as
    `stages.single_run_stages` builds it."""
    s, b = st.settings, st.bundle
    frozen, frozen_sh = _frozen(st)
    trees = {"unet_param_bytes": sharding.tree_bytes(b.params["unet"]),
             "text_param_bytes": sharding.tree_bytes(conditioning.text_params(b.params))}
    if program == "estep":
        selector = capture.LayerSelector(resolutions=s.masks.resolutions)
        maps = steps.make_concept_maps(b, st.concept_ids, selector, s.masks.num_timesteps, st.latent_hw, st.mesh,
                                       frozen_shardings=frozen_sh, chunk=s.masks.timestep_chunk)
        latents = st.run_data["latents"]  # one image's unflipped latents Z x h x w
        lowered = maps.jitted.lower(st.rows, frozen, _sds(latents.shape[2:], latents.dtype), st.ids_T,
                                    st.positions_C, st.key)
        trees.update(frozen_bytes=sharding.tree_bytes(frozen), trainable_bytes=0, opt_state_bytes=0,
                     input_bytes=sharding.tree_bytes((st.rows, frozen, latents.shape[2:], st.ids_T, st.positions_C)))
        return lowered, trees
    opts = stages.stage_optimizers(s, b.params)
    if program == "token":
        opt, cfg = opts["token"], stages.loss_config(s)
        state = jax.eval_shape(lambda rows: steps.init_state({"rows": rows}, opt), st.rows)
        state_sh, fsh, step_frozen = None, frozen_sh, frozen  # the token state replicated, as in a run
    elif program == "joint":
        opt, cfg = opts["joint"], stages.joint_loss_config(s)
        params = jax.eval_shape(lambda rows, params: {"rows": rows, **stages.joint_tuned(s, params)}, st.rows, b.params)
        state = jax.eval_shape(lambda p: steps.init_state(p, opt), params)
        state_sh = sharding.fsdp_shardings(state, st.mesh, s.mesh.fsdp_min_size)
        names = stages.joint_frozen(s, frozen)
        step_frozen = {n: frozen[n] for n in names}
        fsh = None if frozen_sh is None else {n: frozen_sh[n] for n in names}
    else:
        raise JaxconceptError(f"unknown program {program!r}: use one of {', '.join(PROGRAMS)}")
    step = steps.make_train_step(b, st.concept_ids, cfg, opt, st.mesh, state_shardings=state_sh,
                                 frozen_shardings=fsh)
    lowered = step.lower(state, step_frozen, st.run_data, st.masks, st.key)
    trees.update(frozen_bytes=sharding.tree_bytes(step_frozen), trainable_bytes=sharding.tree_bytes(state["params"]),
                 opt_state_bytes=sharding.tree_bytes(state["opt_state"]),
                 input_bytes=sharding.tree_bytes((state, step_frozen, st.run_data, st.masks)))
    return lowered, trees


# ------------------------------------------------------------------------------------------ measuring

FIGURES = {"argument_size_in_bytes": "argument_bytes", "output_size_in_bytes": "output_bytes",
           "alias_size_in_bytes": "alias_bytes", "temp_size_in_bytes": "temp_bytes",
           "generated_code_size_in_bytes": "code_bytes"}


def memory_figures(compiled) -> dict:
    """XLA's figures (per device), peak = arguments + outputs - aliased + temporaries, and the backend's own
    peak where it reports one (None otherwise)."""
    m = compiled.memory_analysis()
    if isinstance(m, (list, tuple)):
        m = m[0]
    out = {name: int(getattr(m, field, 0) or 0) for field, name in FIGURES.items()}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["xla_peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0) or None
    return out


def entry_id(preset: str, program: str, option: str, target: str) -> str:
    return f"{preset}/{program}/{option}/{target}"


def fingerprint(st: Setup, program: str, target: Target) -> str:
    """A hash of everything the figures depend on: architecture, shapes, the program's settings, the target and
    the compiler's versions."""
    s, p = st.settings, st.preset
    what = {
        "schema": SCHEMA, "program": program, "text": p.text, "unet": p.unet, "prediction": p.prediction_type,
        "vocab": p.base_vocab() + NUM_CONCEPTS, "dtype": s.dtype, "resolution": p.resolution(s),
        "run_data": jax.tree.map(lambda x: [list(x.shape), str(x.dtype)], st.run_data),
        "rows": list(st.rows.shape), "masks": list(st.masks.shape), "statics": program_statics(program, st),
        "target": target.name, "chips": target.chips, "kind": target.kind, "versions": target.versions,
        "mesh": dict(st.mesh.shape), "shard_frozen": st.shard_frozen, "fsdp_min_size": s.mesh.fsdp_min_size,
    }
    if p.text_2 is not None:  # SDXL's second encoder (absent otherwise: earlier entries keep their fingerprints)
        what["text_2"] = p.text_2
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lower(st: Setup, program: str) -> tuple[Any, dict, float]:
    """(lowered program, its trees' bytes, seconds to build and lower it)."""
    t0 = time.perf_counter()
    lowered, trees = build_program(program, st)
    return lowered, trees, time.perf_counter() - t0


def compile_entry(st: Setup, program: str, option: str, target: Target, fp: str, lowered, trees: dict,
                  lower_s: float, execute: bool = False) -> dict:
    """Compile a lowered program: its entry (figures, tree sizes, times); with `execute`, also run once on
    placeholder arguments for the device allocator's peak (`run_peak.run_once`)."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    figures = memory_figures(compiled)
    if execute:
        figures.update(run_peak.run_once(lowered, compiled, target.devices[0]))
    del compiled
    s, p = st.settings, st.preset
    # jit leaves the arguments a program never reads out of it (the E-step's finest UNet level, whose output it
    # does not use); a run holds them on the device all the same. Per chip only when nothing is split.
    unread = max(0, trees["input_bytes"] - figures["argument_bytes"]) if target.chips == 1 else None
    return {
        "id": entry_id(p.name, program, option, target.name), "preset": p.name, "program": program,
        "options": option, "option_settings": option_overrides(option), "target": target.name,
        "device_kind": target.kind,
        "chips": target.chips, "resolution": p.resolution(s), "latent": st.latent_hw[0],
        "batch": s.tokens.batch_size, "fingerprint": fp, **target.versions, **figures, **trees,
        "unread_bytes": unread, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
        "computed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def measure(st: Setup, program: str, option: str, target: Target, fp: str, execute: bool = False) -> dict:
    """Lower and compile one program (and run it, with `execute`): its entry."""
    return compile_entry(st, program, option, target, fp, *lower(st, program), execute=execute)


# ------------------------------------------------------------------------------------------ results file


def load_results(path: str) -> dict:
    if not os.path.isfile(path):
        return {"schema": SCHEMA, "entries": {}, "torch_reference": {}}
    with open(path) as f:
        out = json.load(f)
    out.setdefault("entries", {})
    out.setdefault("torch_reference", {})
    return out


def save_results(results: dict, path: str) -> None:
    """Written whole to a temporary file, then renamed: a killed run never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ tables


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 4 else f"{n / MIB:.1f} MiB"


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def xla_peak(e: dict) -> int | None:
    """The backend's own peak, where it means one: the CPU backend reports its arguments' size there."""
    return None if e["target"] == "cpu" else e.get("xla_peak_bytes")


def best_peak(e: dict) -> int:
    """What a run holds while the program runs: the larger of arguments + outputs - aliased + temporaries and the
    backend's own peak (TPU), plus the weights the program does not read (kept on the device by the run); or the
    device allocator's measured peak, where the program was run (`--execute`) and that is larger."""
    planned = max(e["peak_bytes"], xla_peak(e) or 0) + (e.get("unread_bytes") or 0)
    return max(planned, e.get("run_peak_bytes") or 0)


def format_table(entries: list[dict]) -> str:
    """The printed table: one row per entry."""
    head = ["entry", "px", "arguments", "outputs", "aliased", "temporaries", "peak", "XLA peak", "run peak",
            "compile s"]
    rows = [[e["id"], str(e["resolution"]), *(fmt_bytes(e[k]) for k in ("argument_bytes", "output_bytes",
                                                                         "alias_bytes", "temp_bytes", "peak_bytes")),
             fmt_bytes(xla_peak(e)), fmt_bytes(e.get("run_peak_bytes")), f"{e['compile_s']:.1f}"] for e in entries]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


CAPACITIES = ((12, "12 GB"), (16, "16 GB (v5e)"), (24, "24 GB"), (32, "32 GB (v4, v6e)"), (40, "40 GB"))
PRESET_ORDER = ("tiny", "tiny-sdxl", "sd15", "sd21_base", "sd21", "sdxl")


def _order(e: dict):
    option_rank = list(OPTIONS).index(e["options"]) if e["options"] in OPTIONS else len(OPTIONS)
    return (e["target"] != "cpu", e["target"],
            PRESET_ORDER.index(e["preset"]) if e["preset"] in PRESET_ORDER else 99, e["preset"],
            PROGRAMS.index(e["program"]) if e["program"] in PROGRAMS else 9, option_rank)


def _option_text(name: str) -> str:
    o = OPTIONS.get(name)
    if o is None:
        return name
    return (", ".join(f"{k.split('.')[-1]}={v}" for k, v in o.items()) + " (otherwise as `fp32`)" if o
            else "float32 params, the whole UNet tuned (lora_rank=0), AdamW with float32 moments, no remat")


def render_markdown(results: dict, out_json: str) -> str:
    entries = sorted(results["entries"].values(), key=_order)
    lines = [
        "# Memory of the training steps",
        "",
        "What our compiled training programs need in device memory: XLA's own figures "
        "(`compiled.memory_analysis()`) of the programs a run builds (`em/stages.py`, `em/steps.py`), compiled "
        "from abstract parameters (shapes and dtypes only, no weights) by `python -m jaxconcept.bench.memory`. "
        f"This page is rendered from `{os.path.basename(out_json)}`; after more entries are computed, "
        "regenerate it with `python -m jaxconcept.bench.memory --report`.",
        "",
        "- **arguments**: every input buffer (frozen weights, the state: trainables, optimiser state, step; the "
        "prompt table, latents, masks); **outputs**: the new state and metrics (E-step: the maps); **aliased**: "
        "outputs written into the donated state; **temporaries**: everything else XLA's buffer assignment "
        "allocates (activations, gradients, updates).",
        "- **peak = arguments + outputs - aliased + temporaries**. **XLA peak** is the backend's own "
        "`peak_memory_in_bytes` (its heap simulation) where it means one: TPU (the CPU backend reports its "
        "arguments' size there; kept in the JSON, not shown). **run peak**: the device allocator's own peak "
        "(`memory_stats()['peak_bytes_in_use']`) while the program ran once on placeholder inputs in a process of "
        "its own (`--execute`, `bench/run_peak.py`; GPUs and TPUs: the CPU backend keeps no such statistics). The "
        "\"what fits\" table uses the largest of these.",
        "- Batch 1 at the preset's resolution; one image with 3 concepts (2 objects + background, one vector "
        "each: 15 prompts of 77 tokens); the token table of SD's 49408 rows plus the 3 concept rows. "
        "`token`: stage 2 (rows trainable, AdamW). `estep`: the E-step's attention pass (50 timesteps in one "
        "batch, maps at latent/4 and latent/2). `joint`: stage 3 (rows + UNet, or rows + LoRA adapters on the "
        "frozen UNet).",
        "- Targets: `cpu` is this machine's XLA CPU backend, a proxy for a GPU (the GPU compiler fuses and "
        "schedules differently; a GPU process also holds its CUDA context and cuDNN/cuBLAS workspaces, and XLA "
        "preallocates 75% of the memory unless told otherwise). `tpu-*` are compiled ahead of time for that TPU "
        "topology with libtpu on this CPU (`jax.experimental.topologies`): the TPU compiler's own figures, per "
        "chip. `gpu` / `tpu`: the machine's own accelerator, compiled and run there (`launch/gpu_check.sh` on a "
        "borrowed GPU). GB in the tables below is GiB (2^30 bytes).",
        "",
        "Option sets:",
        "",
        "| options | settings |",
        "|---|---|",
    ]
    used = sorted({e["options"] for e in entries}, key=lambda n: list(OPTIONS).index(n) if n in OPTIONS else 99)
    lines += [f"| `{n}` | {_option_text(n)} |" for n in used]
    lines += ["", "## Figures (GiB)", "",
              "| preset | px | program | options | target | arguments | outputs | aliased | temporaries | peak "
              "| XLA peak | run peak | trainable | optimiser state | compile s |",
              "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        lines.append(
            f"| {e['preset']} | {e['resolution']} | {e['program']} | `{e['options']}` | {e['target']} | "
            f"{_gib(e['argument_bytes'])} | {_gib(e['output_bytes'])} | {_gib(e['alias_bytes'])} | "
            f"{_gib(e['temp_bytes'])} | **{_gib(e['peak_bytes'])}** | {_gib(xla_peak(e))} | "
            f"{_gib(e.get('run_peak_bytes'))} | "
            f"{_gib(e.get('trainable_bytes'))} | {_gib(e.get('opt_state_bytes'))} | {e['compile_s']:.0f} |")
    lines += ["", "## What fits", "",
              "Held = the peak (the larger of the sum and the XLA peak) plus the weights the program never reads "
              "(jit leaves unused arguments out of a program, e.g. the E-step's finest UNet level, but a run keeps "
              "them on the device), against a device's memory; a yes with under 10% "
              "to spare is marked (tight): runtimes reserve some memory for themselves.", "",
              "| preset | program | options | target | held GiB | " + " | ".join(n for _, n in CAPACITIES) + " |",
              "|---|---|---|---|---:|" + "---|" * len(CAPACITIES)]
    for e in entries:
        peak = best_peak(e)
        cells = []
        for cap, _ in CAPACITIES:
            cells.append("no" if peak > cap * GIB else ("yes (tight)" if peak > 0.9 * cap * GIB else "yes"))
        lines.append(f"| {e['preset']} | {e['program']} | `{e['options']}` | {e['target']} | {_gib(peak)} | "
                     + " | ".join(cells) + " |")
    ref = results.get("torch_reference") or {}
    if ref:
        lines += ["", "## PyTorch reference: Break-a-Scene-style full UNet tuning", "",
                  "Arithmetic from parameter counts (diffusers / transformers models built from the same configs "
                  "on PyTorch's meta device), not a measurement: the UNet and the whole token table trained in "
                  "fp32 with AdamW (weight + gradient + two moments: 16 bytes per parameter), the rest of the text "
                  "encoder and the VAE frozen in fp32 (4 bytes); activations not included.", "",
                  "| preset | UNet params | text encoder params (token table) | VAE params | trained: weights + "
                  "grads + AdamW GiB | frozen GiB | total GiB (no activations) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name in sorted(ref, key=lambda n: PRESET_ORDER.index(n) if n in PRESET_ORDER else 99):
            r = ref[name]
            lines.append(f"| {name} | {r['unet_params'] / 1e6:.1f} M | {r['text_params'] / 1e6:.1f} M "
                         f"({r['table_params'] / 1e6:.1f} M) | {r['vae_params'] / 1e6:.1f} M | "
                         f"{_gib(r['trained_state_bytes'])} | {_gib(r['frozen_bytes'])} | {_gib(r['total_bytes'])} |")
    versions = sorted({(e.get("jax"), e.get("jaxlib"), e.get("libtpu")) for e in entries}, key=str)
    commands = []
    for e in sorted(results["entries"].values(), key=lambda e: e.get("computed_at", "")):
        if e.get("command") and e["command"] not in commands:
            commands.append(e["command"])
    lines += ["", "## How it was made", "",
              "Versions: " + "; ".join(f"jax {j}, jaxlib {jl}" + (f", libtpu {t}" if t else "")
                                       for j, jl, t in versions)
              + ". Commands that computed the entries (each entry is kept with a fingerprint of what determines "
              "it and recomputed only when that changes, or with `--force`):", "", "```"]
    lines += commands + ["python -m jaxconcept.bench.memory --report   # this page", "```", ""]
    return "\n".join(lines)


def write_markdown(results: dict, out_json: str, md: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    tmp = md + ".tmp"
    with open(tmp, "w") as f:
        f.write(render_markdown(results, out_json))
    os.replace(tmp, md)


# ------------------------------------------------------------------------------------------ entry points


def phase(msg: str) -> None:
    print(f"[memory {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_programs(text: str, options: list[str]) -> list[tuple[str, str]]:
    """"token,estep,joint:lora4+fp32" -> [(program, option)]: a program alone takes every option set of
    --options that applies to it, "program:a+b" exactly those."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        program, _, named = part.partition(":")
        if program not in PROGRAMS:
            raise JaxconceptError(f"unknown program {program!r}: use {', '.join(PROGRAMS)} (optionally "
                                  "program:option+option)")
        chosen = [n.strip() for n in named.split("+") if n.strip()] if named else program_options(program, options)
        for n in chosen:
            check_options([n])
            if program != "joint" and n not in STEP_OPTIONS:
                raise JaxconceptError(f"{program}:{n}: the {program} program depends on the dtype only: use "
                                      f"{' or '.join(STEP_OPTIONS)}")
            if (program, n) not in out:
                out.append((program, n))
    return out


def check_options(names) -> None:
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise JaxconceptError(f"unknown option set {', '.join(unknown)}: use {', '.join(OPTIONS)}")


def _check_executable(targets) -> None:
    """--execute runs each program: not possible for a TPU compiled for ahead of time on this machine."""
    ahead = [t for t in targets if t.startswith("tpu-")]
    if ahead:
        raise JaxconceptError(f"--execute runs each program, but {', '.join(ahead)} is compiled ahead of time "
                              "on this machine and cannot run here: use --execute with --target cpu or gpu "
                              "(on a TPU VM: --target tpu, the chip itself)")


def _plan(results: dict, presets, programs, targets, force: bool, execute: bool) -> tuple[list, list]:
    """(every entry id in order, the entries to compute: (id, setup, program, option, target, fingerprint, why));
    adds the PyTorch reference of each preset to `results` where torch can give it."""
    order, todo = [], []
    for target_name in targets:
        target = make_target(target_name)
        for preset_name in presets:
            if preset_name not in PRESETS:
                raise JaxconceptError(f"unknown preset {preset_name!r}: use {', '.join(PRESETS)}")
            preset = PRESETS[preset_name]
            if results["torch_reference"].get(preset_name) is None:
                ref = torch_training_memory(preset, NUM_CONCEPTS)
                if ref is not None:
                    results["torch_reference"][preset_name] = ref
            for program, option in programs:
                eid = entry_id(preset_name, program, option, target_name)
                order.append(eid)
                st = make_setup(preset, option, target)
                fp = fingerprint(st, program, target)
                old = results["entries"].get(eid)
                if old is not None and old.get("fingerprint") == fp and not force and (old.get("executed")
                                                                                       or not execute):
                    phase(f"{eid}: kept (fingerprint {fp}), peak {fmt_bytes(old['peak_bytes'])}")
                    continue
                why = "new" if old is None else "forced" if force else (
                    "fingerprint changed" if old.get("fingerprint") != fp else "compiled before, not run")
                todo.append((eid, st, program, option, target, fp, why))
    return order, todo


def _described(e: dict) -> str:
    """One computed entry in a line."""
    xla = f", XLA peak {fmt_bytes(xla_peak(e))}" if xla_peak(e) else ""
    ran = ""
    if e.get("executed"):
        ran = (f"; ran in {e['run_s']:.2f} s, device peak {fmt_bytes(e['run_peak_bytes'])}"
               if e.get("run_peak_bytes") else f"; ran in {e['run_s']:.2f} s ({e.get('run_note')})")
    return (f"{e['id']}: compiled in {e['compile_s']:.1f} s (lowered in {e['lower_s']:.1f} s): arguments "
            f"{fmt_bytes(e['argument_bytes'])}, temporaries {fmt_bytes(e['temp_bytes'])}, peak "
            f"{fmt_bytes(e['peak_bytes'])}{xla}{ran}")


def run(presets, programs: list[tuple[str, str]], targets, out: str, md: str | None = None, force: bool = False,
        command: str = "", jobs: int = 1, execute: bool = False) -> list[dict]:
    """Compute (or read from `out`) every entry; prints progress and the table, writes `out` (and `md`) after
    each entry; returns the entries of this run in order. With jobs > 1 the programs are lowered one after
    the other while up to `jobs` of them compile at once (in threads: XLA's compiler releases the GIL). With
    `execute` each entry is also run once, one after the other, each in a process of its own (`run_peak`)."""
    if execute:
        _check_executable(targets)
        run_peak.no_preallocation()  # before this process first touches a GPU
    results = load_results(out)
    order, todo = _plan(results, presets, programs, targets, force, execute)

    def done(e: dict) -> None:
        e["command"] = command
        results["entries"][e["id"]] = e
        save_results(results, out)
        if md:
            write_markdown(results, out, md)
        phase(_described(e))

    if execute:
        for eid, st, program, option, target, fp, why in todo:
            phase(f"{eid}: compiling for {target.kind} and running once, in a process of its own ({why})")
            done(run_peak.measure_in_fresh_process(st.preset.name, program, option, target.name))
    elif jobs <= 1:
        for eid, st, program, option, target, fp, why in todo:
            phase(f"{eid}: compiling for {target.kind} ({why})")
            done(measure(st, program, option, target, fp))
            jax.clear_caches()
            gc.collect()
    elif todo:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        with ThreadPoolExecutor(jobs) as pool:
            pending = set()
            for eid, st, program, option, target, fp, why in todo:
                if len(pending) >= jobs:  # at most `jobs` lowered programs held at once
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done(f.result())
                phase(f"{eid}: lowering, then compiling for {target.kind} ({why})")
                pending.add(pool.submit(compile_entry, st, program, option, target, fp, *lower(st, program)))
            for f in wait(pending).done:
                done(f.result())
        jax.clear_caches()
        gc.collect()
    save_results(results, out)
    if md:
        write_markdown(results, out, md)
    print(format_table([results["entries"][eid] for eid in order]), flush=True)
    return [results["entries"][eid] for eid in order]


def default_md(out: str) -> str:
    return os.path.splitext(out)[0] + ".md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.bench.memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help=f"comma-separated, of {', '.join(PRESETS)} (tiny: the test model)")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help="comma-separated, of token, estep, joint; program:a+b takes exactly option sets a and b")
    p.add_argument("--options", default=",".join(OPTIONS),
                   help=f"comma-separated option sets (token and estep take {' and '.join(STEP_OPTIONS)} only): "
                        f"{', '.join(OPTIONS)}")
    p.add_argument("--target", default="cpu", help="cpu, gpu, tpu (this machine's accelerator), or tpu-<topology> "
                                                    "(ahead of time: tpu-v5e, tpu-v5e:2x2, tpu-v6e:1x1, ...; needs "
                                                    "libtpu); comma-separated for several")
    p.add_argument("--out", default="docs/memory.json")
    p.add_argument("--md", default=None, help="the rendered page (default: --out with .md)")
    p.add_argument("--force", action="store_true", help="recompute entries already in --out")
    p.add_argument("--report", action="store_true", help="only render --md from --out")
    p.add_argument("--jobs", type=int, default=1, help="programs compiling at once (threads; memory grows with it)")
    p.add_argument("--execute", action="store_true",
                   help="also run each program once, in a process of its own, for the device allocator's peak "
                        "(--target gpu / tpu: this machine's accelerator; on cpu the run is done, no peak is read)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    md = a.md or default_md(a.out)
    try:
        if a.report:
            results = load_results(a.out)
            write_markdown(results, a.out, md)
            print(format_table(sorted(results["entries"].values(), key=_order)), flush=True)
            phase(f"wrote {md} from {a.out}")
            return 0
        options = [o.strip() for o in a.options.split(",") if o.strip()]
        check_options(options)
        programs = parse_programs(a.programs, options)
        presets = [p.strip() for p in a.presets.split(",") if p.strip()]
        targets = [t.strip() for t in a.target.split(",") if t.strip()]
        command = "python -m jaxconcept.bench.memory " + " ".join(shlex.quote(x) for x in argv)
        run(presets, programs, targets, a.out, md, a.force, command, a.jobs, a.execute)
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
