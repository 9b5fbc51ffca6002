"""Table of bgdist.py's results: per scene leakage by kind (tokens, rows at their words' norms, words), means and
paired differences from the words (mean +- SE over scenes)."""
import json, sys, numpy as np
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ("tokens", "normed", "words")
print("scene      src    " + "  ".join("%-28s" % k for k in keys))
D = {k: [] for k in keys}
for r in rows:
    line = "%-10s %-6s " % (r["scene"], r["source"])
    for k in keys:
        lk = r[k]["leaks"]
        D[k].append([r[k]["leakage"], lk["background"], lk["mixed"], lk["other"], r[k]["found_mean"], r[k]["together"]])
        line += " L%.2f b%.2f m%.2f o%.2f       " % (r[k]["leakage"], lk["background"], lk["mixed"], lk["other"])
    print(line)
for k in keys:
    a = np.array(D[k]); d = a - np.array(D["words"])
    se = d.std(0, ddof=1) / np.sqrt(len(d))
    print("%-7s mean leak %.3f bg %.3f mixed %.3f other %.3f found %.3f together %.3f | paired-words leak %+.3f±%.3f bg %+.3f±%.3f mixed %+.3f other %+.3f" % (
        (k, *a.mean(0), d[:, 0].mean(), se[0], d[:, 1].mean(), se[1], d[:, 2].mean(), d[:, 3].mean())))
# where the alone samples' backgrounds go: the asked one (teal), the source image's, any other
for k in keys:
    fr = []
    for r in rows:
        flat = [x for p in r[k]["bg"] for x in p]
        fr.append([np.mean([x == "teal" for x in flat]), np.mean([x == r["source"] for x in flat]),
                   np.mean([x not in ("teal", r["source"]) for x in flat])])
    same = []
    if k != "words":
        same = [np.mean([a == b for pa, pb in zip(r[k]["bg"], r["words"]["bg"]) for a, b in zip(pa, pb)]) for r in rows]
    print("%-7s backgrounds: asked %.2f source %.2f other %.2f%s" % (k, *np.mean(fr, 0),
          "  (same colour as the words' sample of that noise: %.2f)" % np.mean(same) if same else ""))
