"""Hypothesis check (issue 27, section 17): em's tokens learn under early wrong masks. A refit (the token stage again
from its start, on em's final masks, fixed) is the same as a user-mode run given em's final masks
(tests/test_learner.py checks it), so it is measured that way, with the fidelity benchmark's protocol.
python docs/concepts_back/refit_check.py OUT INIT SEEDS(comma) [N]   -> OUT/results.jsonl, rows per (seed, em/user/refit)"""
import json, os, sys, shutil
from jaxconcept.model import load_model
from jaxconcept.bench import fidelity as bf
from jaxconcept.toy import scene as ts


def bench_settings(n):
    """The learner's defaults, as section 12's evaluation commands give them, n samples per prompt."""
    return bf.Settings(token_steps=400, estep_every=50, num_timesteps=50, joint_steps=400, inversion_steps=100,
                       num_samples=n, sample_steps=25, guidance=5.0)


def done_keys(res, key):
    """The keys of the rows already in results.jsonl `res` (a resumed script skips them)."""
    return {key(r) for r in map(json.loads, open(res))} if os.path.exists(res) else set()


def hard_scene(out, seed, size):
    """Hard scene `seed`, written under OUT/scenes."""
    s = bf.make_bench_scene("hard", seed, size)
    folder = os.path.join(out, "scenes", str(seed))
    ts.write_scene(s, folder)
    return s, folder


def with_masks_of(folder, run_dir):
    """A copy of the scene folder whose masks are the run's final masks (the user's, for a user-mode run)."""
    f = folder + "_em_masks"
    shutil.rmtree(f, ignore_errors=True)
    shutil.copytree(folder, f)
    for name in os.listdir(f):
        if name.startswith("mask_"):
            shutil.copy(os.path.join(run_dir, "masks", "final", "image__" + name[5:]), os.path.join(f, name))
    return f


def main():
    out, init, seeds = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
    st = bench_settings(int(sys.argv[4]) if len(sys.argv) > 4 else 16)
    os.makedirs(out, exist_ok=True)
    res = os.path.join(out, "results.jsonl")
    done = done_keys(res, lambda r: (r["seed"], r["variant"]))
    base = load_model("toy")
    for seed in seeds:
        s, folder = hard_scene(out, seed, base.resolution)
        wc = {}
        for variant in ("em", "user", "refit"):
            if (seed, variant) in done:
                continue
            run_dir = os.path.join(out, "runs", str(seed), variant)
            shutil.rmtree(run_dir, ignore_errors=True)
            f = with_masks_of(folder, os.path.join(out, "runs", str(seed), "em")) if variant == "refit" else folder
            row = bf.bench_run(base, wc, bf.BenchScene(s, f, "hard"), init, "em" if variant == "em" else "user", st, run_dir)
            row["variant"] = variant
            with open(res, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            t, w = row["samples"]["tokens"], row["samples"]["words"]
            print(seed, variant, "iou %.2f" % row["iou_final"], "found", {k: round(v, 2) for k, v in t["found"].items()},
                  "words %.2f together %.2f/%.2f leak %.2f/%.2f" % (w["found_mean"], t["together"], w["together"],
                                                                   t["leakage"], w["leakage"]), flush=True)


if __name__ == "__main__":
    main()
