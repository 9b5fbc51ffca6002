"""Two bench.fidelity results on the same evaluation scenes, paired per (set, seed, init, mode): for the new-background
samples and the bare ones, each side's means (found / words, every concept kept, together / words, leakage - words)
and the paired differences B - A; with one file, its summary alone. Tied tokens are judged as `bench_run` judged them.
Mask IoU (em - attention, paired per scene) per init and side.
python docs/concepts_back/evpair.py A/fidelity.json [B/fidelity.json]"""
import collections, json, sys
import numpy as np

def se(x):
    x = np.asarray(x, float)
    return x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0

def runs(path):
    return {(r["set"], r["seed"], r["init"], r["mode"]): r for r in json.load(open(path))["runs"]}

def measures(s):
    t, w = s["tokens"], s["words"]
    return {"found": t["found_mean"], "found_w": w["found_mean"], "together": t["together"],
            "together_w": w["together"], "leak": t["leakage"] - w["leakage"],
            "kept": all(t["found"][k] >= 0.5 * w["found"][k] for k in t["found"]),
            "lost": [k for k in t["found"] if t["found"][k] < 0.5 * w["found"][k]]}

sides = [runs(p) for p in sys.argv[1:]]
keys = sorted(set.intersection(*(set(s) for s in sides)))
for form in ("samples", "samples_bare"):
    groups = collections.defaultdict(list)
    for k in keys:
        if all(s[k].get(form) for s in sides):
            groups[(k[2], k[3])].append([measures(s[k][form]) for s in sides])
    for (init, mode), rows in sorted(groups.items()):
        out = []
        for i in range(len(sides)):
            m = {q: np.array([r[i][q] for r in rows], float) for q in ("found", "found_w", "together", "together_w",
                                                                        "leak", "kept")}
            out.append(f"found {m['found'].mean():.2f}/{m['found_w'].mean():.2f} (x{m['found'].mean() / m['found_w'].mean():.2f}) "
                       f"kept {m['kept'].mean():.0%} together {m['together'].mean():.2f}/{m['together_w'].mean():.2f} "
                       f"(x{m['together'].mean() / max(m['together_w'].mean(), 1e-9):.2f}) "
                       f"leak-words {m['leak'].mean():+.3f}±{se(m['leak']):.3f}")
        print(f"{form} {init} {mode} n={len(rows)}: " + " | ".join(out))
        if len(sides) == 2:
            d = {q: np.array([r[1][q] - r[0][q] for r in rows]) for q in ("found", "together", "leak")}
            print("   B - A: " + ", ".join(f"{q} {d[q].mean():+.3f}±{se(d[q]):.3f}" for q in d)
                  + "   lost A: " + str([(k[0], k[1], l) for k, r in zip([k for k in keys if (k[2], k[3]) == (init, mode)], rows) for l in r[0]["lost"]])
                  + "   lost B: " + str([(k[0], k[1], l) for k, r in zip([k for k in keys if (k[2], k[3]) == (init, mode)], rows) for l in r[1]["lost"]]))
for init in sorted({k[2] for k in keys}):
    for i, s in enumerate(sides):
        pairs = [(s[(st, sd, init, "em")]["iou_final"], s[(st, sd, init, "attention")]["iou_final"])
                 for (st, sd, ini, mode) in keys if ini == init and mode == "em" and (st, sd, init, "attention") in s]
        if pairs:
            d = np.array([a - b for a, b in pairs])
            print(f"masks {init} side {i}: em - attention {d.mean():+.3f}±{se(d):.3f} (n={len(d)})")
