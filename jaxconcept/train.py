"""Learn one token per concept from images, with masks estimated on the way (the EM learner).

    python -m jaxconcept.train                       # toy model + the bundled toy scene, every stage
    python -m jaxconcept.train --out runs/mine --concepts "dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background"
    python -m jaxconcept.train --config configs/em_toy.py --config.mode=attention --config.tokens.steps=200
    python -m jaxconcept.train --config sd15 --out runs/dog --concepts "dog.jpg:<dog>=dog,<room>=room/background"

--config takes a config file or a preset name (sd15, sd21_base, sd21: jaxconcept/presets/).

--concepts (repeatable, one per image): IMAGE:TOKEN[=INIT][/KIND][@MASK],... (see jaxconcept/runio/inputs.py).
Starting again with the same --out resumes from the last checkpoint (Ctrl-C stops at the next step). A
finished run whose checkpoints/ were deleted is not trained again unless --retrain is given.

Many independent concept sets in one program (`jaxconcept.jobs`), each into OUT/job_NN:

    python -m jaxconcept.train --out runs/many --job "cat.jpg:<cat>=cat,<sofa>=sofa/background" \
        --job "dog.jpg:<dog>=dog,<lawn>=lawn/background"

--job (repeatable, one per job): the job's --concepts arguments joined with ';' (one per image). Jobs
batched together need the same number of images and of concepts per image.
"""

from __future__ import annotations

import logging as pylogging
import os
import shlex
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from . import presets, settings
from .parallel import distributed
from .runio import inputs
from . import errors
from .errors import JaxconceptError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
TOY_SCENE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "examples", "heldout_scene")

try:  # ml_collections defines a flag per --config.FIELD of the command line here, and fails on an unknown one
    _CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "learner config (ml_collections file)")
    _DEFINE_ERROR = None
except (AttributeError, KeyError, TypeError, ValueError) as e:  # reported by run(), without a traceback
    _CONFIG, _DEFINE_ERROR = None, e
_OUT = flags.DEFINE_string("out", "runs/train", "run folder (resumes if it has checkpoints)")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", list(distributed.MODES),
                                  "join a multi-host job (TPU pod, SLURM): auto = when the environment says so")
_CONCEPTS = flags.DEFINE_multi_string("concepts", [], "IMAGE:TOKEN[=INIT][/KIND][@MASK],... (one per image)")
_CHECK = flags.DEFINE_integer("check_samples", 16, "toy-world runs: after training, samples per prompt of each "
                              "concept alone and all together, judged beside the base model given the words (0: skip)")
_JOBS = flags.DEFINE_multi_string("job", [], "one concept set of a batch of jobs: its --concepts arguments "
                                  "joined with ';' (repeatable; each job goes to OUT/job_NN)")
_RETRAIN = flags.DEFINE_boolean("retrain", False, "train again from scratch a finished run (in --out) whose "
                                "checkpoints/ were deleted; without it such a run is left as it is")


def resolve_specs(cfg, concept_args) -> tuple:
    """Images and concepts from --concepts, else from the config, else the bundled toy scene."""
    if concept_args:
        return tuple(inputs.parse_concepts_arg(a) for a in concept_args)
    if cfg.images:
        return inputs.specs_from_config(cfg.images)
    return (inputs.from_toy_scene_folder(TOY_SCENE),)


def resolve_jobs(job_args) -> list[tuple]:
    """One tuple of ImageSpecs per --job (checked: a problem is named with its --job)."""
    out = []
    for j, text in enumerate(job_args):
        parts = [p for p in text.split(";") if p.strip()]
        if not parts:
            raise inputs.InputError(f"--job number {j + 1} is empty: give IMAGE:TOKEN,... (images joined with ';').")
        try:
            out.append(inputs.validate([inputs.parse_concepts_arg(p.strip()) for p in parts]))
        except inputs.InputError as e:
            raise inputs.InputError(f"--job number {j + 1} ({text!r}): {e}") from None
    return out


