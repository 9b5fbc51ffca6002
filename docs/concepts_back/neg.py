"""Diagnostic (docs/concepts_back.md section 11): a sweep run's token samples without and with a negative prompt
(e.g. the run's own background token, "<background>"), judged as `judge.measure` judges them.
python docs/concepts_back/neg.py runs/SWEEP/VARIANT__SCENE N NEGATIVE"""
import sys, os, json
import numpy as np
from jaxconcept.runio import runs
from jaxconcept.model import load_model
from jaxconcept import generate
from jaxconcept.toy import judge
run_dir, n, neg = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base = load_model("toy")
run = runs.load_run(run_dir, bundle=base)
tag = os.path.basename(run_dir).split("__")[1]
rec = json.load(open(f"runs/concepts_back/scenes/{tag}/concepts.json"))
toy = [judge.ToyConcept("<" + c["name"] + ">", c["color"], c["shape"], c.get("pattern", "solid"))
       for c in rec["concepts"] if c.get("kind", "object") == "object"]
src_bg = next(c["color"] for c in rec["concepts"] if c.get("kind") == "background")
measured = judge.prompts(toy)
for negative in ("", neg):
    st = generate.Settings(num_images=n, steps=25, guidance=5.0, seed=1234, negative_prompt=negative)
    pics = generate.generate(run, [p["tokens"] for p in measured], st, progress=False)
    s = judge.summarize(measured, judge.judge(pics, measured, toy, src_bg, judge.background_color(judge.DEFAULT_BACKGROUND)))
    print(tag, repr(negative), json.dumps({k: s[k] for k in ("found", "together", "leakage", "leaks")}), flush=True)
