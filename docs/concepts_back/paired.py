"""Paired differences from a reference variant, scene by scene (mean +- SE over scenes; scenes better / worse).
python docs/concepts_back/paired.py REF results.jsonl [more.jsonl ...]"""
import json, sys
import numpy as np

ref, files = sys.argv[1], sys.argv[2:]
rows = [json.loads(line) for f in files for line in open(f)]
by = {}
for r in rows:
    by.setdefault(r["variant"], {})[r["scene"]] = r
measures = {"found": lambda r: r["tokens"]["found_mean"], "together": lambda r: r["tokens"]["together"],
            "leakage": lambda r: r["tokens"]["leakage"],
            "min found / words": lambda r: min(r["tokens"]["found"][t] / max(r["words"]["found"][t], 1e-9)
                                               for t in r["tokens"]["found"])}
for v, scenes in by.items():
    if v == ref:
        continue
    common = [s for s in scenes if s in by[ref]]
    parts = []
    for name, f in measures.items():
        d = np.array([f(scenes[s]) - f(by[ref][s]) for s in common])
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        parts.append(f"{name} {d.mean():+.2f}±{se:.2f} ({(d > 0).sum()} up, {(d < 0).sum()} down)")
    print(f"{v} vs {ref} over {len(common)} scenes: " + "; ".join(parts))
