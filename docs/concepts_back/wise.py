"""Issue 27: the joint stage's UNet change taken at a fraction (WiSE-FT, Wortsman et al. 2022: weights
base + s * (tuned - base)), at sampling time, on finished recipe runs: no retraining.
Each scale is judged on the scene's new background (the benchmark's, `bench.fidelity.new_background`) and in bare
prompts, 16 samples, seed 1234, beside the words oracle.
python docs/concepts_back/wise.py OUT.jsonl N SCALES(comma) RUN_DIR...   (RUN_DIR: runs/SWEEP/VARIANT__SET_SEED)"""
import dataclasses, json, os, sys
import jax
from jaxconcept.runio import runs
from jaxconcept.model import load_model
from jaxconcept import generate
from jaxconcept.bench import fidelity as bf
from jaxconcept.toy import judge

out, n, scales = sys.argv[1], int(sys.argv[2]), [float(s) for s in sys.argv[3].split(",")]
done = set()
if os.path.exists(out):
    done = {(r["run"], r["scale"]) for r in map(json.loads, open(out))}
base = load_model("toy")
settings = generate.Settings(num_images=n, steps=25, guidance=5.0, seed=1234)
blend = jax.jit(lambda b, t, s: jax.tree_util.tree_map(lambda x, y: x + s * (y - x), b, t))
for run_dir in sys.argv[4:]:
    tag = os.path.basename(run_dir).split("__")[1]
    which, seed = tag.rsplit("_", 1)
    s = bf.make_bench_scene(which, int(seed), 64)
    rec = json.load(open(f"runs/concepts_back/scenes/{tag}/concepts.json"))
    toy = [judge.ToyConcept("<" + c["name"] + ">", c["color"], c["shape"], c.get("pattern", "solid"))
           for c in rec["concepts"] if c.get("kind", "object") == "object"]
    src_bg = next(c["color"] for c in rec["concepts"] if c.get("kind") == "background")
    run = runs.load_run(run_dir, bundle=base)
    tuned = run.bundle.params["unet"]
    words = {}
    for scale in scales:
        if (run_dir, scale) in done:
            continue
        unet = blend(base.params["unet"], tuned, scale)
        r = dataclasses.replace(run, bundle=run.bundle.replace(params={**run.bundle.params, "unet": unet}))
        row = {"run": run_dir, "scene": tag, "scale": scale}
        for form, bg in (("new", bf.new_background(s)), ("bare", judge.BARE)):
            m = judge.measure(r, base, judge.Asked(toy, background=bg), src_bg, settings, words=words)
            row[form] = {k: m[k] for k in ("tokens", "words", "report")}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(tag, scale, "new found", {k: round(v, 2) for k, v in row["new"]["tokens"]["found"].items()},
              "words", {k: round(v, 2) for k, v in row["new"]["words"]["found"].items()},
              "tog %.2f leak %.2f | bare found %s tog %.2f leak %.2f" % (
                  row["new"]["tokens"]["together"], row["new"]["tokens"]["leakage"],
                  {k: round(v, 2) for k, v in row["bare"]["tokens"]["found"].items()},
                  row["bare"]["tokens"]["together"], row["bare"]["tokens"]["leakage"]), flush=True)
