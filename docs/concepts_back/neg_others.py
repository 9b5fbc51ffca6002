"""The run's other objects as the negative prompt of each single-concept prompt (section 24): a sampling-side lever
on "a token draws its scene's other object" and on the mixed leak. For each sweep run (variant__scene folders), per
prompt form (the benchmark's new background, bare), tokens and words alike: each object alone with the negative
prompt "a <other>" (words: "a <other's words>"), both together without one; judged as `judge.measure` judges, beside
the same prompts, noise and seeds without negatives. Resumable (one line per run and form in OUT).
python docs/concepts_back/neg_others.py OUT.jsonl RUN_DIR..."""
import json, os, sys
import numpy as np
from jaxconcept import generate
from jaxconcept.runio import runs
from jaxconcept.model import load_model
from jaxconcept.bench import fidelity as bf
from jaxconcept.toy import judge
from sweep import load_scene

SETTINGS = dict(num_images=16, steps=25, guidance=5.0, seed=1234)


def sampled(model, measured, key, negatives):
    """P x S x H x W x 3: each prompt with its own negative prompt ("" for none)."""
    return np.stack([generate.generate(model, [p[key]], generate.Settings(negative_prompt=neg, **SETTINGS),
                                       progress=False)[0] for p, neg in zip(measured, negatives)])


def negatives_for(measured, toy, key):
    name = (lambda c: c.token) if key == "tokens" else (lambda c: c.words)
    return [" and ".join("a " + name(o) for o in toy if o not in p["concepts"]) for p in measured]


def main():
    out_path, run_dirs = sys.argv[1], sys.argv[2:]
    done = set()
    if os.path.exists(out_path):
        done = {(r["run"], r["form"]) for r in map(json.loads, open(out_path))}
    base = load_model("toy")
    for run_dir in run_dirs:
        variant, tag = os.path.basename(run_dir.rstrip("/")).split("__")
        tag = tag.replace("_", ":")
        _, _, _, toy, src_bg, _ = load_scene(tag)
        which, seed = tag.split(":")
        forms = {"new": bf.new_background(bf.make_bench_scene(which, int(seed), 64)), "bare": judge.BARE}
        run = None
        for form, background in forms.items():
            if (run_dir, form) in done:
                continue
            run = run or runs.load_run(run_dir, bundle=base)
            measured = judge.prompts(toy, background)
            row = {"run": run_dir, "variant": variant, "scene": tag, "form": form}
            for key, model in (("tokens", run), ("words", base)):
                for label, negs in (("plain", [""] * len(measured)), ("neg", negatives_for(measured, toy, key))):
                    pics = sampled(model, measured, key, negs)
                    judged = judge.judge(pics, measured, toy, src_bg, judge.background_color(background))
                    row[f"{key}_{label}"] = judge.summarize(measured, judged)
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            t, w = row["tokens_neg"], row["tokens_plain"]
            print(tag, form, "found %.2f -> %.2f" % (w["found_mean"], t["found_mean"]),
                  "together %.2f -> %.2f" % (w["together"], t["together"]),
                  "leak %.2f -> %.2f" % (w["leakage"], t["leakage"]), "| words found %.2f -> %.2f leak %.2f -> %.2f" % (
                      row["words_plain"]["found_mean"], row["words_neg"]["found_mean"],
                      row["words_plain"]["leakage"], row["words_neg"]["leakage"]), flush=True)


if __name__ == "__main__":
    main()
