"""Pool fidelity benchmark runs over several evaluation folders (colour+shape, mode em): per prompt form, the
benchmark's own figures over all their scenes (`bench.fidelity.samples_figures`: found / words, every concept kept,
together / words), leakage - words paired per scene (mean +- SE), and the lost concepts.
python docs/concepts_back/pool.py FIDELITY.json..."""
import json, sys

from jaxconcept.bench.fidelity import mean_se, samples_figures


def rows(paths):
    for p in paths:
        for r in json.load(open(p))["runs"]:
            if r["init"] == "color+shape" and r["mode"] == "em":
                yield r


def summary(rs, key):
    f = samples_figures(rs, key)
    found, found_w = f["found_mean_tokens"][0], f["found_mean_words"][0]
    tog, tog_w = f["together_tokens"][0], f["together_words"][0]
    leak, leak_se = mean_se([r[key]["tokens"]["leakage"] - r[key]["words"]["leakage"] for r in rs])
    lost = [f"{r['set']} {r['seed'] % 1000} {k}" for r in rs for k, v in r[key]["tokens"]["found"].items()
            if v < 0.5 * r[key]["words"]["found"][k]]
    return (f"{f['scenes']} scenes: found {found:.2f} / {found_w:.2f} (x{found / found_w:.2f}), kept {f['kept']:.0%}, "
            f"together {tog:.2f} / {tog_w:.2f} (x{tog / tog_w:.2f}), leakage - words {leak:+.3f} +- {leak_se:.3f}; "
            f"lost: {', '.join(lost) or 'none'}")


if __name__ == "__main__":
    rs = list(rows(sys.argv[1:]))
    print("new background:", summary(rs, "samples"))
    bare = [r for r in rs if r.get("samples_bare")]
    if bare:
        print("bare prompts:  ", summary(bare, "samples_bare"))
