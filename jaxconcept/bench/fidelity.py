"""Fidelity benchmark on toy scenes (the paper's Fig. 3 and its CRF ablation, in the toy world).

Two scene sets, each scene two objects and a background from seeds that training never used:
  * natural: the toy world's own distribution (`toy.scene.make_scene`);
  * hard: objects of close colours (orange/red, purple/blue, red/purple) on textured backgrounds, pink
    among them (`hard_scene`).
Each scene's concepts are learned from four starts (`INITS`): the colour word, the shape word, random rows,
and a short unmasked inversion from random rows; in modes `attention` (stage-1 masks kept) and `em`
(re-estimated); `user` (trained on the true masks, the upper bound) once per scene, with colour init.
Reported, as mean ± standard error over scenes:
  * object-mask IoU against the ground truth after every round, with the CRF and without it (the same E-steps'
    unrefined masks); concepts with the same init word are matched to the truth by the best assignment;
  * `em` − `attention` final object IoU, paired per scene;
  * sample fidelity: each learned object token in new prompts ("a <tok> on a teal water background"): does
    the toy analysis find an object of the right colour and shape (and pattern)? With `--bare`, also in bare
    prompts ("a <tok>", as `generate --run` writes them), a second table.
Writes fidelity.json, table.md, iou_by_round.png (one panel per set and init) and prints the table.

    python -m jaxconcept.bench.fidelity --out runs/fidelity              # sized for one session on 2 cores
    python -m jaxconcept.bench.fidelity --seeds 100-119 --token-steps 400 --estep-every 50 --timesteps 50 \
        --joint-steps 400 --samples 4 --out runs/fidelity_full          # the learner's defaults (~10x longer)

The default command is shortened to fit one working session (360 learner runs; measured 2026-12-05 on the 2-core
CPU: ~5 s a run without sampling, ~6 s with 2 samples per prompt, runs of one model sharing their compiled
programs, so about 40 minutes): 200 token steps with
an E-step every 25 (the learner: 400 / 50), 16 timesteps per E-step (50), no joint stage (400; samples then
use the learned tokens with the base UNet), 2 samples per prompt (4), 30 inversion steps (100).
Seeds 100-119 of each set are the evaluation seeds; the E-step's and the tokens' settings were chosen on
seeds 0-19.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from .. import config, generate
from ..em import learner
from ..runio import images, inputs, runs, viz
from ..errors import JaxconceptError
from ..model.loading import load_model
from ..toy import judge, scene
from ..toy.evaluate import parse_seeds

# Benchmark scene s is toy scene SEED_OFFSET + s: toy pre-training draws seeds 0..num_scenes-1 (seed 0),
# the toy gates 10,000,000 onwards.
SEED_OFFSET = 20_000_000
HARD_OFFSET = 30_000_000  # the hard set's seeds: no other part of the project draws scenes from here
MODES = ("attention", "em", "user")
INITS = ("color", "shape", "random", "inversion", "color+shape")  # the last: the toy default start
SETS = ("natural", "hard")
# close colours: two objects whose colours the toy model's attention tells apart poorly, on textured
# backgrounds (pink beside purple and red)
HARD_PAIRS = (("orange", "red"), ("purple", "blue"), ("red", "purple"))
HARD_BACKGROUNDS = ("pink", "gray", "beige")
HARD_TEXTURES = tuple(t for t in scene.TEXTURES if t != scene.DEFAULT_TEXTURE)


def natural_scene(seed: int, size: int) -> scene.Scene:
    """Held-out scene s of the natural distribution: two objects, anything the toy world draws."""
    return scene.make_scene(SEED_OFFSET + seed, size=size, num_objects=2)


def hard_scene(seed: int, size: int) -> scene.Scene:
    """Hard scene s: two objects of close colours (`HARD_PAIRS`, random order, any shapes and patterns) on a
    textured background (`HARD_BACKGROUNDS` x `HARD_TEXTURES`); deterministic in (seed, size)."""
    rng = np.random.default_rng(HARD_OFFSET + seed)
    background = scene.Background(scene._pick(rng, HARD_BACKGROUNDS), scene._pick(rng, HARD_TEXTURES))
    colors = list(HARD_PAIRS[int(rng.integers(len(HARD_PAIRS)))])
    if rng.random() < 0.5:
        colors.reverse()
    attributes = [(c, scene._pick(rng, scene.SHAPES), scene._pick(rng, scene.PATTERNS)) for c in colors]
    names = scene._unique_names([scene.object_words(*a) for a in attributes])
    objects = [scene.SceneObject(c, sh, p, name, box)
               for (c, sh, p), name, box in zip(attributes, names, scene.draw_layout(rng, 2))]
    image, masks = scene.render(objects, background, int(size), rng)
    return scene.Scene(image=image, masks=masks, objects=objects, background=background,
                       caption=scene.make_caption(objects, background), seed=int(seed), size=int(size))


def make_bench_scene(which: str, seed: int, size: int) -> scene.Scene:
    if which not in SETS:
        raise JaxconceptError(f"unknown scene set {which!r}: use one of {', '.join(SETS)}")
    return natural_scene(seed, size) if which == "natural" else hard_scene(seed, size)


def new_background(s: scene.Scene) -> str:
    """A background the scene does not have ("teal water background"), drawn from the scene's seed: where
    the samples put the learned objects."""
    colors = [c for c in scene.BACKGROUND_COLORS if c != s.background.color]
    textures = [t for t in scene.TEXTURES if t != s.background.texture]
    rng = np.random.default_rng(s.seed)
    return f"{colors[rng.integers(len(colors))]} {textures[rng.integers(len(textures))]} background"


def sample_fidelity(run, base, s: scene.Scene, token_of: dict[str, str], settings: "Settings", words_cache: dict,
                    background: str | None = None):
    """What users see (`toy.judge`): each object token alone and both together on a new background (or on
    `background`: `judge.BARE` for no background phrase), judged beside the words oracle (the base model given
    the objects' words, same prompts and noise; cached per scene). Returns (record, token pictures
    P x K x H x W x 3)."""
    concepts = [judge.ToyConcept(token_of[o.name], o.color, o.shape, o.pattern) for o in s.objects]
    gen = generate.Settings(num_images=settings.num_samples, steps=settings.sample_steps, guidance=settings.guidance,
                            seed=s.seed)
    asked = judge.Asked(concepts, background=new_background(s) if background is None else background)
    m = judge.measure(run, base, asked, s.background.color, gen, words=words_cache)
    return {k: m[k] for k in ("prompts", "tokens", "words", "report")}, m["pictures"]["tokens"]


def scene_spec(folder: str, init: str) -> inputs.ImageSpec:
    """The concepts of a written toy scene with the object tokens started from `init` (the background
    always from "background"): "color"/"shape"/"color+shape" words, or no word ("random", "inversion")."""
    if init not in INITS:
        raise JaxconceptError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    spec = inputs.from_toy_scene_folder(folder, init=init if init in inputs.TOY_INITS else "color")
    if init in ("random", "inversion"):
        spec = dataclasses.replace(spec, concepts=tuple(
            dataclasses.replace(c, init_word=None) if c.kind == "object" else c for c in spec.concepts))
    return spec


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of the benchmark shares (module docstring: the default command's shortenings)."""

    model: str = "toy"
    token_steps: int = 200
    estep_every: int = 25
    joint_steps: int = 0
    num_timesteps: int = 16
    inversion_steps: int = 30
    num_samples: int = 2
    sample_steps: int = 25
    guidance: float = 5.0
    crf: bool = True
    bare: bool = False  # also sample bare prompts ("a <tok>", as `generate --run` does): rows' "samples_bare"


