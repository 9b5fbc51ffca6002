"""EM's masks only (token stage, no joint stage, no sampling), shape starts: object IoU by round per scene and
variant of the E-step's rules (section 22); resumable (OUT/results.jsonl).
python docs/concepts_back/emcheck.py OUT VARIANTS SCENES [TOKEN_STEPS]
e.g. python docs/concepts_back/emcheck.py runs/s43_em base,crf0,crf025 natural:5,hard:5"""
import sys, os, json, dataclasses, shutil, time
import numpy as np
sys.path.insert(0, "docs/concepts_back")
import sweep
from jaxconcept import config, learner
from jaxconcept.model import load_model

V = {"base": {}, "crf025": {"masks.crf_min_iou": 0.25}, "crf0": {"masks.crf_min_iou": 0.0},
     "bg045": {"masks.background_level": 0.45}, "bg065": {"masks.background_level": 0.65},
     "nocrf": {"masks.crf": False}}
out, variants, scenes = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 400
os.makedirs(out, exist_ok=True)
res = os.path.join(out, "results.jsonl")
done = {(r["variant"], r["scene"]) for r in map(json.loads, open(res))} if os.path.exists(res) else set()
base = load_model("toy")
for tag in scenes:
    folder, spec, rec, toy, src_bg, truth = sweep.load_scene(tag)
    shapes = {"<" + c["name"] + ">": c["shape"] for c in rec["concepts"] if c.get("kind", "object") == "object"}
    run_spec = dataclasses.replace(spec, concepts=tuple(
        dataclasses.replace(c, init_word=shapes.get(c.token, c.init_word)) for c in spec.concepts))
    for v in variants:
        if (v, tag) in done: continue
        cfg = config.get_config(); cfg.tokens.context_weight = 0.0
        sweep.apply(cfg, V[v]); cfg.joint.steps = 0; cfg.tokens.steps = steps
        run_dir = os.path.join(out, f"{v}__{tag.replace(':', '_')}"); shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.time()
        summary = learner.learn(cfg, [run_spec], run_dir, bundle=base, ground_truth=truth, progress=False)
        objs = [c.token for c in toy]
        rounds = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
        by_round = [float(np.mean([r["iou"][t] for t in objs])) for r in rounds if "iou" in r]
        row = {"variant": v, "scene": tag, "iou_by_round": by_round, "iou_final": float(np.mean([summary["iou_final"][t] for t in objs])),
               "rejected": [r.get("crf_rejected") for r in rounds if "iou" in r], "s": time.time() - t0}
        open(res, "a").write(json.dumps(row) + "\n")
        print(v, tag, "r0 %.2f final %.2f" % (by_round[0], row["iou_final"]), [round(x, 2) for x in by_round], "%.0fs" % row["s"], flush=True)
