"""Pool the hard set's start modes over benchmark folders: per init (shape, random), the scenes having attention,
em and user runs; mean found alone per mode, em - attention and em - user paired per scene (mean +- SE,
`bench.fidelity.mean_se`), and the masks' em - attention (object IoU, final). Later folders win for a (seed, init,
mode) met twice.
python docs/concepts_back/pool_hard.py FIDELITY.json..."""
import json, sys
import numpy as np

from jaxconcept.bench.fidelity import mean_se

runs = {}
for path in sys.argv[1:]:
    for r in json.load(open(path))["runs"]:
        if r["set"] == "hard" and r["init"] in ("shape", "random"):
            runs[(r["init"], r["seed"], r["mode"])] = r
for init in ("shape", "random"):
    seeds = sorted({s for i, s, _ in runs if i == init and all((i, s, m) in runs for m in ("attention", "em", "user"))})
    if not seeds:
        continue
    found = {m: np.array([runs[(init, s, m)]["samples"]["tokens"]["found_mean"] for s in seeds])
             for m in ("attention", "em", "user")}
    iou = {m: np.array([runs[(init, s, m)]["iou_final"] for s in seeds]) for m in ("attention", "em")}
    d_att, d_user, d_iou = (mean_se(d) for d in (found["em"] - found["attention"], found["em"] - found["user"],
                                                  iou["em"] - iou["attention"]))
    print(f"{init}: {len(seeds)} scenes ({seeds[0]}-{seeds[-1]}); found attention {found['attention'].mean():.2f}, "
          f"em {found['em'].mean():.2f}, user {found['user'].mean():.2f}; em - attention {d_att[0]:+.3f} +- "
          f"{d_att[1]:.3f}, em - user {d_user[0]:+.3f} +- {d_user[1]:.3f}; masks em - attention "
          f"{d_iou[0]:+.3f} +- {d_iou[1]:.3f}")
