"""Speed benchmark: our jitted steps against a PyTorch diffusers reference, same machine, same configuration.

    python -m jaxconcept.bench.speed --config tiny
    python -m jaxconcept.bench.speed --config sd15 --dtype bfloat16 --iters 20          # on a GPU
    python -m jaxconcept.bench.speed --config sd15 --iters 20 --timesteps 16            # fp32 (TF32 for torch)
    python -m jaxconcept.bench.speed --config tiny --skip-torch --out runs/speed_tiny
    python -m jaxconcept.bench.speed --config sd15 --dtype bfloat16 --crf device-latent   # E-step CRF on the device
    python -m jaxconcept.bench.speed --config tiny-sdxl                                  # SDXL's structure, 32 px
    python -m jaxconcept.bench.speed --config sdxl --dtype bfloat16 --iters 10 --timesteps 8 \
        --steps token,estep,sample,joint_lora                                            # SDXL base, 80 GB GPU
    # SD 1.5 on a CPU: smaller images, fewer timesteps and sampling steps, no joint step (its AdamW state
    # over the UNet needs ~14 GB per implementation)
    OMP_WAIT_POLICY=PASSIVE python -m jaxconcept.bench.speed --config sd15 --resolution 256 --iters 2 \
        --timesteps 2 --sample-steps 2 --steps token,estep,sample

Timed after compile / warm-up, ours and the reference's calls in alternation (one of each per round, the
order reversed every other round, --iters rounds), so a change in the machine's load falls on both alike:
the median of each, its 25-75% range, and the speed-up as the ratio of the medians with the 25-75% range of
the per-round ratios (`block_until_ready` for ours, a device synchronisation and `torch.no_grad` where the
reference does no training). Both implementations' models are held at once, one step group at a time:
  token    one token step: concept rows trainable, UNet and text encoder frozen; L_mask + 0.01 L_attn with
           the cross-attention captured at the 16x16-equivalent layers (SD 1.5 at 512 px: down_blocks.2 and
           up_blocks.1), global-norm clip 1.0, AdamW 5e-4 (`steps.make_train_step`).
  joint    one joint step: concept rows and UNet trainable, AdamW 2e-6.
  joint_lora  one LoRA joint step: concept rows and rank-4 adapters on the attention projections trainable,
           the UNet frozen, AdamW 1e-4 (the SD presets' joint stage); the reference trains peft adapters on the
           same layers. Also reported against the reference's full joint step (what Break-a-Scene runs).
  e_attn   the E-step's attention pass (`steps.make_concept_maps`, T timesteps in one batch, maps upsampled
           to image size and brought to the host), per image.
  e_crf    the E-step's host side (`estep.assign_masks`: labels, multi-label DenseCRF, clean-up); one
           (--crf host: pydensecrf at image size; device-latent: the exact dense CRF in JAX at latent size)
           shared implementation, so it is counted once, for both.
  e_step   e_attn + e_crf.
  sample   one guided DDIM sample (batch 1, 50 steps by default, guidance 7.5, text encoding and VAE
           decode included; `sampling.make_batch_sampler`).
The PyTorch reference (`bench/torch_reference.py`, on diffusers' PyTorch UNet2DConditionModel / AutoencoderKL /
DDIMScheduler and transformers' CLIPTextModel, built from the same configs, random weights) does what
Break-a-Scene's trainer does; the configurations and the shared workload are in `bench/workload.py`.

Also reported: compile time (ours) and first-call time (torch) separately; the E-step's share of the EM
wall time with an E-step every 50 token steps, E / (50 token + E); FLOPs per step from XLA's cost analysis
of our compiled programs and, for sd15, from docs/method.md §7's cost model (area-scaled off 512 px), the achieved
TFLOP/s and, on a GPU, the fraction of the measured (bf16 matmul) and quoted bf16 peak. Everything goes to
DIR/speed.json (default runs/speed).

Configurations (`CONFIGS`, importable): "tiny" = `model.tiny_model()` (32 px) and "sd15" = SD 1.5's
architecture (UNet, CLIP ViT-L/14 text encoder, VAE) with seeded random weights and the real vocabulary
size (49408 rows, the words beyond `model.TINY_WORDS` unused): no downloads. torch is optional; without it
(or with --skip-torch) only ours is timed and the ratios are left out.
SDXL: "tiny-sdxl" = `model.tiny_sdxl_model()` (32 px; the loss at its 8x8 layers, the E-step at 8 and 4) and "sdxl" =
SDXL base 1.0's architecture (the 2.6 B-parameter UNet, CLIP ViT-L/14's and OpenCLIP ViT-bigG's text towers, the
VAE; 49408-row tables) at 1024 px, random weights, the `sdxl` preset's layers (the loss at 32x32, the E-step at 32
and 64). Both sides condition as StableDiffusionXLPipeline does: both encoders' penultimate states, the second's
pooled projection and the time ids of the 1024 px image; both token tables trained (the reference restores the
non-concept rows of each); the sample's unconditional text is zeros (SDXL base's force_zeros_for_empty_prompt).
"sdxl" is for an accelerator and was not run here (no device was lent; tests time "tiny-sdxl" on the CPU). What
it holds, from the architecture: fp32 UNet weights 10.3 GB, the text encoders 3.3 GB, per implementation (both are
held at once); the full joint step adds the UNet's gradients and AdamW moments (41 GB per implementation before
activations), so on one 80 GB GPU leave `joint` out (`--steps token,estep,sample,joint_lora`) or time it alone; the
E-step's T timesteps form one batch whose 64x64 self-attention probabilities take 0.67 GB per timestep and layer in
fp32 (4096^2 x 10 heads), so keep --timesteps small (8) there.

Threads: XLA's CPU client runs its own pool (all cores); torch is set to `torch.set_num_threads(os.cpu_count())`
(--torch-threads to change). On a shared machine both compete with whatever else runs, and torch's OpenMP
threads spin-wait for each other: with the cores oversubscribed a tiny UNet call went from 20 ms to 2 s.
Start with OMP_WAIT_POLICY=PASSIVE there (read when torch loads, so it must be in the environment), and
compare numbers from the same run only.
"""