def summary_text(summary: dict) -> str:
    lines = [f"done in {summary['seconds']:.0f} s: {len(summary['tokens'])} concepts in "
             f"{len(summary['images'])} image(s), mode {summary['mode']}, {summary['rounds']} rounds"]
    for token, area in summary["mask_area"].items():
        iou = summary.get("iou_final", {}).get(token)
        lines.append(f"  {token:<20} mask {area:6.1%} of the image" + ("" if iou is None else f"   IoU {iou:.3f}"))
    if summary.get("iou_by_round"):
        lines.append("  mean IoU by round: " + " ".join(f"{v:.3f}" for v in summary["iou_by_round"] if v is not None))
    if summary.get("iou_matching"):
        lines.append(f"  (IoU: {summary['iou_matching']})")
    changes = [v for v in summary.get("mask_change_by_round") or [] if v is not None]
    if changes and summary["mode"] == "em":
        lines.append("  mask change by round (1 - IoU with the round before): " + " ".join(f"{v:.3f}" for v in changes)
                     + f"; final masks: round {summary.get('final_round')}")
    if summary.get("warning"):
        lines.append(f"  warning: {summary['warning']}")
    run, q = summary["run"], shlex.quote(summary["run"])  # commands to paste: a path with spaces quoted
    lines += [f"results in {run}:",
              "  concepts.safetensors, masks/final/, overlays/, masks_evolution.png, metrics.jsonl",
              "next:",
              f"  python -m jaxconcept.generate --run {q}        # samples of every concept, then all together",
              f"  python -m jaxconcept.evaluate --run {q}",
              f"  python -m jaxconcept.export --run {q} --out {shlex.quote(run + '_pytorch')}   # for PyTorch diffusers"]
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --concepts, --config and --out")
    logging.set_verbosity(logging.WARNING)  # Orbax logs its whole configuration at INFO
    pylogging.getLogger("jaxconcept").setLevel(pylogging.WARNING)
    cfg = _CONFIG.value
    try:
        settings.resolve(cfg)  # every config value checked before anything else
        if _CHECK.value < 0:
            raise JaxconceptError(f"--check_samples must be >= 0 (0 skips the samples check), got {_CHECK.value}.")
        from .em import jobs, learner  # the model code (diffusers: seconds) once the command line is good

        multi = distributed.initialize(_DISTRIBUTED.value)  # before anything touches a device
        errors.raise_if_interrupted()  # a Ctrl-C during the imports that a gc callback dropped
        if _JOBS.value and _CONCEPTS.value:
            raise JaxconceptError("give --concepts (one run) or --job (several concept sets), not both.")
        if _JOBS.value:
            summaries = jobs.learn_many(cfg, resolve_jobs(_JOBS.value), _OUT.value, progress=distributed.is_primary(),
                                        retrain=_RETRAIN.value)
        else:
            summaries = [learner.learn(cfg, resolve_specs(cfg, _CONCEPTS.value), _OUT.value,
                                       progress=distributed.is_primary(), retrain=_RETRAIN.value)]
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: start the same command again to resume from the last checkpoint in {_OUT.value}",
              file=sys.stderr)
        sys.exit(130)
    if distributed.is_primary():
        print("\n".join(summary_text(s) for s in summaries)
              + (f"\n({jax.process_count()} processes, {jax.device_count()} devices)" if multi else ""))
        check_samples(summaries, _CHECK.value)


def check_samples(summaries, num_images: int) -> None:
    """The closing check of toy-world runs (`evaluate.check_toy_run`): do the concepts come back?"""
    if num_images <= 0 or jax.process_count() > 1:
        return
    from . import evaluate

    try:
        for s in summaries:
            got = evaluate.check_toy_run(s["run"], num_images, progress=True, on_start=lambda: print(
                f"checking what the tokens draw: {num_images} samples per prompt, beside the base model given the "
                "words (--check_samples 0 skips this)", flush=True))
            if got:
                print("\n".join(got))
    except KeyboardInterrupt:
        print("\ninterrupted during the samples check: the run is finished and saved", file=sys.stderr)
        sys.exit(130)


def parse_flags(argv):
    """absl's flag parsing, with config overrides it cannot take (an unknown field, a value of the wrong
    type) printed as one line naming the field (exit 2) instead of a traceback, and a config file that
    cannot be run (a syntax error, an error in its get_config) named with the place of the error."""
    try:
        return flags.FLAGS(argv)
    except SyntaxError as e:
        where = f"{e.filename}, line {e.lineno}" if e.filename else "the config file"
        code = f": {e.text.strip()}" if e.text and e.text.strip() else ""
        print(f"error: the config file has a syntax error ({where}{code}): {e.msg}. Fix it, or give a preset "
              f"(--config {' / '.join(presets.NAMES)}).", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        print(f"error: {settings.command_line_error(argv, e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001  (the config file's own code failed: NameError, ImportError, ...)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(("<", sys.prefix))
                  and "site-packages" not in f.filename]
        where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
        print(f"error: the config file could not be run{where}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    errors.catch_ctrl_c()  # a Ctrl-C is never lost (errors.py); while training it stops at the next step
    if _DEFINE_ERROR is not None:
        print(f"error: {settings.command_line_error(sys.argv, _DEFINE_ERROR)}", file=sys.stderr)
        sys.exit(2)
    try:
        argv = presets.resolve_config_arg(sys.argv)  # `--config sd15`: a preset shipped in the package
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
