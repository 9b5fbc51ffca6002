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

--out holds one command's images and nothing else, so its generation.json describes every file in it. A
repeated command (the default RUN/samples every time) replaces a previous generate output there as a whole:
its files are written into a hidden sibling folder and renamed into place at the end, so the folder never
mixes two commands' images, and an interrupted or failed command (Ctrl-C, a full disk) leaves it as it was.
What is replaced can be made again exactly: its generation.json records the prompts, seed and settings, and
an image depends only on them. A folder holding anything else (other files, a previous output with files
added) is refused, naming what is there, unless --overwrite (which replaces its whole contents); the run
folder itself, or a folder holding it, never. A link given as --out is followed (the link stays).
At most MAX_IMAGES images per command (all are held in memory until written).
Exit codes: 2 for a mistake in the command or the run folder, 1 when writing fails (a full disk), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
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
MAX_IMAGES = 10_000  # per command (prompts x images per prompt): all are held in memory until written
SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)  # what jax.random.key takes


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


def check_settings(settings: Settings, num_prompts: int = 1) -> None:
    """A JaxconceptError saying what is wrong with `settings` (before any work), else nothing."""
    s = settings
    problems = []
    if isinstance(s.seed, bool) or not isinstance(s.seed, (int, np.integer)) or not (
            SEED_RANGE[0] <= s.seed <= SEED_RANGE[1]):
        problems.append(f"seed {s.seed} is out of range: give an integer from 0 to {SEED_RANGE[1]} (a 64-bit seed)")
    if s.num_images < 1:
        problems.append(f"--num-images {s.num_images}: give at least 1 image per prompt")
    elif s.num_images * max(num_prompts, 1) > MAX_IMAGES:
        problems.append(f"--num-images {s.num_images} x {num_prompts} prompt(s) = {s.num_images * num_prompts} "
                        f"images: at most {MAX_IMAGES} per command (all are held in memory until written). Make "
                        "them in several commands, each with its own --seed and --out")
    if s.steps < 1:
        problems.append(f"--steps {s.steps}: give at least 1 denoising step")
    if not math.isfinite(s.guidance):
        problems.append(f"--guidance {s.guidance} is not a finite number: give a guidance scale (7.5 is usual for "
                        "Stable Diffusion, 1 is none)")
    if s.batch_size < 0:
        problems.append(f"--batch-size {s.batch_size}: give a number of images per compiled call, or 0 for the "
                        "default (up to 8 per device)")
    if problems:
        raise JaxconceptError("; ".join(problems) + ".")


def initial_noise(seed: int, num_prompts: int, num_images: int, shape_Zxhxw) -> np.ndarray:
    """P x S x Z x h x w noise; entry (p, k) depends only on (seed, p, k) (`sampling.initial_noise_for`)."""
    p_idx, k_idx = np.divmod(np.arange(num_prompts * num_images), num_images)
    noise = sampling.initial_noise_for(seed, p_idx, k_idx, shape_Zxhxw)
    return np.asarray(noise).reshape((num_prompts, num_images) + tuple(shape_Zxhxw))


# Ctrl-C raises KeyboardInterrupt as usual and is also remembered: one that Python could not raise (it arrived
# inside a callback, "Exception ignored in: _xla_gc_callback") is raised at the next batch instead of being lost.
_interrupt = {"pending": False}


@contextlib.contextmanager
def interrupts_kept():
    """Within: a Ctrl-C swallowed somewhere is raised again at the next `check_interrupt()` (main thread only)."""
    def on_sigint(signum, frame):
        _interrupt["pending"] = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupt["pending"] = False


def check_interrupt() -> None:
    if _interrupt["pending"]:
        _interrupt["pending"] = False
        raise KeyboardInterrupt