from __future__ import annotations

import os

# jax and torch share one accelerator here: jax must not take 75% of its memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..em import steps
from ..masks import estep, labels as masks_lib
from ..model import capture, conditioning, loading as model, lora, sampling
from ..parallel import sharding
from ..errors import JaxconceptError

from .torch_reference import (TorchModels, torch_available, torch_build, torch_estep_call, torch_sample_call,
                              torch_train_call)
from .workload import (ATTN_WEIGHT, BACKGROUND_LEVEL, CLIP, CONCEPTS, CONFIGS, ESTEP_EVERY, GROUPS, GUIDANCE,
                       LABELS, LORA_ALPHA, LORA_RANK, QUOTED_BF16_PEAK, SD15_TFLOP, STAGE_LR, STEPS, WEIGHT_DECAY,
                       BenchConfig, Workload, prepare_ours)


# ------------------------------------------------------------------------------------------ timing


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def time_calls(call: Callable[[], Any], iters: int, warmup: int = 1) -> dict:
    """Wall times of `call()` (which must wait for its own result): the first call (compile / warm-up)
    apart, then `iters` timed calls."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"ms": median_ms(times), "all_ms": [round(1000 * s, 3) for s in times], "first_call_s": round(first, 3)}


def _spread(values: list[float]) -> tuple[float, float]:
    """(25th, 75th) percentiles."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def time_interleaved(calls: dict[str, Callable[[], Any]], iters: int, warmup: int = 1) -> dict:
    """Wall times of each implementation's `call()`, taken in alternation: after their first calls (compile /
    warm-up) and `warmup - 1` more, `iters` rounds each time every call once, the order reversed every other
    round, so that a change in the machine's load falls on all of them alike. Per name: the median, all
    times, the 25th-75th percentile range and the first call; with two names, the paired ratios (second over
    first, round by round) as `ratio` median and range."""
    names = list(calls)
    first = {}
    for name in names:
        t0 = time.perf_counter()
        calls[name]()
        first[name] = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    for r in range(iters):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name in names:
        lo, hi = _spread(times[name])
        out[name] = {"ms": median_ms(times[name]), "all_ms": [round(1000 * x, 3) for x in times[name]],
                     "p25_ms": round(1000 * lo, 3), "p75_ms": round(1000 * hi, 3),
                     "first_call_s": round(first[name], 3)}
    if len(names) == 2:
        ratios = [b / a for a, b in zip(times[names[0]], times[names[1]])]
        lo, hi = _spread(ratios)
        out["ratio"] = {"median": statistics.median(ratios), "p25": lo, "p75": hi}
    return out


