"""Per checkpoint of a toy run: what the rows draw (base UNet for token-stage checkpoints).
python rounds.py RUN N"""
import json, sys, os, dataclasses
import numpy as np, jax.numpy as jnp
import orbax.checkpoint as ocp
from jaxconcept import runs, generate
from jaxconcept.model import load_model
from jaxconcept.toy import judge
from jaxconcept.evaluate import toy_attributes
from PIL import Image

run_dir = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
summary = runs.read_summary(run_dir); cfg = runs.read_config(run_dir)
base = load_model(cfg["model"], seed=cfg.get("seed", 0))
run = runs.load_run(run_dir, bundle=base)
listed = runs.listed_concepts(summary)
concepts = [judge.ToyConcept(c["token"], **toy_attributes(c["token"])) for c in listed if toy_attributes(c["token"])]
img = np.asarray(Image.open(os.path.join(run_dir, listed[0]["image"])).convert("RGB"))
src_bg = judge.source_background(img)
s = generate.Settings(num_images=n, steps=25, guidance=5.0, seed=1234)
measured = judge.prompts(concepts)
words = judge.summarize(measured, judge.judge(generate.generate(base, [p["words"] for p in measured], s, progress=False), measured, concepts, src_bg, "teal"))
print("words", json.dumps(words))
m = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")))
base_run = dataclasses.replace(run, bundle=run.bundle.replace(params={**run.bundle.params, "unet": base.params["unet"]}))
for step in sorted(m.all_steps()):
    got = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), state=ocp.args.StandardRestore()))
    rows = jnp.asarray(np.asarray(got.state["params"]["rows"]))
    r = dataclasses.replace(run if got.meta["stage"] == "done" else base_run, rows_NxD=rows)
    if got.meta["stage"] == "joint": continue
    pics = generate.generate(r, [p["tokens"] for p in measured], s, progress=False)
    tok = judge.summarize(measured, judge.judge(pics, measured, concepts, src_bg, "teal"))
    print(step, got.meta, "found", {k[1:6]: round(v, 2) for k, v in tok["found"].items()}, "together", tok["together"], "leak", tok["leaks"], flush=True)
