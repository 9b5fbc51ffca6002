"""Diagnostic (issue 27, leakage): where do the samples' backgrounds go? For each validation scene: the recipe's run,
then per alone-prompt sample the background colour (asked / source / other), for the tokens, the tokens with each
row rescaled to its init word's norm (no retraining), and the words.
python docs/concepts_back/bgdist.py runs/bgdist natural:3,hard:3,natural:4,natural:5,natural:6,natural:7,hard:4,hard:5,hard:6 16
summarised by docs/concepts_back/bgsum.py runs/bgdist/bgdist.jsonl"""
import json, os, sys, shutil, dataclasses
import numpy as np, jax.numpy as jnp
from jaxconcept import config, learner, inputs, generate
from jaxconcept.runio import runs
from jaxconcept.model import load_model, tokens as tk
from jaxconcept.toy import judge, analysis

out, scenes, n = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
os.makedirs(out, exist_ok=True)
res = os.path.join(out, "bgdist.jsonl")
done = {json.loads(l)["scene"] for l in open(res)} if os.path.exists(res) else set()
base = load_model("toy")
settings = generate.Settings(num_images=n, steps=25, guidance=5.0, seed=1234)
table = np.asarray(tk.embedding_table(base.params["text_encoder"]), np.float32)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import init_word_ids, load_scene  # noqa: E402  (the sweep's scenes, as it builds them)

def bgs(pics, measured):
    return [[analysis.describe_background(np.asarray(x))["color"] for x in p]
            for p, m in zip(pics, measured) if m["kind"] == "alone"]

for tag in scenes:
    if tag in done: continue
    folder, spec, rec, toy, src, truth = load_scene(tag)
    run_dir = os.path.join(out, "recipe__" + tag.replace(":", "_"))
    if not os.path.isfile(os.path.join(run_dir, "summary.json")):
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = config.get_config()
        learner.learn(cfg, [spec], run_dir, bundle=base, ground_truth=truth, progress=False)
    run = runs.load_run(run_dir, bundle=base)
    word_ids = init_word_ids(base, run_dir)
    rows = np.asarray(run.rows_NxD, np.float32)
    target = np.linalg.norm(table[word_ids], axis=1)
    normed = rows * (target / np.linalg.norm(rows, axis=1))[:, None]
    runs_ = {"tokens": run, "normed": dataclasses.replace(run, rows_NxD=jnp.asarray(normed, run.rows_NxD.dtype))}
    words = {}
    row = {"scene": tag, "source": src, "norm_ratio": (np.linalg.norm(rows, axis=1) / target).round(3).tolist()}
    measured = judge.prompts(toy)
    for key, r in runs_.items():
        m = judge.measure(r, base, judge.Asked(toy), src, settings, words=words)
        row[key] = {k: m["tokens"][k] for k in ("found", "found_mean", "together", "leakage", "leaks")}
        row[key]["bg"] = bgs(m["pictures"]["tokens"], measured)
    # the words' samples are the same for both (measure caches them in `words`)
    row["words"] = {k: m["words"][k] for k in ("found", "found_mean", "together", "leakage", "leaks")}
    row["words"]["bg"] = bgs(m["pictures"]["words"], measured)
    with open(res, "a") as f: f.write(json.dumps(row) + "\n")
    def frac(b):
        flat = [x for p in b for x in p]
        return "asked %.2f src %.2f other %.2f" % (np.mean([x == "teal" for x in flat]), np.mean([x == src for x in flat]),
                                                   np.mean([x not in ("teal", src) for x in flat]))
    print(tag, "src", src, "norms", row["norm_ratio"], flush=True)
    for key in ("tokens", "normed", "words"):
        print("  %-7s found %.2f together %.2f leak %.2f | %s" % (key, row[key]["found_mean"],
              row[key]["together"], row[key]["leakage"], frac(row[key]["bg"])), flush=True)