def phase(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def xla_flops(obj) -> float | None:
    """FLOPs from XLA's cost analysis of a Compiled or Lowered program (None where unavailable)."""
    try:
        cost = obj.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def compile_timed(jitted, *args) -> tuple[Any, float, float | None]:
    """(compiled program, seconds to lower and compile, XLA FLOPs)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0, xla_flops(compiled)


# ------------------------------------------------------------------------------------------ ours


def _block(tree):
    return jax.block_until_ready(tree)


def frozen_weights(bundle) -> dict:
    """The text encoder(s) (SDXL: both) and the UNet: what the token step and the E-step read frozen."""
    return {**conditioning.text_params(bundle.params), "unet": bundle.params["unet"]}


def ours_train_call(setup, work: Workload, mesh, stage: str, seed: int) -> tuple[Callable[[], None], dict]:
    """(call, info) of a token, joint or LoRA joint step (`steps.make_train_step`), compiled: one call runs one
    step and waits for it; info holds the compile time, XLA's FLOPs and the losses seen."""
    b = setup.bundle
    lora_scale = LORA_ALPHA / LORA_RANK if stage == "joint_lora" else 0.0
    loss_cfg = steps.LossConfig(batch_size=work.batch, attn_weight=ATTN_WEIGHT, attn_resolution=work.attn_grid,
                                lora_scale=lora_scale)
    place = lambda tree: sharding.put_replicated(tree, mesh)  # noqa: E731
    rows = jnp.asarray(setup.concepts.init_rows)
    frozen = place(frozen_weights(b))
    if stage == "token":
        trainable = {"rows": rows}
    elif stage == "joint_lora":  # adapters on the frozen UNet (model/lora.py)
        spec = lora.LoraSpec(LORA_RANK, LORA_ALPHA)
        trainable = {"rows": rows, "lora": lora.init(jax.random.key(seed), b.params["unet"], spec)}
    else:  # fresh buffers: the step donates its state
        trainable = jax.tree.map(jnp.copy, {"rows": rows, "unet": b.params["unet"]})
        frozen = conditioning.text_params(frozen)
    # as a run builds it: a small joint stage's trainables (LoRA adapters, a tiny UNet) updated as one flat vector
    opt = steps.make_optimizer(STAGE_LR[stage], CLIP, WEIGHT_DECAY,
                               flat=stage != "token" and steps.flat_update_fits(trainable))
    state = place(steps.init_state(trainable, opt))
    run_data, masks_lat = place(setup.run_data), place(jnp.asarray(work.masks_Cxhxw))
    key = place(jax.random.key(seed))
    step = steps.make_train_step(b, setup.concepts.ids, loss_cfg, opt, mesh)
    compiled, compile_s, flops = compile_timed(step, state, frozen, run_data, masks_lat, key)
    cell, losses = [state], []

    def call():
        cell[0], metrics = compiled(cell[0], frozen, run_data, masks_lat, key)
        losses.append(_block(metrics)["loss"])

    return call, {"compile_s": round(compile_s, 3), "flops_xla": flops, "losses": losses}


def ours_estep_call(setup, work: Workload, mesh, seed: int) -> tuple[Callable[[], None], dict, list]:
    """(call, info, soft): the E-step's attention pass of one image as `estep.estimate_masks` runs it (maps
    upsampled to image size, brought to the host); soft[0] holds the last soft maps, for the CRF."""
    b = setup.bundle
    selector = capture.LayerSelector(resolutions=work.estep_grids)
    maps_fn = steps.make_concept_maps(b, setup.concepts.ids, selector, work.timesteps, setup.latent_hw, mesh)
    frozen = sharding.put_replicated(frozen_weights(b), mesh)
    args = sharding.put_replicated((jnp.asarray(setup.concepts.init_rows), frozen, setup.run_data["latents"][0, 0],
                                    jnp.asarray(work.image_ids_T), jnp.asarray(work.image_positions_C),
                                    jax.random.key(seed)), mesh)
    compiled, compile_s, flops = compile_timed(maps_fn.jitted, *args)
    size = work.image_u8.shape[:2]
    upsample = jax.jit(lambda m: masks_lib.upsample_maps(m, size))
    soft = [None]

    def call():
        soft[0] = np.asarray(upsample(compiled(*args)))

    return call, {"compile_s": round(compile_s, 3), "flops_xla": flops}, soft


CRF_CHOICES = ("host", "device-latent")


def bench_crf(soft_CxHxW: np.ndarray, work: Workload, iters: int, crf: str = "host", latent_hw=None) -> dict:
    """`estep.assign_masks` on the E-step's soft maps (shared by both implementations): pydensecrf on the
    host at image size, or the exact dense CRF on the device at latent size."""
    info = {}
    where = ("host", None) if crf == "host" else ("device", tuple(latent_hw))

    def call():
        info.update(estep.assign_masks(soft_CxHxW, work.image_u8, list(work.kinds),
                                       estep.MaskRules(BACKGROUND_LEVEL, True, 0.5, *where))[2])

    out = time_calls(call, iters, 1)
    return dict(out, crf_seconds_inside=info.get("crf_seconds"))


def ours_sample_call(setup, work: Workload, mesh, seed: int) -> tuple[Callable[[], None], dict]:
    b = setup.bundle
    sampler = sampling.make_batch_sampler(b, "ddim", work.sample_steps, mesh, setup.concepts.ids,
                                          sampling.zeros_for_uncond(b))
    ids = jnp.asarray(work.sample_ids_2xT)
    noise = jax.random.normal(jax.random.key(seed), (1, b.unet.config.in_channels, work.latent, work.latent), b.dtype)
    place = lambda tree: sharding.put_replicated(tree, mesh)  # noqa: E731
    args = (place(b.params), place(jnp.asarray(setup.concepts.init_rows)), noise, ids[1:], ids[:1],
            place(jnp.float32(GUIDANCE)))
    compiled, compile_s, flops = compile_timed(sampler, *args)
    return (lambda: _block(compiled(*args))), {"compile_s": round(compile_s, 3),
                                                "flops_xla": sample_flops_xla(b, work, flops)}


def sample_flops_xla(bundle, work: Workload, sampler_flops: float | None) -> float | None:
    """XLA counts a while loop's body once: add the other (steps - 1) UNet evaluations (batch 2), costed from
    the lowered (not compiled) UNet program."""
    if sampler_flops is None:
        return None
    lat = jax.ShapeDtypeStruct((2, bundle.unet.config.in_channels, work.latent, work.latent), bundle.dtype)
    ctx = jax.eval_shape(lambda p, ids: conditioning.encode(conditioning.text_model(bundle), p, ids,
                                                            time_ids_K=work.time_ids_K),
                         conditioning.text_params(bundle.params), jnp.asarray(work.sample_ids_2xT))
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bundle.params["unet"])
    unet = jax.jit(lambda p, x, tt, c: capture.unet_eps(bundle.unet, p, x, tt, c))
    per_eval = xla_flops(unet.lower(params, lat, t, ctx))
    if per_eval is None:
        return None
    return sampler_flops + (work.sample_steps - 1) * per_eval