def run_config(settings: Settings, mode: str, init: str, seed: int):
    cfg = config.get_config()
    cfg.model, cfg.mode, cfg.seed = settings.model, mode, seed
    cfg.tokens.steps, cfg.tokens.estep_every, cfg.joint.steps = (settings.token_steps, settings.estep_every,
                                                                 settings.joint_steps)
    cfg.masks.num_timesteps = settings.num_timesteps
    cfg.masks.crf = settings.crf
    if init == "inversion":
        cfg.init.method, cfg.init.inversion_steps = "inversion", settings.inversion_steps
    return cfg


def object_curves(run_dir: str, object_tokens) -> tuple[list[float], list[float]]:
    """Mean object IoU by round, with and without CRF, from a run's metrics.jsonl (matched IoUs)."""
    rounds = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"round"' in x]
    rounds = {r["round"]: r for r in rounds}  # a resumed run may repeat a round: keep the last
    rounds = [rounds[k] for k in sorted(rounds)]
    return ([float(np.mean([r["iou"][t] for t in object_tokens])) for r in rounds],
            [float(np.mean([r["iou_no_crf"][t] for t in object_tokens])) for r in rounds])


@dataclasses.dataclass(frozen=True)
class BenchScene:
    """A scene of the benchmark: the scene, the folder it is written to (`scene.write_scene`) and its set."""

    scene: scene.Scene
    folder: str
    set_name: str


