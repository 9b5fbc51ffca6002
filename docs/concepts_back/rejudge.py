"""Re-judge a fidelity benchmark's runs whose tied tokens (random starts, or one init word for both objects) took
their objects in the other order: each token's samples judged against the object its final mask was matched to,
as `bench.fidelity.bench_run` now does (issue 27, section 19). Runs whose matching is the identity keep their rows.
python docs/concepts_back/rejudge.py BENCH_OUT NEW_OUT      (reads BENCH_OUT/fidelity.json, writes NEW_OUT/)"""
import json, os, sys
import numpy as np
from PIL import Image
from jaxconcept.bench import fidelity as bf
from jaxconcept.masks import labels, settle
from jaxconcept.model import load_model
from jaxconcept.runio import runs
from jaxconcept.toy import judge


def matching(run_dir, spec, s):
    """{object name: the token that learned it} from the run's final masks, the scene's truth and the tied groups."""
    names = [os.path.basename(c.mask)[5:-4] for c in spec.concepts]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    final = np.stack([np.asarray(Image.open(os.path.join(run_dir, c["mask"]))) > 127 for c in summary["concepts"]])
    truth = np.stack([s.masks[n] for n in names])
    groups = settle.tied_groups([0] * len(names), [c.init_word for c in spec.concepts], [c.kind for c in spec.concepts])
    m = labels.matched_truths(final, truth, groups)
    return {names[m[c]]: spec.concepts[c].token for c in range(len(names))}


def main():
    src, out = sys.argv[1], sys.argv[2]
    rows = json.load(open(os.path.join(src, "fidelity.json")))["runs"]
    base, caches = load_model("toy"), {}
    settings = bf.Settings(num_samples=16, sample_steps=25, guidance=5.0)
    for r in rows:
        if not r.get("samples"):
            continue
        seed = r["seed"] - (bf.SEED_OFFSET if r["set"] == "natural" else 0)
        folder = os.path.join(src, "scenes", r["set"], str(seed))
        run_dir = os.path.join(src, "runs", r["set"], str(seed), r["init"], r["mode"])
        s = bf.make_bench_scene(r["set"], seed, base.resolution)
        spec = bf.scene_spec(folder, r["init"])
        judged_as = matching(run_dir, spec, s)
        own = {os.path.basename(c.mask)[5:-4]: c.token for c in spec.concepts}
        if judged_as == own:
            continue
        r["matched_to"] = {tok: own[name] for name, tok in judged_as.items() if own[name] != tok}
        run, wc = runs.load_run(run_dir, bundle=base), caches.setdefault((r["set"], seed), {})
        r["samples"], _ = bf.sample_fidelity(run, base, s, judged_as, settings, wc)
        if r.get("samples_bare"):
            r["samples_bare"], _ = bf.sample_fidelity(run, base, s, judged_as, settings, wc, judge.BARE)
        print(r["set"], seed, r["init"], r["mode"], "matched", r["matched_to"], bf.samples_text(r["samples"]), flush=True)
    bf.write_outputs(bf.aggregate(rows), out)


if __name__ == "__main__":
    main()
