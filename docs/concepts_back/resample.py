"""Judge a fidelity benchmark's trained runs again with more samples and another sampling seed (nothing retrained):
how much of "every concept kept" and leakage is the judge's own sampling noise (issue 27, section 25).
python docs/concepts_back/resample.py BENCH_OUT NEW_OUT SAMPLES SEED_SHIFT [FORMS]   (FORMS: samples,samples_bare, the
default; writes NEW_OUT/fidelity.json, resumable)"""
import json, os, sys
from jaxconcept import generate
from jaxconcept.bench import fidelity as bf
from jaxconcept.model import load_model
from jaxconcept.runio import runs
from jaxconcept.toy import judge


def rejudged(src, r, base, n, shift, forms=("samples", "samples_bare")):
    """The run's rows judged again: the scene, prompts and words as the benchmark had them, `n` samples per prompt
    from the sampler's seed moved by `shift`."""
    seed = r["seed"] - (bf.SEED_OFFSET if r["set"] == "natural" else 0)
    s = bf.make_bench_scene(r["set"], seed, base.resolution)
    spec = bf.scene_spec(os.path.join(src, "scenes", r["set"], str(seed)), r["init"])
    own = {os.path.basename(c.mask)[5:-4]: c.token for c in spec.concepts}
    learned = {whose: token for token, whose in r.get("matched_to", {}).items()}
    concepts = [judge.ToyConcept(learned.get(own[o.name], own[o.name]), o.color, o.shape, o.pattern)
                for o in s.objects]
    run = runs.load_run(os.path.join(src, "runs", r["set"], str(seed), r["init"], r["mode"]), bundle=base)
    gen = generate.Settings(num_images=n, steps=25, guidance=5.0, seed=s.seed + shift)
    words, r = {}, dict(r, resample_n=n, resample_shift=shift)
    for key in forms:
        background = bf.new_background(s) if key == "samples" else judge.BARE
        m = judge.measure(run, base, judge.Asked(concepts, background=background), s.background.color, gen,
                          words=words)
        r[key] = {k: m[k] for k in ("prompts", "tokens", "words", "report")}
    return r


def main():
    src, out, n, shift = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    forms = sys.argv[5].split(",") if len(sys.argv) > 5 else ("samples", "samples_bare")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "fidelity.json")
    done = json.load(open(path))["runs"] if os.path.exists(path) else []
    keys = {(r["set"], r["seed"], r["init"], r["mode"]) for r in done}
    base = load_model("toy")
    for r in json.load(open(os.path.join(src, "fidelity.json")))["runs"]:
        if not r.get("samples") or (r["set"], r["seed"], r["init"], r["mode"]) in keys:
            continue
        done.append(rejudged(src, r, base, n, shift, forms))
        json.dump({"runs": done}, open(path, "w"))
        print(r["set"], r["seed"] % 1000, bf.samples_text(done[-1]["samples"]), flush=True)


if __name__ == "__main__":
    main()