def bench_run(base, words_cache: dict | None, bs: BenchScene, init: str, mode: str, settings: Settings,
              run_dir: str, progress: bool = False) -> dict:
    """One learner run on one scene: its IoU curves, final object IoU (the run's chosen masks) and, with
    `settings.num_samples`, what its samples show (`sample_fidelity`; `words_cache` shared by a scene's runs)."""
    s, set_name = bs.scene, bs.set_name
    spec = scene_spec(bs.folder, init)
    token_of = {os.path.basename(c.mask)[5:-4]: c.token for c in spec.concepts}
    truth = np.stack([s.masks[name] for name in token_of])
    summary = learner.learn(run_config(settings, mode, init, s.seed), [spec], run_dir, bundle=base,
                            ground_truth=truth, progress=progress)
    objects = [token_of[o.name] for o in s.objects]
    curve, curve_raw = object_curves(run_dir, objects)
    # tied tokens (no init word, or the same one) take their objects in an arbitrary order: each token's samples are
    # judged against the object whose true mask its final mask was matched to, as its IoU is
    learned = {whose: token for token, whose in summary.get("matched_to", {}).items()}
    judged_as = {name: learned.get(token, token) for name, token in token_of.items()}
    row = {"set": set_name, "seed": s.seed, "init": init, "mode": mode, "caption": s.caption,
           "iou_by_round": curve, "iou_no_crf_by_round": curve_raw,
           "iou_final": float(np.mean([summary["iou_final"][t] for t in objects])),
           "final_round": summary.get("final_round"), "mask_change_by_round": summary.get("mask_change_by_round"),
           "seconds": summary["seconds"], "samples": None,
           "matched_to": {t: m for t, m in summary.get("matched_to", {}).items() if t != m}}
    if settings.num_samples and words_cache is not None:
        run = runs.load_run(run_dir, bundle=base)
        row["samples"], pics = sample_fidelity(run, base, s, judged_as, settings, words_cache)
        images.save_image(viz.grid([list(p) for p in pics], cell=64, row_labels=[p["tokens"] for p in
                                                                                 row["samples"]["prompts"]]),
                          os.path.join(run_dir, "samples.png"))
        if settings.bare:
            row["samples_bare"], _ = sample_fidelity(run, base, s, judged_as, settings, words_cache, judge.BARE)
    return row


def attention_from_em(em_row: dict) -> dict:
    """Mode attention's row read off em's: attention keeps the masks of the first E-step, which em computes
    identically (same seed, same rows; tests/test_em_toy.py checks it), so without samples an attention run
    would only repeat em's round 0."""
    n = len(em_row["iou_by_round"])
    return dict(em_row, mode="attention", iou_by_round=[em_row["iou_by_round"][0]] * n,
                iou_no_crf_by_round=[em_row["iou_no_crf_by_round"][0]] * n, iou_final=em_row["iou_by_round"][0],
                final_round=None, mask_change_by_round=[0.0] * (n - 1), seconds=0.0, samples=None,
                read_off="em round 0")


