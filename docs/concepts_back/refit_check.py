"""Hypothesis check (issue 27, random starts): em's tokens learn under early wrong masks. Emulate a refit
(token stage from the same start, with em's final masks fixed) by a user-mode run given em's final masks.
python docs/concepts_back/refit_check.py OUT INIT SEEDS(comma) [N]   -> OUT/results.jsonl rows per (seed, variant em/user/refit)"""
import json, os, sys, shutil
from jaxconcept.model import load_model
from jaxconcept.bench import fidelity as bf
from jaxconcept.toy import scene as ts

out, init, seeds = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
st = bf.Settings(token_steps=400, estep_every=50, num_timesteps=50, joint_steps=400, inversion_steps=100,
                 num_samples=n, sample_steps=25, guidance=5.0)
os.makedirs(out, exist_ok=True)
res = os.path.join(out, "results.jsonl")
done = {(r["seed"], r["variant"]) for r in map(json.loads, open(res))} if os.path.exists(res) else set()
base = load_model("toy")
for seed in seeds:
    s = bf.make_bench_scene("hard", seed, base.resolution)
    folder = os.path.join(out, "scenes", str(seed)); ts.write_scene(s, folder)
    wc = {}
    for variant in ("em", "user", "refit"):
        if (seed, variant) in done: continue
        run_dir = os.path.join(out, "runs", str(seed), variant); shutil.rmtree(run_dir, ignore_errors=True)
        f = folder
        if variant == "refit":  # the scene with em's final masks as the user's
            f = folder + "_em_masks"; shutil.rmtree(f, ignore_errors=True); shutil.copytree(folder, f)
            for name in os.listdir(f):
                if name.startswith("mask_"):
                    shutil.copy(os.path.join(out, "runs", str(seed), "em", "masks", "final", "image__" + name[5:]),
                                os.path.join(f, name))
        row = bf.bench_run(base, wc, bf.BenchScene(s, f, "hard"), init, "em" if variant == "em" else "user", st, run_dir)
        row["variant"] = variant
        with open(res, "a") as fh: fh.write(json.dumps(row) + "\n")
        t, w = row["samples"]["tokens"], row["samples"]["words"]
        print(seed, variant, "iou %.2f" % row["iou_final"], "found", {k: round(v, 2) for k, v in t["found"].items()},
              "words %.2f together %.2f/%.2f leak %.2f/%.2f" % (w["found_mean"], t["together"], w["together"], t["leakage"], w["leakage"]), flush=True)
