"""Candidates judged over training seeds (section 24): each pair CANDIDATE:REFERENCE is one training seed (e.g.
ema98:minsnr5 at seed 0, ema98_seed1:seed1 at seed 1); per prompt form, the paired differences candidate -
reference over every (scene, seed) pair pooled (mean ± SE; scenes up / down), and kept (every concept >= 0.5 x its
words' rate) counted over the same pairs.
python docs/concepts_back/seeds.py CAND:REF[,CAND:REF...] RESULTS.jsonl...
   (a single pair REF1:REF0 of the recipe at two seeds gives the differences chance alone makes)"""
import collections, sys
import numpy as np
from forms import rows_of, measures, se

pairs = [p.split(":") for p in sys.argv[1].split(",")]
table = collections.defaultdict(dict)  # (form, variant) -> scene -> measures
for path in sys.argv[2:]:
    for variant, scene, forms in rows_of(path):
        if scene != "default":
            for form, m in forms.items():
                table[(form, variant)][scene] = measures(m)
print(f"{' + '.join(f'{c} - {r}' for c, r in pairs)}")
print("| form | pairs | found | together | leakage | kept: reference → candidate |\n|---|---|---|---|---|---|")
for form in ("teal", "new", "bare"):
    d, kept = collections.defaultdict(list), [0, 0]
    for cand, ref in pairs:
        a, b = table.get((form, cand), {}), table.get((form, ref), {})
        for s in sorted(set(a) & set(b)):
            for k in ("found", "together", "leak"):
                d[k].append(a[s][k] - b[s][k])
            kept[0] += b[s]["kept"]
            kept[1] += a[s]["kept"]
    n = len(d["found"])
    if not n:
        continue
    cells = " | ".join(f"{np.mean(d[k]):+.3f} ± {se(d[k]):.3f} ({sum(x > 0 for x in d[k])} up, "
                       f"{sum(x < 0 for x in d[k])} down)" for k in ("found", "together", "leak"))
    print(f"| {form} | {n} | {cells} | {kept[0]} → {kept[1]} of {n} |")