def batch_plan(total: int, batch_size: int, num_devices: int) -> int:
    """Images per compiled call: a multiple of the device count (so the batch splits evenly); never more than
    the images asked for need (a huge --batch-size is not a huge batch of padding)."""
    per = min(batch_size, total) if batch_size else min(total, 8 * num_devices)
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
    check_settings(settings, len(prompts))
    mesh = mesh or sharding.make_mesh()
    n_dev = mesh.size
    cond_ids = tokens.tokenize(bundle.tokenizer, prompts, bundle.max_length)
    uncond_ids = tokens.tokenize(bundle.tokenizer, [settings.negative_prompt], bundle.max_length)[0]
    latent = bundle.resolution // bundle.vae_factor
    shape = (bundle.unet.config.in_channels, latent, latent)
    # flatten prompts x images; pad the last call with copies of the final item (their images are dropped)
    total = len(prompts) * settings.num_images
    per_call = batch_plan(total, settings.batch_size, n_dev)
    # SDXL without a negative prompt: zero unconditional text where its pipeline says so (force_zeros_for_empty_prompt)
    program = sampling.make_batch_sampler(bundle, scheduler, settings.steps, mesh, concept_ids,
                                          sampling.zeros_for_uncond(bundle, settings.negative_prompt))
    rows = jnp.zeros((0, 1), bundle.dtype) if rows is None else rows
    params, rows, guidance = sharding.put_replicated(
        (bundle.params, rows, np.asarray(settings.guidance, np.float32)), mesh)
    batch_sh = sharding.batch_sharded(mesh)
    out = np.zeros((total, bundle.resolution, bundle.resolution, 3), np.uint8)
    bar = tqdm(total=total, desc="generating", unit="img", dynamic_ncols=True,
               disable=not (progress and distributed.is_primary()))
    with bar:  # closed before an error or Ctrl-C is reported
        for start in range(0, total, per_call):
            check_interrupt()
            flat = np.minimum(np.arange(start, start + per_call), total - 1)
            p_idx, k_idx = np.divmod(flat, settings.num_images)
            # every host builds the same batch (it is cheap and deterministic) and places its own devices' share;
            # each image's noise depends only on (seed, prompt, image), made for this batch alone
            noise = np.asarray(sampling.initial_noise_for(settings.seed, p_idx, k_idx, shape))
            batch = sharding.put((noise, cond_ids[p_idx], np.broadcast_to(uncond_ids, cond_ids[p_idx].shape)), batch_sh)
            pics = program(params, rows, *batch, guidance)
            n = min(per_call, total - start)
            # multi-host: the images are spread over every host's devices; each host gathers all of them
            out[start:start + n] = images.to_uint8(distributed.to_host(pics)[:n])
            bar.update(n)
    check_interrupt()
    return out.reshape((len(prompts), settings.num_images) + out.shape[1:])


def prompt_folder_names(prompts) -> list[str]:
    """`00_a_red_circle`, ...: ordered, file-system safe, unique."""
    return [f"{i:02d}_{outputs.safe_name(p)[:60]}" for i, p in enumerate(prompts)]


GENERATION_FILE = "generation.json"


def foreign_entries(folder: str) -> list[str]:
    """What in `folder` a generate command did not write (relative paths): all of it without a readable
    generation.json; empty for an empty folder or exactly one previous generate output."""
    if not os.path.isdir(folder):
        return []
    top = sorted(os.listdir(folder))
    try:
        with open(os.path.join(folder, GENERATION_FILE), encoding="utf-8") as f:
            listed = {os.path.normpath(p) for group in json.load(f)["files"] for p in group}
    except (OSError, ValueError, KeyError, TypeError):
        return top
    ours = listed | {GENERATION_FILE, "grid.png"}
    folders = {os.path.dirname(p) for p in listed} - {""}
    found = []
    for root, dirs, files in os.walk(folder):
        rel = lambda name: os.path.normpath(os.path.relpath(os.path.join(root, name), folder))  # noqa: E731
        keep = [d for d in dirs if rel(d) in folders and not os.path.islink(os.path.join(root, d))]
        found += [rel(d) for d in dirs if d not in keep]  # another folder: named, not walked
        dirs[:] = keep
        found += [rel(f) for f in files if rel(f) not in ours]
    return sorted(found)