def run_benchmark(seeds, out: str, modes=MODES, settings: Settings = Settings(), sets=SETS, inits=INITS,
                  progress: bool = False) -> dict:
    """Every (set, scene, init, mode) run; `user` only with the first init (its masks do not depend on it).
    Without samples, `attention` is read off `em`'s round 0 (`attention_from_em`) instead of run again."""
    base = load_model(settings.model)
    derive = not settings.num_samples and "em" in modes and "attention" in modes
    order = sorted(modes, key=lambda m: m == "attention") if derive else modes  # em before attention
    results = []
    for set_name in sets:
        for seed in seeds:
            s = make_bench_scene(set_name, seed, base.resolution)
            folder = os.path.join(out, "scenes", set_name, str(seed))
            scene.write_scene(s, folder)
            words_cache: dict = {}  # the words oracle's samples of this scene, shared by its runs
            for init in inits:
                rows = {}
                for mode in order:
                    if mode == "user" and init != inits[0]:
                        continue
                    run_dir = os.path.join(out, "runs", set_name, str(seed), init, mode)
                    if derive and mode == "attention":
                        row = attention_from_em(rows["em"])
                    else:
                        row = bench_run(base, words_cache, BenchScene(s, folder, set_name), init, mode, settings,
                                        run_dir, progress)
                    rows[mode] = row
                    results.append(row)
                    took = "read off em's round 0" if row.get("read_off") else f"{row['seconds']:.0f} s"
                    print(f"{set_name:<7} scene {seed} {init:<11} {mode:<9} object IoU {row['iou_by_round'][0]:.3f}"
                          f" -> {row['iou_final']:.3f}{samples_text(row['samples'])}  ({took})", flush=True)
    return aggregate(results)


def samples_text(samples: dict | None) -> str:
    """One run's samples for the progress line: found alone, together, leakage; tokens / words."""
    if not samples:
        return ""
    t, w = samples["tokens"], samples["words"]
    return (f"  found {t['found_mean']:.2f}/{w['found_mean']:.2f} together {t['together']:.2f}/{w['together']:.2f}"
            f" leakage {t['leakage']:.2f}/{w['leakage']:.2f}")


def samples_figures(rows: list[dict], key: str = "samples") -> dict | None:
    """Mean ± SE over scenes of what the samples show (tokens and words), and the share of scenes where every
    concept came back at >= 0.5 x its words' rate ("kept"); `key`: the rows' samples ("samples_bare": bare
    prompts)."""
    got = [r[key] for r in rows if r.get(key)]
    if not got:
        return None
    out = {f"{key}_{src}": mean_se([g[src][key] for g in got])
           for src in ("tokens", "words") for key in ("found_mean", "together", "leakage")}
    out["kept"] = float(np.mean([g["report"]["weakest_ratio"] >= 0.5 for g in got]))
    out["scenes"] = len(got)
    return out


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def kept_round(row: dict) -> int:
    """The round whose masks a run kept: em's final-round rule, else the last."""
    return -1 if row.get("final_round") is None else row["final_round"]


def aggregate(results) -> dict:
    """Per (set, init, mode): curves and final IoU as mean ± SE over scenes, samples; per (set, init): the
    paired em − attention difference of final object IoU."""
    table = {}
    for key in dict.fromkeys((r["set"], r["init"], r["mode"]) for r in results):
        mine = [r for r in results if (r["set"], r["init"], r["mode"]) == key]
        curves, raws = np.array([r["iou_by_round"] for r in mine]), np.array([r["iou_no_crf_by_round"] for r in mine])
        table["/".join(key)] = {
            "set": key[0], "init": key[1], "mode": key[2], "scenes": len(mine),
            "iou_by_round": [mean_se(c) for c in curves.T], "iou_no_crf_by_round": [mean_se(c) for c in raws.T],
            "iou_first": mean_se(curves[:, 0]), "iou_final": mean_se([r["iou_final"] for r in mine]),
            # the unrefined masks of the round whose masks were kept (em: the final-round rule; else the last)
            "iou_final_no_crf": mean_se([r["iou_no_crf_by_round"][kept_round(r)] for r in mine]),
            "samples": samples_figures(mine),
            "samples_bare": samples_figures(mine, "samples_bare"),
        }
    gains = {}
    for set_name, init in dict.fromkeys((r["set"], r["init"]) for r in results):
        by = {(r["seed"], r["mode"]): r["iou_final"] for r in results if (r["set"], r["init"]) == (set_name, init)}
        diffs = [by[(sd, "em")] - by[(sd, "attention")] for sd, m in by if m == "em" and (sd, "attention") in by]
        if diffs:
            gains[f"{set_name}/{init}"] = {"scenes": len(diffs), "em_minus_attention": mean_se(diffs)}
    return {"table": table, "gains": gains, "runs": results}


