"""Seed-to-seed spread of random-start samples (issue 27, section 18): user mode (true masks) on hard validation
scenes with other training seeds (the scene's seed + K), the fidelity benchmark's protocol otherwise.
python docs/concepts_back/seed_spread.py OUT K1,K2 SEEDS(comma) [N]"""
import json, os, sys, shutil
from jaxconcept.model import load_model
from jaxconcept.bench import fidelity as bf
from refit_check import bench_settings, done_keys, hard_scene


def main():
    out, offsets, seeds = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], [int(x) for x in sys.argv[3].split(",")]
    st = bench_settings(int(sys.argv[4]) if len(sys.argv) > 4 else 16)
    os.makedirs(out, exist_ok=True)
    res = os.path.join(out, "results.jsonl")
    done = done_keys(res, lambda r: (r["seed"], r["offset"]))
    base = load_model("toy")
    original = bf.run_config
    for seed in seeds:
        s, folder = hard_scene(out, seed, base.resolution)
        wc = {}
        for k in offsets:
            if (seed, k) in done:
                continue
            bf.run_config = lambda settings, mode, init, sd, k=k: original(settings, mode, init, sd + k)
            run_dir = os.path.join(out, "runs", str(seed), str(k))
            shutil.rmtree(run_dir, ignore_errors=True)
            row = bf.bench_run(base, wc, bf.BenchScene(s, folder, "hard"), "random", "user", st, run_dir)
            row["offset"] = k
            with open(res, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            t = row["samples"]["tokens"]
            print(seed, k, "found", {a: round(v, 2) for a, v in t["found"].items()}, "together %.2f" % t["together"],
                  flush=True)


if __name__ == "__main__":
    main()
