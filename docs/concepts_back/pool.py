"""Pool fidelity benchmark runs over several evaluation folders (colour+shape, mode em): per prompt form, the means
over scenes of found / words, every concept kept (each >= 0.5 x its words' rate), together / words, leakage - words
(mean +- SE over scenes), and the lost concepts.
python docs/concepts_back/pool.py FIDELITY.json..."""
import json, sys
import numpy as np


def rows(paths):
    for p in paths:
        for r in json.load(open(p))["runs"]:
            if r["init"] == "color+shape" and r["mode"] == "em":
                yield r


def summary(rs, key):
    t = [r[key]["tokens"] for r in rs]
    w = [r[key]["words"] for r in rs]
    found, found_w = np.mean([x["found_mean"] for x in t]), np.mean([x["found_mean"] for x in w])
    tog, tog_w = np.mean([x["together"] for x in t]), np.mean([x["together"] for x in w])
    leak = np.array([a["leakage"] - b["leakage"] for a, b in zip(t, w)])
    lost = [f"{r['set']} {r['seed'] % 1000} {k}" for r, a, b in zip(rs, t, w) for k in a["found"]
            if a["found"][k] < 0.5 * b["found"][k]]
    kept = 1 - len({x.rsplit(" ", 1)[0] for x in lost}) / len(rs)
    return (f"{len(rs)} scenes: found {found:.2f} / {found_w:.2f} (x{found / found_w:.2f}), kept {kept:.0%}, "
            f"together {tog:.2f} / {tog_w:.2f} (x{tog / tog_w:.2f}), leakage - words {leak.mean():+.3f} +- "
            f"{leak.std(ddof=1) / np.sqrt(len(leak)):.3f}; lost: {', '.join(lost) or 'none'}")


if __name__ == "__main__":
    rs = list(rows(sys.argv[1:]))
    print("new background:", summary(rs, "samples"))
    bare = [r for r in rs if "samples_bare" in r]
    if bare:
        print("bare prompts:  ", summary(bare, "samples_bare"))
