"""Summary per prompt form of sweep and wise results: for each form ("teal": the judge's background, "new": the
benchmark's own new background for the scene, "bare": no background phrase) and variant (the bundled scene left
out: diagnosis only), the means over scenes of
found alone / words, every concept kept (each >= 0.5 x its words' rate), together / words, leakage - words, and
paired differences (found, together, leakage) against the reference variant on the scenes both have.
wise.py's rows become variants "wise<s>", and s = 1 (the run as trained) "base".
python docs/concepts_back/forms.py REFERENCE RESULTS.jsonl...   (REFERENCE: e.g. base)"""
import collections, json, sys
import numpy as np

def rows_of(path):
    for line in open(path):
        r = json.loads(line)
        if "scale" in r:  # wise.py
            yield ("base" if r["scale"] == 1.0 else f"wise{r['scale']}", r["scene"].replace("_", ":"),
                   {f: r[f] for f in ("new", "bare")})
        else:  # sweep.py
            forms = {"teal": {"tokens": r["tokens"], "words": r["words"]}}
            forms.update({f: r[f] for f in ("new", "bare") if r.get(f)})
            yield r["variant"], r["scene"], forms

def measures(m):
    t, w = m["tokens"], m["words"]
    kept = all(t["found"][k] >= 0.5 * w["found"][k] for k in t["found"])
    return {"found": t["found_mean"], "found_w": w["found_mean"], "kept": kept, "together": t["together"],
            "together_w": w["together"], "leak": t["leakage"] - w["leakage"]}

def ratio(a, b):
    return f"×{a / b:.2f}" if b > 0 else "words 0"

def se(x):
    x = np.asarray(x, float)
    return x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0

if __name__ == "__main__":
    ref = sys.argv[1]
    table = collections.defaultdict(dict)  # (form, variant) -> scene -> measures
    for path in sys.argv[2:]:
        for variant, scene, forms in rows_of(path):
            if scene == "default":  # the bundled scene is diagnosis only
                continue
            for form, m in forms.items():
                table[(form, variant)][scene] = measures(m)
    for form in ("teal", "new", "bare"):
        variants = [v for f, v in table if f == form]
        if not variants:
            continue
        print(f"\n{form}:\n| variant | scenes | found / words | kept | together / words | leakage - words | "
              f"vs {ref}: found | together | leakage |\n|---|---|---|---|---|---|---|---|---|")
        for v in variants:
            rows = table[(form, v)]
            m = {k: np.array([r[k] for r in rows.values()], float) for k in next(iter(rows.values()))}
            base = table.get((form, ref), {})
            both = [s for s in rows if s in base]
            d = {k: np.array([rows[s][k] - base[s][k] for s in both]) for k in ("found", "together", "leak")}
            paired = " | ".join(f"{d[k].mean():+.3f} ± {se(d[k]):.3f}" for k in ("found", "together", "leak")) \
                if both and v != ref else " | | "
            print(f"| {v} | {len(rows)} | {m['found'].mean():.2f} / {m['found_w'].mean():.2f} "
                  f"(×{m['found'].mean() / m['found_w'].mean():.2f}) | {m['kept'].mean():.0%} | "
                  f"{m['together'].mean():.2f} / {m['together_w'].mean():.2f} "
                  f"({ratio(m['together'].mean(), m['together_w'].mean())}) | "
                  f"{m['leak'].mean():+.3f} ± {se(m['leak']):.3f} | {paired} |")