def torch_setup(work: Workload, dtype: str, seed: int, threads: int = 0) -> tuple[TorchModels, dict]:
    """The reference's models and what describes its run (device, threads, autocast)."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    phase("torch: building the reference models")
    tm = torch_build(work, dtype, seed)
    info = {"device": str(tm.device), "threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "device_name": torch.cuda.get_device_name(0) if tm.device.type == "cuda" else platform.processor(),
            "autocast": str(tm.autocast_dtype) if tm.autocast_dtype else None}
    return tm, info


# ------------------------------------------------------------------------------------------ both, interleaved


def _timed(ours_call, torch_call, iters: int, warmup: int) -> dict:
    calls = {"ours": ours_call, **({"torch": torch_call} if torch_call is not None else {})}
    return time_interleaved(calls, iters, warmup)


def _train_group(setup, work, mesh, tm, stage, iters, warmup, seed):
    o_call, info = ours_train_call(setup, work, mesh, stage, seed)
    t_call, finish = torch_train_call(tm, work, stage, seed) if tm is not None else (None, None)
    timed = _timed(o_call, t_call, iters, warmup)
    info["losses"] = [float(x) for x in info["losses"]]
    ours = {stage: dict(timed["ours"], **info, pair_ratio=timed.get("ratio"))}
    return ours, ({stage: dict(timed["torch"], **finish())} if tm is not None else {})


def _estep_group(setup, work, mesh, tm, iters, warmup, seed, crf):
    o_call, info, soft = ours_estep_call(setup, work, mesh, seed)
    t_call = torch_estep_call(tm, work, seed) if tm is not None else None
    timed = _timed(o_call, t_call, iters, warmup)
    ours = {"e_attn": dict(timed["ours"], **info, pair_ratio=timed.get("ratio")),
            "e_crf": bench_crf(soft[0], work, iters, crf, setup.latent_hw)}
    return ours, ({"e_attn": timed["torch"]} if tm is not None else {})


def _sample_group(setup, work, mesh, tm, iters, warmup, seed):
    o_call, info = ours_sample_call(setup, work, mesh, seed)
    t_call = torch_sample_call(tm, work, seed) if tm is not None else None
    timed = _timed(o_call, t_call, iters, warmup)
    ours = {"sample": dict(timed["ours"], **info, pair_ratio=timed.get("ratio"))}
    return ours, ({"sample": timed["torch"]} if tm is not None else {})


def run_steps(setup, work: Workload, groups, iters: int, warmup: int, seed: int, crf: str = "host",
              tm: TorchModels | None = None) -> tuple[dict, dict | None]:
    """(ours, reference): each step group timed with ours and the reference's calls in alternation
    (`time_interleaved`), one group after the other, each freed before the next."""
    mesh = sharding.make_mesh(jax.devices()[:1])  # one device: the reference runs on one too
    ours, ref = {}, ({} if tm is not None else None)
    for group in (g for g in GROUPS if g in groups):
        phase(f"{group}: compiling ours, then timing ours{' and torch in alternation' if tm else ''} "
              f"({iters} rounds)")
        if group in ("token", "joint", "joint_lora"):
            o, r = _train_group(setup, work, mesh, tm, group, iters, warmup, seed)
        elif group == "estep":
            o, r = _estep_group(setup, work, mesh, tm, iters, warmup, seed, crf)
        else:
            o, r = _sample_group(setup, work, mesh, tm, iters, warmup, seed)
        ours.update(o)
        if ref is not None:
            ref.update(r)
        for name in o:
            theirs = f", torch {r[name]['ms']:.2f} ms" if name in r else ""
            phase(f"{name}: ours {o[name]['ms']:.2f} ms{theirs}")
        gc.collect()
    return ours, ref


# ------------------------------------------------------------------------------------------ FLOPs and report


def model_flops(work: Workload) -> dict:
    """docs/method.md §7's cost model (SD 1.5, 512 px) per step, area-scaled to the resolution; {} for other configs."""
    if work.bench.name != "sd15":
        return {}
    s = (work.resolution / 512) ** 2
    unet_fwd = SD15_TFLOP["unet_forward"] * 1e12 * s
    decode = (SD15_TFLOP["sample_50"] - 50 * 2 * SD15_TFLOP["unet_forward"]) * 1e12 * s
    attn = work.timesteps * unet_fwd
    return {"token": SD15_TFLOP["unet_fwd_bwd_text"] * 1e12 * s * work.batch,
            "joint": SD15_TFLOP["unet_fwd_bwd_all"] * 1e12 * s * work.batch,
            # the backward pass reaches the activations as the token step's does; the adapters' own are tiny
            "joint_lora": SD15_TFLOP["unet_fwd_bwd_text"] * 1e12 * s * work.batch,
            "e_attn": attn, "e_step": attn,
            "sample": work.sample_steps * 2 * unet_fwd + decode}


