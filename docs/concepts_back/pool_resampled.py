"""The evaluation's figures (new background) from the benchmark's own 16 samples per prompt, from resample.py's
further samples (another sampling seed) and from both pooled (rates weighted by their sample counts), so that the
judge's sampling noise can be told from the training's (issue 27, section 25).
python docs/concepts_back/pool_resampled.py ORIGINAL/fidelity.json:RESAMPLED/fidelity.json ..."""
import json, sys
import numpy as np
from jaxconcept.bench.fidelity import mean_se

N_ORIGINAL = 16


def pooled(a, b, nb):
    """Two judgements' rates (tokens and words: found per concept, together, leakage) weighted by sample counts."""
    w = nb / (N_ORIGINAL + nb)
    mix = lambda x, y: (1 - w) * x + w * y
    return {src: {"found": {k: mix(v, b[src]["found"][k]) for k, v in a[src]["found"].items()},
                  "together": mix(a[src]["together"], b[src]["together"]),
                  "leakage": mix(a[src]["leakage"], b[src]["leakage"])} for src in ("tokens", "words")}


def figures(name, scenes):
    """scenes: [(label, {"tokens": ..., "words": ...})] -> one line of the evaluation's figures."""
    t_found = np.mean([np.mean(list(g["tokens"]["found"].values())) for _, g in scenes])
    w_found = np.mean([np.mean(list(g["words"]["found"].values())) for _, g in scenes])
    t_tog, w_tog = (np.mean([g[s]["together"] for _, g in scenes]) for s in ("tokens", "words"))
    leak, leak_se = mean_se([g["tokens"]["leakage"] - g["words"]["leakage"] for _, g in scenes])
    lost = [f"{lab} {k}" for lab, g in scenes for k, v in g["tokens"]["found"].items()
            if v < 0.5 * g["words"]["found"][k]]
    kept = 1 - len({lab for lab, _ in scenes if any(lab == l.rsplit(" ", 1)[0] for l in lost)}) / len(scenes)
    print(f"{name}: {len(scenes)} scenes, found x{t_found / w_found:.2f} ({t_found:.2f} / {w_found:.2f}), kept "
          f"{kept:.0%}, together x{t_tog / w_tog:.2f} ({t_tog:.2f} / {w_tog:.2f}), leakage - words {leak:+.3f} +- "
          f"{leak_se:.3f}; lost: {', '.join(lost) or 'none'}")


def main():
    first, second, both = [], [], []
    for pair in sys.argv[1:]:
        orig_path, new_path = pair.split(":")
        orig = {(r["set"], r["seed"]): r for r in json.load(open(orig_path))["runs"]
                if r["init"] == "color+shape" and r["mode"] == "em"}
        for r in json.load(open(new_path))["runs"]:
            key = (r["set"], r["seed"])
            if key not in orig or "resample_n" not in r:
                continue
            label = f"{r['set']} {r['seed'] % 1000}"
            first.append((label, orig[key]["samples"]))
            second.append((label, r["samples"]))
            both.append((label, pooled(orig[key]["samples"], r["samples"], r["resample_n"])))
    figures(f"the benchmark's {N_ORIGINAL} samples", first)
    figures("the further samples (another seed)", second)
    figures("pooled", both)


if __name__ == "__main__":
    main()
