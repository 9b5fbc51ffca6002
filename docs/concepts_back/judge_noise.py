"""How much of "every concept kept" is the judge's own sampling noise (issue 27, section 25): each concept's true
found rate (tokens and words) drawn from its posterior given the benchmark's counts (Jeffreys prior, 16 samples), and
from those the probability that the scene truly keeps every concept (>= 0.5 x its words' rate) and that a 16-sample
judge says so. No sampling: the benchmark's own figures only.
python docs/concepts_back/judge_noise.py FIDELITY.json..."""
import json, sys, numpy as np
rng = np.random.default_rng(0)
rows = [r for p in sys.argv[1:] for r in json.load(open(p))["runs"] if r["init"]=="color+shape" and r["mode"]=="em"]
n = 16; D = 20000
kept_obs, p_true_kept, sim_kept = [], [], []
for r in rows:
    s = r["samples"]; ok_obs = True; pk = np.ones(D, bool); sim = np.ones(D, bool)
    for k, t in s["tokens"]["found"].items():
        w = s["words"]["found"][k]
        ok_obs &= t >= 0.5 * w
        # posterior draws of the true rates (Jeffreys prior), and the judge's verdict at 16 samples redrawn from them
        pt = rng.beta(t*n + .5, (1-t)*n + .5, D); pw = rng.beta(w*n + .5, (1-w)*n + .5, D)
        pk &= pt >= 0.5 * pw
        sim &= rng.binomial(n, pt) >= 0.5 * rng.binomial(n, pw)
    kept_obs.append(ok_obs); p_true_kept.append(pk.mean()); sim_kept.append(sim.mean())
    print(r["set"], r["seed"] % 1000, "kept" if ok_obs else "LOST", f"P(truly kept)={pk.mean():.2f}  P(judge says kept)={sim.mean():.2f}")
print(f"{len(rows)} scenes: observed kept {np.mean(kept_obs):.0%}; expected truly kept {np.mean(p_true_kept):.0%}; expected judged kept at 16 {np.mean(sim_kept):.0%}")