def measure_peak_bf16(n: int = 8192, reps: int = 10) -> float | None:
    """bf16 matmul FLOP/s on the default accelerator (None on CPU)."""
    if jax.default_backend() == "cpu":
        return None
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    _block(f(a))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    _block(out)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def quoted_peak(device_kind: str) -> float | None:
    for name, peak in QUOTED_BF16_PEAK.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def combine(ours: dict, ref: dict | None, work: Workload, peak: dict) -> dict:
    """Per step: ours / torch ms, speed-up, compile / first-call seconds, FLOPs and TFLOP/s."""
    ours = dict(ours)
    if "e_attn" in ours:
        crf_ms = ours["e_crf"]["ms"]
        ours["e_step"] = {"ms": ours["e_attn"]["ms"] + crf_ms, "flops_xla": ours["e_attn"].get("flops_xla")}
        if ref is not None:  # the CRF is shared host code: counted once, for both
            ref = dict(ref, e_crf=dict(ours["e_crf"], shared=True), e_step={"ms": ref["e_attn"]["ms"] + crf_ms})
    flops_model = model_flops(work)
    out = {}
    for name in (n for n in STEPS if n in ours):
        o = ours[name]
        row = {"ours_ms": o["ms"], "ours_all_ms": o.get("all_ms"), "ours_compile_s": o.get("compile_s"),
               "ours_first_call_s": o.get("first_call_s"), "flops_xla": o.get("flops_xla"),
               "flops_model": flops_model.get(name), "ours_p25_ms": o.get("p25_ms"), "ours_p75_ms": o.get("p75_ms")}
        if ref is not None:
            r = ref[name]
            row.update(torch_ms=r["ms"], torch_all_ms=r.get("all_ms"), torch_first_call_s=r.get("first_call_s"),
                       torch_p25_ms=r.get("p25_ms"), torch_p75_ms=r.get("p75_ms"), speedup=r["ms"] / o["ms"])
            if o.get("pair_ratio"):  # torch / ours, round by round
                p = o["pair_ratio"]
                row.update(speedup_paired=p["median"], speedup_p25=p["p25"], speedup_p75=p["p75"])
            if name == "joint_lora" and "joint" in ref:  # against Break-a-Scene's full joint step
                row["speedup_vs_torch_full_joint"] = ref["joint"]["ms"] / o["ms"]
            if name == "e_crf":
                row["shared"] = True
        for src in ("xla", "model"):
            flops = row[f"flops_{src}"]
            if flops:
                row[f"ours_tflops_{src}"] = flops / (o["ms"] / 1e3) / 1e12
                if ref is not None:
                    row[f"torch_tflops_{src}"] = flops / (row["torch_ms"] / 1e3) / 1e12
                for which, value in peak.items():
                    if value:
                        row[f"ours_fraction_of_{which}_{src}"] = row[f"ours_tflops_{src}"] * 1e12 / value
                        if ref is not None:
                            row[f"torch_fraction_of_{which}_{src}"] = row[f"torch_tflops_{src}"] * 1e12 / value
        out[name] = row
    return out