def table_lines(result: dict) -> list[str]:
    """Markdown tables: object IoU (round 0, final, final without CRF) as mean ± SE; then, where sampled,
    what the samples show beside the words oracle."""
    pm = lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    lines = ["| set | init | mode | scenes | IoU round 0 | IoU final | final, no CRF | em − attention |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["table"].values():
        gain = result["gains"].get(f"{row['set']}/{row['init']}") if row["mode"] == "em" else None
        lines.append(f"| {row['set']} | {row['init']} | {row['mode']} | {row['scenes']} | {pm(row['iou_first'])} | "
                     f"{pm(row['iou_final'])} | {pm(row['iou_final_no_crf'])} | "
                     f"{pm(gain['em_minus_attention']) if gain else ''} |")
    lines.append("Object-mask IoU against ground truth, mean ± standard error over scenes; concepts with the same "
                 "init word matched to the truth by the best assignment; 'no CRF': the same E-steps' unrefined "
                 "masks; em − attention paired per scene.")
    for key, where in (("samples", "on a background the scene does not have"),
                       ("samples_bare", "in bare prompts ('a <tok>', no background phrase: what `generate --run` "
                                        "draws; no background leak is counted)")):
        lines += samples_table(result, key, where)
    return lines


def samples_table(result: dict, key: str, where: str) -> list[str]:
    """The markdown table of one prompt form's samples (`key`: "samples" or "samples_bare"); [] if unsampled."""
    sampled = [row for row in result["table"].values() if row.get(key)]
    if not sampled:
        return []
    pm2 = lambda ms: f"{ms[0]:.2f} ± {ms[1]:.2f}"  # noqa: E731
    lines = ["", "| set | init | mode | scenes | found alone | words | every concept kept | all together | "
             "words | leakage | words |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sampled:
        f = row[key]
        lines.append(f"| {row['set']} | {row['init']} | {row['mode']} | {f['scenes']} | {pm2(f['found_mean_tokens'])}"
                     f" | {pm2(f['found_mean_words'])} | {f['kept']:.0%} | {pm2(f['together_tokens'])} | "
                     f"{pm2(f['together_words'])} | {pm2(f['leakage_tokens'])} | {pm2(f['leakage_words'])} |")
    lines.append(f"Samples of each learned object alone and of both together {where} (toy analysis: colour and "
                 "shape), mean ± SE over scenes; 'words': the base model given the objects' words, the same prompts "
                 "and noise (what a perfect token would give); 'every concept kept': scenes where each concept was "
                 "found at >= 0.5 x its words' rate; leakage: single-concept samples showing what was not asked (the "
                 "other object, a mix of the two, the source background).")
    return lines


def print_table(result: dict) -> None:
    print("\n".join(table_lines(result)))


def iou_plot(result: dict) -> np.ndarray:
    """One panel per (set, init): mean object IoU by round ± SE for each mode, with and without CRF."""
    panels = {}
    for row in result["table"].values():
        panel = panels.setdefault((row["set"], row["init"]), ({}, {}))
        kinds = (("", "iou_by_round"), (" no CRF", "iou_no_crf_by_round"))
        for suffix, key in kinds[:1] if row["mode"] == "user" else kinds:  # user's masks are the truth
            panel[0][row["mode"] + suffix] = [m for m, _ in row[key]]
            panel[1][row["mode"] + suffix] = [e for _, e in row[key]]
    for (set_name, init), (series, errors) in panels.items():  # user (init-free) in every panel of its set
        for row in result["table"].values():
            if row["mode"] == "user" and row["set"] == set_name and "user" not in series:
                series["user"] = [m for m, _ in row["iou_by_round"]]
                errors["user"] = [e for _, e in row["iou_by_round"]]
    pics = {k: viz.line_plot(v[0], f"{k[0]} scenes, {k[1]} init: object IoU ± SE", "IoU", "round",
                             errors=v[1]) for k, v in panels.items()}
    sets = list(dict.fromkeys(k[0] for k in pics))
    inits = list(dict.fromkeys(k[1] for k in pics))
    blank = np.full_like(next(iter(pics.values())), 255)
    return np.concatenate([np.concatenate([pics.get((st, it), blank) for it in inits], axis=1) for st in sets])


def samples_plot(result: dict) -> np.ndarray | None:
    """One panel per (set, init): found alone, all together and leakage ± SE for x = the modes, then the words
    oracle. user runs once per scene, with the first init: its point is in every panel of its set. None when
    nothing was sampled."""
    rows = [r for r in result["table"].values() if r.get("samples")]
    if not rows:
        return None
    panels = dict.fromkeys((r["set"], r["init"]) for r in rows if r["mode"] != "user")
    for r in rows:  # a set run in user mode only (`--modes user`) still gets its panel
        if r["mode"] == "user" and all(p[0] != r["set"] for p in panels):
            panels[(r["set"], r["init"])] = None
    pics = []
    for set_name, init in panels:
        mine = {r["mode"]: r["samples"] for r in rows if r["set"] == set_name and (r["init"] == init or r["mode"] == "user")}
        modes = [m for m in MODES if m in mine]
        words = mine[modes[0]]
        series, errors = {}, {}
        for label, key in (("found alone", "found_mean"), ("all together", "together"), ("leakage", "leakage")):
            series[label] = [mine[m][f"{key}_tokens"][0] for m in modes] + [words[f"{key}_words"][0]]
            errors[label] = [mine[m][f"{key}_tokens"][1] for m in modes] + [words[f"{key}_words"][1]]
        pics.append(viz.line_plot(series, f"{set_name} scenes, {init} init: samples ± SE", "share",
                                  "learning mode (words: the base model given the objects' words)", errors=errors,
                                  x_ticks=modes + ["words"]))
    return np.concatenate(pics)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.bench.fidelity", description=__doc__.split("\n\n")[0])
    d = Settings()
    p.add_argument("--seeds", default="100-119", help="evaluation seeds of each set (E-step chosen on 0-19)")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--inits", default=",".join(INITS))
    p.add_argument("--out", default="runs/fidelity")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--model", default=d.model)
    p.add_argument("--token-steps", type=int, default=d.token_steps)
    p.add_argument("--estep-every", type=int, default=d.estep_every)
    p.add_argument("--joint-steps", type=int, default=d.joint_steps)
    p.add_argument("--timesteps", type=int, default=d.num_timesteps, help="timesteps averaged per mask estimate")
    p.add_argument("--inversion-steps", type=int, default=d.inversion_steps)
    p.add_argument("--samples", type=int, default=d.num_samples,
                   help="samples per prompt (0: no sampling; attention is then read off em's round 0)")
    p.add_argument("--no-crf", action="store_true", help="E-steps without the DenseCRF (a separate ablation run)")
    p.add_argument("--bare", action="store_true",
                   help="with --samples: also sample bare prompts ('a <tok>', as `generate --run` does), a second "
                        "table")
    args = p.parse_args(argv)
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    modes, sets, inits = split(args.modes), split(args.sets), split(args.inits)
    try:
        for name, got, known in (("mode", modes, MODES), ("set", sets, SETS), ("init", inits, INITS)):
            if [x for x in got if x not in known] or not got:
                raise JaxconceptError(f"unknown or no {name}(s) in {got}: choose from {', '.join(known)}")
        settings = Settings(args.model, args.token_steps, args.estep_every, args.joint_steps, args.timesteps,
                            args.inversion_steps, args.samples, crf=not args.no_crf, bare=args.bare)
        result = run_benchmark(parse_seeds(args.seeds), args.out, modes, settings, sets, inits)
    except (JaxconceptError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_outputs(result, args.out)
    return 0


def write_outputs(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(table_lines(result)) + "\n")
    images.save_image(iou_plot(result), os.path.join(out, "iou_by_round.png"))
    plot = samples_plot(result)
    if plot is not None:
        images.save_image(plot, os.path.join(out, "samples.png"))
    print_table(result)
    print(f"details: {os.path.join(out, 'fidelity.json')}\nplot: {os.path.join(out, 'iou_by_round.png')}")


if __name__ == "__main__":
    sys.exit(main())
