"""Summary of wise.py's (or any per-scale) results: per prompt form ("new" background, "bare"), per scale, the
means over scenes of found alone / words, every concept kept, together / words, leakage - words, and paired
differences against scale 1 (the run as trained).  python docs/concepts_back/wisesum.py RESULTS.jsonl"""
import json, sys, collections
import numpy as np
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(dict)
for r in rows: by[r["scale"]][r["scene"]] = r
def stats(r, form):
    t, w = r[form]["tokens"], r[form]["words"]
    kept = all(t["found"][k] >= 0.5 * w["found"][k] for k in t["found"])
    return t["found_mean"], w["found_mean"], kept, t["together"], w["together"], t["leakage"] - w["leakage"], t["leaks"]
scenes = sorted(by[1.0])
for form in ("new", "bare"):
    print(form)
    ref = {s: stats(by[1.0][s], form) for s in scenes}
    for scale in sorted(by, reverse=True):
        sc = [s for s in scenes if s in by[scale]]
        st = [stats(by[scale][s], form) for s in sc]
        f = np.mean([x[0] for x in st]); fw = np.mean([x[1] for x in st])
        tg = np.mean([x[3] for x in st]); tw = np.mean([x[4] for x in st])
        lk = np.array([x[5] for x in st])
        d = np.array([x[0] - ref[s][0] for x, s in zip(st, sc)])
        dl = np.array([x[5] - ref[s][5] for x, s in zip(st, sc)])
        kinds = {k: round(np.mean([x[6][k] for x in st]), 3) for k in st[0][6]}
        print(f"  s={scale:4} n={len(sc)} found {f:.2f}/{fw:.2f} (x{f/fw:.2f}) kept {np.mean([x[2] for x in st]):.0%} together {tg:.2f}/{tw:.2f} (x{tg/max(tw,1e-9):.2f}) leak-words {lk.mean():+.3f}±{lk.std(ddof=1)/np.sqrt(len(lk)):.3f}"
              f"  | vs s=1: found {d.mean():+.3f}±{d.std(ddof=1)/np.sqrt(len(d)):.3f} leak {dl.mean():+.3f}±{dl.std(ddof=1)/np.sqrt(len(dl)):.3f} {kinds}")