def estep_share(token_ms: float, estep_ms: float, every: int = ESTEP_EVERY) -> float:
    """E-step's share of EM wall time with an E-step every `every` token steps: E / (every token + E)."""
    return estep_ms / (every * token_ms + estep_ms)


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _pair(row: dict, key: str, scale: float = 1.0, spec: str = ".3f") -> str:
    """'XLA / §7' figures of one row."""
    x, m = row.get(f"{key}_xla" if key else "flops_xla"), row.get(f"{key}_model" if key else "flops_model")
    return f"{_f(x and x * scale, spec)} / {_f(m and m * scale, spec)}"


def format_tables(result: dict) -> str:
    """The printed report: times and speed-ups, the E-step share, FLOPs and throughput."""
    work, rows = result["config"], result["steps"]
    has_torch = result["device"]["torch"] is not None
    labels = {k: v.format(T=work["estep_timesteps"], S=work["sample_steps"], C=work.get("crf", "host"), R=LORA_RANK)
              for k, v in LABELS.items()}
    w = max(len(v) for v in labels.values())
    lines = [f"{'step':<{w}} | {'ours (ms)':>11} | {'torch (ms)':>11} | {'speed-up (torch/ours)':>21} | "
             f"{'paired, 25-75%':>16} | {'ours compile (s)':>16} | {'torch 1st call (s)':>18}"]
    lines.append("-" * len(lines[0]))
    for k in (n for n in STEPS if n in rows):
        r = rows[k]
        sp = _f(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else "")
        paired = (f"{r['speedup_p25']:.2f}-{r['speedup_p75']:.2f}x" if r.get("speedup_p25") else "-")
        lines.append(f"{labels[k]:<{w}} | {_f(r['ours_ms']):>11} | {_f(r.get('torch_ms')):>11} | {sp:>21} | "
                     f"{paired:>16} | {_f(r.get('ours_compile_s'), '.1f'):>16} | "
                     f"{_f(None if r.get('shared') else r.get('torch_first_call_s'), '.1f'):>18}")
    if rows.get("joint_lora", {}).get("speedup_vs_torch_full_joint"):
        lines.append(f"LoRA joint step against the reference's full joint step (Break-a-Scene): "
                     f"{rows['joint_lora']['speedup_vs_torch_full_joint']:.2f}x")
    lines.append("ours and torch timed in alternation, round by round; speed-up: ratio of the medians; paired: "
                 "the 25th-75th percentiles of the per-round ratios")
    share = result["estep_share"]
    if share:
        every = ESTEP_EVERY
        torch_share = f", torch {100 * share['torch']:.1f}%" if has_torch else ""
        lines += ["", f"E-step share of EM wall time (E-step every {every} token steps, E / ({every} token + E)): "
                      f"ours {100 * share['ours']:.1f}%{torch_share}"]
    peak = result["peak"]
    peak_key = "measured" if peak.get("measured") else ("quoted" if peak.get("quoted") else None)
    head = (f"{'step':<{w}} | {'GFLOP XLA / §7':>21} | {'ours TFLOP/s XLA / §7':>21} | "
            f"{'torch TFLOP/s XLA / §7':>22}")
    if peak_key:
        head += f" | {'ours % ' + peak_key + ' peak':>24} | {'torch % ' + peak_key + ' peak':>25}"
    lines += ["", head, "-" * len(head)]
    for k in (n for n in ("token", "joint", "joint_lora", "e_attn", "sample") if n in rows):
        r = rows[k]
        line = (f"{labels[k]:<{w}} | {_pair(r, '', 1e-9, '.1f'):>21} | {_pair(r, 'ours_tflops'):>21} | "
                f"{_pair(r, 'torch_tflops'):>22}")
        if peak_key:
            line += (f" | {_pair(r, f'ours_fraction_of_{peak_key}', 100, '.1f'):>24}"
                     f" | {_pair(r, f'torch_fraction_of_{peak_key}', 100, '.1f'):>25}")
        lines.append(line)
    lines.append("FLOPs: XLA's cost analysis of our compiled programs / docs/method.md §7's cost model (sd15 only); "
                 "torch is credited with the same FLOPs.")
    if peak_key:
        lines.append(f"bf16 peak: measured {_f(peak.get('measured') and peak['measured'] / 1e12, '.0f')} TFLOP/s "
                     f"(jax bf16 matmul), quoted {_f(peak.get('quoted') and peak['quoted'] / 1e12, '.0f')} TFLOP/s")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def versions() -> dict:
    import diffusers
    import flax
    import jaxlib
    import transformers

    v = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    try:
        import torch

        v["torch"] = torch.__version__
    except Exception:  # noqa: BLE001
        v["torch"] = None
    return v