def check_out(out_dir: str, *, overwrite: bool = False, run_dir: str | None = None) -> None:
    """Refuse (JaxconceptError) an --out the command must not replace, before any work; makes nothing.

    Allowed: a new or empty folder, or one previous generate output (replaced as a whole); anything else only
    with `overwrite`; never the run folder or a folder holding it, nor a file."""
    if "://" in out_dir:
        outputs.check_writable(out_dir)  # the URL message
    real = os.path.realpath(out_dir)
    if run_dir is not None:
        run = os.path.realpath(run_dir)
        if os.path.commonpath([run, real]) == real:
            what = "is the run folder itself" if run == real else f"holds the run folder {run_dir!r}"
            raise JaxconceptError(f"--out {out_dir!r} {what}: replacing it would delete the run. Choose another "
                                  "folder (the default is RUN/samples).")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise JaxconceptError(f"--out {out_dir!r} is a file, not a folder. Choose another path.")
    foreign = [] if overwrite else foreign_entries(real)
    if foreign:
        shown = ", ".join(repr(e) for e in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise JaxconceptError(
            f"--out {out_dir!r} holds files that are not one generate command's output ({len(foreign)}: {shown}); "
            "nothing was generated. Choose a new folder, or pass --overwrite to replace its whole contents with "
            "this command's images.")
    ancestor = os.path.dirname(real)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise JaxconceptError(f"cannot write to the output folder {out_dir!r} ({ancestor!r} is not writable); "
                              "choose another with --out.")


def _save_png(pic, path: str) -> None:
    from PIL import Image

    tmp = path + ".tmp"
    Image.fromarray(np.asarray(pic)).save(tmp, format="PNG")
    os.replace(tmp, path)  # never a half-written picture under the real name


def save_generation(out_dir: str, prompts, pictures_PxSxHxWx3, settings: Settings, info: dict, *,
                    overwrite: bool = False, run_dir: str | None = None) -> dict:
    """PNGs per prompt, a labelled grid (rows: prompts) and generation.json; returns the record.

    Written into a hidden sibling of `out_dir` and renamed into place (see the module docstring): `out_dir` ends
    up holding this call's files only, and a failure or Ctrl-C while writing leaves it as it was. `out_dir` is
    checked as `check_out` does (a previous generate output is replaced; anything else needs `overwrite`)."""
    from .export import staging_dir, swap_in

    check_out(out_dir, overwrite=overwrite, run_dir=run_dir)
    target = os.path.realpath(out_dir)  # a link stays a link: its folder gets the images
    staged = staging_dir(target, "generate")
    try:
        files = []
        for folder, pics in zip(prompt_folder_names(prompts), pictures_PxSxHxWx3):
            os.makedirs(os.path.join(staged, folder))
            names = [os.path.join(folder, f"sample_{k:02d}.png") for k in range(len(pics))]
            for name, pic in zip(names, pics):
                check_interrupt()
                _save_png(pic, os.path.join(staged, name))
            files.append(names)
        cell = min(256, max(128, pictures_PxSxHxWx3.shape[2]))
        # each row's prompt whole, across the row (a prompt split into per-cell pieces reads as broken words)
        _save_png(viz.grid([list(p) for p in pictures_PxSxHxWx3], cell=cell, row_labels=list(prompts)),
                  os.path.join(staged, "grid.png"))
        record = {"prompts": list(prompts), "settings": dataclasses.asdict(settings), "files": files, **info}
        outputs.write_json(os.path.join(staged, GENERATION_FILE), record)  # last: it describes what is there
        check_interrupt()
        swap_in(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return record


def default_prompts(run_dir: str) -> list[str]:
    """Without --prompt: each object concept of the run alone, then all together, in the run's template."""
    from .runio import runs

    path = os.path.join(run_dir, "summary.json")
    if not os.path.isdir(run_dir):
        raise JaxconceptError(f"run folder {run_dir!r} does not exist: pass the --out folder of a "
                              "'python -m jaxconcept.train' run.")
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise JaxconceptError(f"{run_dir!r} is not a run folder (it has no config.json): pass the --out folder of "
                              "a 'python -m jaxconcept.train' run.")
    if not os.path.isfile(path):
        raise JaxconceptError(f"run {run_dir!r} is not finished: it has no summary.json yet (training writes it, "
                              "with concepts.safetensors, at the end). Start its train command again with the same "
                              "--out to resume and finish it, then generate.")
    try:
        summary = runs.read_summary(run_dir)
        objects = [c["token"] for c in runs.object_concepts(runs.listed_concepts(summary))]
        template, joiner = summary.get("template", "a photo of {}"), summary.get("joiner", " and ")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise JaxconceptError(f"cannot read the run's {path!r} ({e}), which names its concepts: pass the prompts "
                              "with --prompt, or start the run's train command again to rewrite it.") from None
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
    p.add_argument("--out", default=None, help="output folder (default RUN/samples, or runs/generate); a previous "
                   "generate output there is replaced as a whole")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder that holds other files (its whole contents)")
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


def _check_args(args) -> None:
    """The command line's numbers, before anything is loaded (the same checks as `check_settings`)."""
    given = {k: v for k, v in dict(steps=args.steps, guidance=args.guidance).items() if v is not None}
    check_settings(Settings(args.num_images, seed=args.seed, batch_size=args.batch_size, **given),
                   max(len(args.prompt), 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or (os.path.join(args.run, "samples") if args.run else os.path.join("runs", "generate"))
    try:
        with interrupts_kept():
            return _main(args, out)
    except KeyboardInterrupt:
        print(f"\ninterrupted: no image was written, {out!r} is as it was.", file=sys.stderr)
        return 130


def _main(args, out: str) -> int:
    try:
        if args.run and args.model:
            raise JaxconceptError("give --run (a learned run, which knows its base model) or --model, not both.")
        _check_args(args)
        distributed.initialize(args.distributed)  # before anything touches a device
        if not args.prompt and args.run:
            args.prompt = default_prompts(args.run)
            if distributed.is_primary():
                print("prompts: " + "; ".join(args.prompt))
        if not args.prompt:  # before loading anything
            raise PromptError("no prompt given: pass at least one --prompt.")
        _check_args(args)  # the number of images, now that the prompts are known
        if args.scheduler is not None:  # before loading anything
            adapter.scheduler_name(args.scheduler)
        if distributed.is_primary():
            check_out(out, overwrite=args.overwrite, run_dir=args.run)
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
    replaced = os.path.isfile(os.path.join(out, GENERATION_FILE))
    try:
        save_generation(out, args.prompt, pictures, settings, {
            "run": os.path.abspath(args.run) if args.run else None, "model": bundle.source,
            "devices": jax.device_count(), "seconds": round(seconds, 1)}, overwrite=args.overwrite, run_dir=args.run)
    except JaxconceptError as e:  # --out changed while the images were made
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's failure (a full disk, an I/O error), not the command's: exit 1
        print(f"error: cannot write the images into {out!r}: {e.strerror or e}. Nothing was written: {out!r} is as "
              "it was. Free some space (or choose another --out) and run the same command again.", file=sys.stderr)
        return 1
    count = pictures.shape[0] * pictures.shape[1]
    print(f"{count} image{'s' if count != 1 else ''} ({pictures.shape[0]} prompt{'s' if pictures.shape[0] != 1 else ''}"
          f" x {pictures.shape[1]}) "
          f"in {seconds:.0f} s on {jax.device_count()} device(s): {os.path.join(out, 'grid.png')} and "
          f"{os.path.join(out, '00_*/')}" + (" (the previous images there were replaced)" if replaced else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
