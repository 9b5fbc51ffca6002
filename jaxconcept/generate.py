"""Generate images with learned concepts, or with a base model alone (plain text-to-image).

    python -m jaxconcept.generate --run runs/toy --prompt "a <red_triangle> on a teal water background"
    python -m jaxconcept.generate --run runs/dog --prompt "a photo of <dog> at the beach" --num-images 8 \\
        --scheduler dpm++ --steps 25 --negative-prompt "blurry"
    python -m jaxconcept.generate --model toy --prompt "a red circle on a green grass background"

One compiled program per batch shape: prompt ids in, images out (text encoding with the learned rows
spliced in, guided denoising, VAE decoding), the batch split over every device (`jax.jit` over a
batch-sharded mesh). Image k of prompt p always starts from the noise of (seed, p, k), so the same seed
gives the same images whatever the batch size or the number of devices. Writes one PNG per image, a
labelled grid and `generation.json` into --out. From a notebook: `generate(load_run(dir), prompts)`.
On a TPU pod every host runs the same command (`--distributed auto`): each host's devices make their
share of every batch, every host gathers the images, process 0 writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .model import adapter, sampling, tokens
from .parallel import distributed, sharding
from .runio import images, outputs, viz
from .errors import JaxconceptError, PromptError
from .model.loading import ModelBundle

_TOKEN_LIKE = re.compile(r"<[^<>\s]+>")


@dataclasses.dataclass(frozen=True)
class Settings:
    num_images: int = 4  # per prompt
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    scheduler: str = "ddim"  # ddim, pndm, dpm++
    batch_size: int = 0  # images per compiled call; 0 = all at once, up to 8 per device


def _source_parts(source):
    """(bundle, concept ids or None, rows or None, known tokens) of a LoadedRun or a plain ModelBundle."""
    if isinstance(source, ModelBundle):
        return source, None, None, ()
    return source.bundle, tuple(int(i) for i in np.asarray(source.concept_ids)), source.rows_NxD, source.tokens


def check_prompts(prompts, known_tokens, where: str) -> None:
    """A prompt naming a concept token (<...>) that the run does not have is an error, not a silent word."""
    if not prompts:
        raise PromptError("no prompt given: pass at least one --prompt.")
    for prompt in prompts:
        unknown = [t for t in _TOKEN_LIKE.findall(prompt) if t not in known_tokens]
        if unknown:
            have = ", ".join(known_tokens) if known_tokens else "none (a base model: no run was loaded)"
            raise PromptError(f"prompt {prompt!r} names {', '.join(unknown)}, which {where} does not have; "
                              f"its concept tokens: {have}.")


def initial_noise(seed: int, num_prompts: int, num_images: int, shape_Zxhxw) -> np.ndarray:
    """P x S x Z x h x w noise; entry (p, k) depends only on (seed, p, k)."""
    base = jax.random.key(seed)
    keys = [jax.random.fold_in(jax.random.fold_in(base, p), k) for p in range(num_prompts) for k in range(num_images)]
    noise = jax.vmap(lambda k: jax.random.normal(k, tuple(shape_Zxhxw)))(jnp.stack(keys))
    return np.asarray(noise).reshape((num_prompts, num_images) + tuple(shape_Zxhxw))


def batch_plan(total: int, batch_size: int, num_devices: int) -> int:
    """Images per compiled call: a multiple of the device count (so the batch splits evenly)."""
    per = batch_size or min(total, 8 * num_devices)
    return -(-max(per, 1) // num_devices) * num_devices


def generate(source, prompts, settings: Settings = Settings(), *, mesh=None, progress: bool = True) -> np.ndarray:
    """Images (uint8, P x S x H x W x 3) for each prompt; `source` is a `runs.LoadedRun` or a `ModelBundle`."""
    prompts = list(prompts)
    bundle, concept_ids, rows, known = _source_parts(source)
    check_prompts(prompts, known, f"run {getattr(source, 'run_dir', '')!r}" if known else "the model")
    try:
        scheduler = adapter.scheduler_name(settings.scheduler)
    except ValueError as e:
        raise JaxconceptError(str(e)) from None
    if settings.steps < 1 or settings.num_images < 1:
        raise JaxconceptError(f"steps ({settings.steps}) and images per prompt ({settings.num_images}) must be >= 1.")
    mesh = mesh or sharding.make_mesh()
    n_dev = mesh.size
    cond_ids = tokens.tokenize(bundle.tokenizer, prompts, bundle.max_length)
    uncond_ids = tokens.tokenize(bundle.tokenizer, [settings.negative_prompt], bundle.max_length)[0]
    latent = bundle.resolution // bundle.vae_factor
    noise = initial_noise(settings.seed, len(prompts), settings.num_images,
                          (bundle.unet.config.in_channels, latent, latent))
    # flatten prompts x images; pad the last call with copies of the final item (their images are dropped)
    items = [(p, k) for p in range(len(prompts)) for k in range(settings.num_images)]
    per_call = batch_plan(len(items), settings.batch_size, n_dev)
    # SDXL without a negative prompt: zero unconditional text, as its pipelines do (force_zeros_for_empty_prompt)
    zero_uncond = bundle.is_sdxl and not settings.negative_prompt
    program = sampling.make_batch_sampler(bundle, scheduler, settings.steps, mesh, concept_ids, zero_uncond)
    rows = jnp.zeros((0, 1), bundle.dtype) if rows is None else rows
    params, rows, guidance = sharding.put_replicated(
        (bundle.params, rows, np.asarray(settings.guidance, np.float32)), mesh)
    batch_sh = sharding.batch_sharded(mesh)
    out = np.zeros((len(items), bundle.resolution, bundle.resolution, 3), np.uint8)
    bar = tqdm(total=len(items), desc="generating", unit="img", dynamic_ncols=True,
               disable=not (progress and distributed.is_primary()))
    for start in range(0, len(items), per_call):
        chunk = items[start:start + per_call]
        chunk = chunk + [chunk[-1]] * (per_call - len(chunk))
        p_idx = np.array([p for p, _ in chunk])
        # every host builds the same batch (it is cheap and deterministic) and places its own devices' share
        batch = sharding.put((np.stack([noise[p, k] for p, k in chunk]), cond_ids[p_idx],
                              np.broadcast_to(uncond_ids, cond_ids[p_idx].shape)), batch_sh)
        pics = program(params, rows, *batch, guidance)
        n = min(per_call, len(items) - start)
        # multi-host: the images are spread over every host's devices; each host gathers all of them
        out[start:start + n] = images.to_uint8(distributed.to_host(pics)[:n])
        bar.update(n)
    bar.close()
    return out.reshape((len(prompts), settings.num_images) + out.shape[1:])


def prompt_folder_names(prompts) -> list[str]:
    """`00_a_red_circle`, ...: ordered, file-system safe, unique."""
    return [f"{i:02d}_{outputs.safe_name(p)[:60]}" for i, p in enumerate(prompts)]


def save_generation(out_dir: str, prompts, pictures_PxSxHxWx3, settings: Settings, info: dict) -> dict:
    """PNGs per prompt, a labelled grid (rows: prompts) and generation.json; returns the record."""
    files = []
    for folder, pics in zip(prompt_folder_names(prompts), pictures_PxSxHxWx3):
        paths = [os.path.join(out_dir, folder, f"sample_{k:02d}.png") for k in range(len(pics))]
        for path, pic in zip(paths, pics):
            images.save_image(pic, path)
        files.append([os.path.relpath(p, out_dir) for p in paths])
    cell = min(256, max(128, pictures_PxSxHxWx3.shape[2]))
    # each row's prompt whole, across the row (a prompt split into per-cell pieces reads as broken words)
    images.save_image(viz.grid([list(p) for p in pictures_PxSxHxWx3], cell=cell, row_labels=list(prompts)),
                      os.path.join(out_dir, "grid.png"))
    record = {"prompts": list(prompts), "settings": dataclasses.asdict(settings), "files": files, **info}
    outputs.write_json(os.path.join(out_dir, "generation.json"), record)
    return record


def default_prompts(run_dir: str) -> list[str]:
    """Without --prompt: each object concept of the run alone, then all together, in the run's template."""
    from .runio import runs

    try:
        summary = runs.read_summary(run_dir)
    except JaxconceptError:
        raise PromptError("no prompt given: pass at least one --prompt.") from None
    objects = [c["token"] for c in runs.object_concepts(runs.listed_concepts(summary))]
    template, joiner = summary.get("template", "a photo of {}"), summary.get("joiner", " and ")
    prompts = [template.format(t) for t in objects]
    return prompts + ([template.format(joiner.join(objects))] if len(objects) > 1 else [])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="a finished run folder (its concept tokens and tuned UNet)")
    p.add_argument("--model", default=None, help="base model without a run: 'toy', 'tiny', a folder or a hub id")
    p.add_argument("--prompt", action="append", default=[],
                   help="repeatable; concept tokens as in the run (default with --run: each concept, then all)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="default: the model's recommendation, else 50")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation, else 7.5")
    p.add_argument("--scheduler", default=None,
                   help=f"one of {', '.join(adapter.INFERENCE_SCHEDULERS)}; default: the model's recommendation, else ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0, help="images per compiled call (0: up to 8 per device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None, help="output folder (default RUN/samples, or runs/generate)")
    p.add_argument("--distributed", default="auto", choices=distributed.MODES,
                   help="join a multi-host job (TPU pod, SLURM): auto = when the environment says so")
    return p.parse_args(argv)


def settings_for(args, model_source: str) -> Settings:
    """The command's settings: what it was given, else the model's recommended sampling, else the defaults."""
    from .model.loading import recommended_sampling

    pick = {**recommended_sampling(model_source),
            **{k: v for k, v in dict(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler).items()
               if v is not None}}
    return Settings(args.num_images, negative_prompt=args.negative_prompt, seed=args.seed,
                    batch_size=args.batch_size, **pick)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or (os.path.join(args.run, "samples") if args.run else os.path.join("runs", "generate"))
    try:
        if args.run and args.model:
            raise JaxconceptError("give --run (a learned run, which knows its base model) or --model, not both.")
        distributed.initialize(args.distributed)  # before anything touches a device
        if not args.prompt and args.run and os.path.isdir(args.run):
            args.prompt = default_prompts(args.run)
            if distributed.is_primary():
                print("prompts: " + "; ".join(args.prompt))
        if not args.prompt:  # before loading anything
            raise PromptError("no prompt given: pass at least one --prompt.")
        if args.scheduler is not None:  # before loading anything
            adapter.scheduler_name(args.scheduler)
        outputs.check_writable(out)
        t0 = time.time()
        if args.run:
            from .runio.runs import load_run

            source = load_run(args.run, dtype=args.dtype)
        else:
            from .model.loading import load_model

            source = load_model(args.model or "toy", args.dtype, seed=args.seed)
        bundle = source if isinstance(source, ModelBundle) else source.bundle
        settings = settings_for(args, bundle.source)
        pictures = generate(source, args.prompt, settings)
        seconds = time.time() - t0
    except ValueError as e:  # an unknown scheduler
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_primary():  # every host generated (and gathered) the images; process 0 writes them
        return 0
    save_generation(out, args.prompt, pictures, settings, {
        "run": os.path.abspath(args.run) if args.run else None, "model": bundle.source,
        "devices": jax.device_count(), "seconds": round(seconds, 1)})
    print(f"{pictures.shape[0] * pictures.shape[1]} images ({pictures.shape[0]} prompts x {pictures.shape[1]}) "
          f"in {seconds:.0f} s on {jax.device_count()} device(s): {os.path.join(out, 'grid.png')} and "
          f"{os.path.join(out, '00_*/')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
