"""Fidelity benchmark on toy scenes (the paper's Fig. 3 and its CRF ablation, in the toy world).

For each scene (two objects and a background, drawn from seeds training never used), learn its concepts in
modes `attention`, `em` and `user`, then report per concept and on average:
  * mask IoU against the ground truth after every round, with and without CRF (`em` re-estimates;
    `attention` keeps its stage-1 masks; `user` trains on the true masks);
  * sample fidelity: each learned object token in new prompts ("a <tok> on a teal water background"):
    does the toy analysis find an object of the right colour and shape (and pattern)?
Writes fidelity.json, iou_by_round.png and prints a table.

    python -m jaxconcept.bench.fidelity --seeds 100-119 --out runs/fidelity
    python -m jaxconcept.bench.fidelity --seeds 100-103 --token-steps 200 --joint-steps 100   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from .. import config, images, inputs, learner, runs, sampling, tokens, viz
from ..errors import JaxconceptError
from ..model import load_model
from ..toy import analysis, scene
from ..toy.evaluate import parse_seeds

# Benchmark scene s is toy scene SEED_OFFSET + s: toy pre-training draws seeds 0..num_scenes-1 (seed 0),
# the toy gates 10,000,000 onwards.
SEED_OFFSET = 20_000_000
HARD_OFFSET = 30_000_000  # the hard set's seeds: no other part of the project draws scenes from here
MODES = ("attention", "em", "user")
SETS = ("natural", "hard")
# close colours: two objects whose colours the toy model's attention tells apart poorly, on textured
# backgrounds (pink beside purple and red)
HARD_PAIRS = (("orange", "red"), ("purple", "blue"), ("red", "purple"))
HARD_BACKGROUNDS = ("pink", "gray", "beige")
HARD_TEXTURES = tuple(t for t in scene.TEXTURES if t != scene.DEFAULT_TEXTURE)


def natural_scene(seed: int, size: int) -> scene.Scene:
    """Held-out scene s of the natural distribution: two objects, anything the toy world draws."""
    return scene.make_scene(SEED_OFFSET + seed, size=size, num_objects=2)


bench_scene = natural_scene  # the earlier name


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


def new_prompts(s: scene.Scene, token_of: dict[str, str]) -> list[tuple[str, list]]:
    """(prompt, expected objects): each object token alone and both together, on a background the scene
    does not have."""
    colors = [c for c in scene.BACKGROUND_COLORS if c != s.background.color]
    textures = [t for t in scene.TEXTURES if t != s.background.texture]
    rng = np.random.default_rng(s.seed)
    bg = f"{colors[rng.integers(len(colors))]} {textures[rng.integers(len(textures))]} background"
    objs = list(s.objects)
    out = [(f"a {token_of[o.name]} on a {bg}", [o]) for o in objs]
    out.append((f"a {token_of[objs[0].name]} and a {token_of[objs[1].name]} on a {bg}", objs))
    return out


def sample_fidelity(run, prompts, sampler, num_samples: int, seed: int):
    """Per prompt: share of samples where each expected object is found (colour + shape), and with pattern."""
    records, pictures = [], []
    for p, (prompt, expected) in enumerate(prompts):
        ids = tokens.tokenize(run.bundle.tokenizer, [prompt, ""], run.bundle.max_length)
        ctx = run.hidden_states(jax.numpy.asarray(ids))
        cond = jax.numpy.broadcast_to(ctx[:1], (num_samples,) + ctx.shape[1:])
        uncond = jax.numpy.broadcast_to(ctx[1:], cond.shape)
        latent = run.bundle.resolution // run.bundle.vae_factor
        noise = jax.random.normal(jax.random.key(seed * 1000 + p),
                                  (num_samples, run.bundle.unet.config.in_channels, latent, latent))
        pics = images.to_uint8(np.asarray(sampler(run.bundle.params, noise, cond, uncond)))
        found, pattern = [], []
        for pic in pics:
            m = analysis.match_caption(pic, expected)
            found.append(m["fraction"])
            pattern.append(m["pattern_fraction"])
        records.append({"prompt": prompt, "found": float(np.mean(found)), "pattern": float(np.mean(pattern))})
        pictures.append(pics)
    return records, pictures


def run_benchmark(seeds, out: str, modes=MODES, model: str = "toy", token_steps: int = 400,
                  estep_every: int = 50, joint_steps: int = 400, num_timesteps: int = 50, num_samples: int = 4,
                  sample_steps: int = 25, guidance: float = 5.0, progress: bool = False, crf: bool = True) -> dict:
    base = load_model(model)
    sampler = sampling.make_sampler(base, "ddim", sample_steps, guidance)  # modules shared by every run
    results = []
    for s_idx in seeds:
        s = bench_scene(s_idx, base.resolution)
        folder = os.path.join(out, "scenes", str(s_idx))
        scene.write_scene(s, folder)
        spec = inputs.from_toy_scene_folder(folder)
        token_of = {c.mask and os.path.basename(c.mask)[5:-4]: c.token for c in spec.concepts}
        truth = np.stack([s.masks[name] for name in token_of])
        for mode in modes:
            cfg = config.get_config()
            cfg.model, cfg.mode, cfg.seed = model, mode, s_idx
            cfg.tokens.steps, cfg.tokens.estep_every, cfg.joint.steps = token_steps, estep_every, joint_steps
            cfg.masks.num_timesteps = num_timesteps
            cfg.masks.crf = crf  # toy objects are flat colours: the CRF alone can snap masks onto them
            run_dir = os.path.join(out, "runs", str(s_idx), mode)
            summary = learner.learn(cfg, [spec], run_dir, bundle=base, ground_truth=truth, progress=progress)
            rounds = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"round"' in x]
            rounds = {r["round"]: r for r in rounds}  # a resumed run may repeat a round: keep the last
            rounds = [rounds[k] for k in sorted(rounds)]
            run = runs.load_run(run_dir, bundle=base)
            fid, pics = sample_fidelity(run, new_prompts(s, token_of), sampler, num_samples, s_idx)
            images.save_image(viz.grid([list(p) for p in pics], [[r["prompt"][:20]] for r in fid], cell=96),
                              os.path.join(run_dir, "samples.png"))
            results.append({
                "seed": s_idx, "mode": mode, "caption": s.caption,
                "iou_by_round": [r["iou"] for r in rounds], "iou_no_crf_by_round": [r["iou_no_crf"] for r in rounds],
                "mean_iou_by_round": [r["mean_iou"] for r in rounds],
                "mean_iou_no_crf_by_round": [r["mean_iou_no_crf"] for r in rounds],
                "crf_seconds": sum(r.get("crf_seconds", 0.0) for r in rounds),
                "samples": fid, "seconds": summary["seconds"],
            })
            print(f"scene {s_idx} {mode:<9} IoU {results[-1]['mean_iou_by_round'][0]:.3f} -> "
                  f"{results[-1]['mean_iou_by_round'][-1]:.3f}  samples found "
                  f"{np.mean([f['found'] for f in fid]):.2f}  ({summary['seconds']:.0f} s)", flush=True)
    return aggregate(results)


def aggregate(results) -> dict:
    table = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        mine = [r for r in results if r["mode"] == mode]
        curve = np.mean([r["mean_iou_by_round"] for r in mine], axis=0)
        curve_raw = np.mean([r["mean_iou_no_crf_by_round"] for r in mine], axis=0)
        table[mode] = {
            "scenes": len(mine), "iou_by_round": curve.tolist(), "iou_no_crf_by_round": curve_raw.tolist(),
            "iou_first": float(curve[0]), "iou_final": float(curve[-1]), "iou_final_no_crf": float(curve_raw[-1]),
            "samples_found": float(np.mean([f["found"] for r in mine for f in r["samples"]])),
            "samples_pattern": float(np.mean([f["pattern"] for r in mine for f in r["samples"]])),
            "crf_seconds_per_run": float(np.mean([r["crf_seconds"] for r in mine])),
        }
    return {"table": table, "runs": results}


def print_table(table: dict) -> None:
    print(f"{'mode':<10} {'IoU r0':>7} {'IoU end':>8} {'no CRF':>7} {'samples':>8} {'pattern':>8}")
    for mode, row in table.items():
        print(f"{mode:<10} {row['iou_first']:7.3f} {row['iou_final']:8.3f} {row['iou_final_no_crf']:7.3f} "
              f"{row['samples_found']:8.2f} {row['samples_pattern']:8.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.bench.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="100-119")
    p.add_argument("--out", default="runs/fidelity")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--model", default="toy")
    p.add_argument("--token-steps", type=int, default=400)
    p.add_argument("--estep-every", type=int, default=50)
    p.add_argument("--joint-steps", type=int, default=400)
    p.add_argument("--timesteps", type=int, default=50, help="timesteps averaged per mask estimate")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--no-crf", action="store_true",
                   help="E-steps without the DenseCRF (on flat-coloured toy objects the CRF alone makes masks "
                        "exact, leaving EM nothing to show)")
    args = p.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(","))
    try:
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise JaxconceptError(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
        result = run_benchmark(parse_seeds(args.seeds), args.out, modes, args.model, args.token_steps,
                               args.estep_every, args.joint_steps, args.timesteps, args.samples,
                               crf=not args.no_crf)
    except (JaxconceptError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=1)
    series = {}
    for mode, row in result["table"].items():
        series[f"{mode}"] = row["iou_by_round"]
        series[f"{mode} (no CRF)"] = row["iou_no_crf_by_round"]
    images.save_image(viz.line_plot(series, "mean mask IoU vs ground truth", "IoU", "round"),
                      os.path.join(args.out, "iou_by_round.png"))
    print_table(result["table"])
    print(f"details: {os.path.join(args.out, 'fidelity.json')}\nplot: {os.path.join(args.out, 'iou_by_round.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