# ------------------------------------------------------------------------------------------ entry points


def run_notes(bench: BenchConfig, work: Workload, dtype: str, skip_torch: bool, use_torch: bool,
              torch_info: dict | None) -> list[str]:
    """Caveats printed under the tables and kept in speed.json."""
    device = jax.devices()[0]
    notes = []
    if skip_torch:
        notes.append("--skip-torch: only ours timed, ratios left out")
    elif not use_torch:
        notes.append("torch / diffusers' PyTorch models not importable: only ours timed, ratios left out")
    if torch_info and torch_info["device"] == "cpu" and device.platform != "cpu":
        notes.append("torch runs on the CPU but jax on an accelerator: the ratios compare devices")
    if device.platform == "cpu":
        flags = os.environ.get("XLA_FLAGS", "")
        threads = torch_info["threads"] if torch_info else os.cpu_count()
        notes.append(f"CPU threads: XLA's own pool (all {os.cpu_count()} cores, XLA_FLAGS={flags!r}), "
                     f"torch.set_num_threads({threads}), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; on a "
                     "shared machine both compete with other load (torch's OpenMP spin-waits collapse when the "
                     "cores are oversubscribed: start with OMP_WAIT_POLICY=PASSIVE, or --torch-threads 1)")
    if bench.name == "sd15" and work.resolution != 512:
        notes.append(f"§7 FLOPs are for 512 px, scaled by area to {work.resolution} px (attention does not scale so)")
    if dtype == "bfloat16":
        notes.append("bfloat16: ours holds params and computes in bf16 (AdamW on bf16 UNet weights in the joint "
                     "step); torch keeps fp32 params under bf16 autocast")
    return notes


def assemble(work: Workload, opts: "Options", ours: dict, ref: dict | None, torch_info: dict | None,
             notes: list[str]) -> dict:
    """Everything speed.json holds (`opts.groups`: those timed, in the order they ran)."""
    device = jax.devices()[0]
    peak = {"measured": measure_peak_bf16(),
            "quoted": quoted_peak(device.device_kind) if device.platform == "gpu" else None}
    rows = combine(ours, ref, work, peak)
    share = {}
    if "token" in rows and "e_step" in rows:
        share["ours"] = estep_share(rows["token"]["ours_ms"], rows["e_step"]["ours_ms"])
        if ref is not None:
            share["torch"] = estep_share(rows["token"]["torch_ms"], rows["e_step"]["torch_ms"])
    check = None
    if ref is not None and "token" in ref:
        check = {k: ref["token"][k] for k in ("losses", "changed_rows", "grad_rows_nonzero", "concept_grad_norm")}
        check.update(concept_ids=list(work.concept_ids), joint_losses=ref.get("joint", {}).get("losses"),
                     joint_lora_losses=ref.get("joint_lora", {}).get("losses"))
    bench = work.bench
    return {
        "device": {"platform": device.platform, "kind": device.device_kind, "jax_devices_used": 1,
                   "cpu_count": os.cpu_count(), "torch": torch_info},
        "versions": versions(),
        "config": {"name": bench.name, "resolution": work.resolution, "latent": work.latent, "dtype": opts.dtype,
                   "batch": work.batch, "iters": opts.iters, "warmup": opts.warmup, "step_groups": list(opts.groups),
                   "estep_timesteps": work.timesteps, "sample_steps": work.sample_steps, "guidance": GUIDANCE,
                   "attn_grid": work.attn_grid, "estep_grids": list(work.estep_grids), "vocab_size": work.vocab_size,
                   "concepts": [c for c, _, _ in CONCEPTS], "estep_every": ESTEP_EVERY,
                   "text": bench.text, "text_2": bench.text_2, "unet": bench.unet, "vae": bench.vae, "crf": opts.crf},
        "steps": rows,
        "estep_share": share,
        "peak": peak,
        "ours_token_losses": ours.get("token", {}).get("losses"),
        "torch_reference_check": check,
        "notes": notes,
    }


