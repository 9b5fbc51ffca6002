"""Seed-to-seed spread of random-start samples: user mode (true masks) on hard validation scenes with other
training seeds (the run's seed + K). python docs/concepts_back/seed_spread.py OUT K1,K2 SEEDS [N]"""
import json, os, sys, shutil
from jaxconcept.model import load_model
from jaxconcept.bench import fidelity as bf
from jaxconcept.toy import scene as ts

out, offsets, seeds = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], [int(x) for x in sys.argv[3].split(",")]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
st = bf.Settings(token_steps=400, estep_every=50, num_timesteps=50, joint_steps=400, inversion_steps=100,
                 num_samples=n, sample_steps=25, guidance=5.0)
os.makedirs(out, exist_ok=True)
res = os.path.join(out, "results.jsonl")
done = {(r["seed"], r["offset"]) for r in map(json.loads, open(res))} if os.path.exists(res) else set()
base = load_model("toy")
original = bf.run_config
for seed in seeds:
    s = bf.make_bench_scene("hard", seed, base.resolution)
    folder = os.path.join(out, "scenes", str(seed)); ts.write_scene(s, folder)
    wc = {}
    for k in offsets:
        if (seed, k) in done: continue
        bf.run_config = lambda settings, mode, init, sd, k=k: original(settings, mode, init, sd + k)
        run_dir = os.path.join(out, "runs", str(seed), str(k)); shutil.rmtree(run_dir, ignore_errors=True)
        row = bf.bench_run(base, wc, bf.BenchScene(s, folder, "hard"), "random", "user", st, run_dir)
        row["offset"] = k
        with open(res, "a") as fh: fh.write(json.dumps(row) + "\n")
        t = row["samples"]["tokens"]
        print(seed, k, "found", {a: round(v, 2) for a, v in t["found"].items()}, "together %.2f" % t["together"], flush=True)