@dataclasses.dataclass(frozen=True)
class Options:
    """What `run` times and how: the command line's options (`parse_args`), with its defaults."""

    config_name: str = "tiny"  # --config: a key of CONFIGS
    iters: int = 20
    batch: int = 1
    dtype: str = "float32"
    out: str = "runs/speed"
    skip_torch: bool = False
    resolution: int = 0  # 0: the model's own
    timesteps: int = 0  # the E-step's T (0: the config's)
    sample_steps: int = 50
    warmup: int = 1
    seed: int = 0
    torch_threads: int = 0  # 0: os.cpu_count()
    groups: tuple[str, ...] = GROUPS  # --steps
    crf: str = "host"


def run(opts: Options = Options()) -> dict:
    """Run the benchmark, print the tables, write OUT/speed.json; returns what it wrote."""
    if opts.config_name not in CONFIGS:
        raise JaxconceptError(f"unknown config {opts.config_name!r}: use one of {', '.join(CONFIGS)}")
    if opts.crf not in CRF_CHOICES:
        raise JaxconceptError(f"unknown --crf {opts.crf!r}: use one of {', '.join(CRF_CHOICES)}")
    bench = CONFIGS[opts.config_name]
    opts = dataclasses.replace(opts, groups=tuple(g for g in GROUPS if g in opts.groups))
    os.makedirs(opts.out, exist_ok=True)
    use_torch = not opts.skip_torch and torch_available()
    device = jax.devices()[0]
    phase(f"config {opts.config_name} at {bench.resolution(opts.resolution)} px, {opts.dtype}, batch {opts.batch}, "
          f"iters {opts.iters}, steps {','.join(opts.groups)}, jax on {device.platform} ({device.device_kind})")
    with tempfile.TemporaryDirectory() as folder:
        phase("ours: building the model with random weights, encoding the image (VAE compile)")
        setup, work = prepare_ours(bench, opts.resolution, model.as_dtype(opts.dtype), opts.batch,
                                   opts.timesteps or bench.estep_timesteps, opts.sample_steps, folder, opts.seed)
    tm, torch_info = (torch_setup(work, opts.dtype, opts.seed, opts.torch_threads) if use_torch
                      else (None, None))
    ours, ref = run_steps(setup, work, list(opts.groups), opts.iters, opts.warmup, opts.seed, opts.crf, tm)
    del setup, tm
    gc.collect()
    notes = run_notes(bench, work, opts.dtype, opts.skip_torch, use_torch, torch_info)
    result = assemble(work, opts, ours, ref, torch_info, notes)
    with open(os.path.join(opts.out, "speed.json"), "w") as f:
        json.dump(result, f, indent=2, default=_jsonable)
    print(format_tables(result), flush=True)
    phase(f"wrote {os.path.join(opts.out, 'speed.json')}")
    return result


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.bench.speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--iters", type=int, default=20,
                   help="timed rounds per step, ours and torch in alternation (medians and 25-75%% ranges reported)")
    p.add_argument("--batch", type=int, default=1, help="instance batch of the token and joint steps")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="runs/speed")
    p.add_argument("--skip-torch", action="store_true", help="time ours only")
    p.add_argument("--resolution", type=int, default=0, help="image size (0: the model's own; sd15 at 256 on a CPU)")
    p.add_argument("--timesteps", type=int, default=0, help="E-step T (0: 8 on tiny, 50 on sd15)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (the first compiles)")
    p.add_argument("--steps", default=",".join(GROUPS),
                   help=f"comma-separated step groups to time, of {','.join(GROUPS)} (e.g. leave out joint where "
                        "memory is short: it holds the UNet's AdamW state)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crf", default="host", choices=CRF_CHOICES,
                   help="E-step CRF: pydensecrf on the host at image size, or the exact one on the device at "
                        "latent size")
    return p.parse_args(argv)


def parse_groups(text: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise JaxconceptError(f"--steps {text!r}: use a comma-separated subset of {','.join(GROUPS)}")
    return groups


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(Options(a.config, a.iters, a.batch, a.dtype, a.out, a.skip_torch, a.resolution, a.timesteps,
                    a.sample_steps, a.warmup, a.seed, a.torch_threads, parse_groups(a.steps), a.crf))
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
