"""Summarise sweep results.jsonl: per variant, over scenes."""
import json, sys, numpy as np
rows = [json.loads(l) for f in sys.argv[1:] for l in open(f)]
by = {}
for r in rows: by.setdefault(r["variant"], []).append(r)
def se(x): x=np.asarray(x,float); return x.std(ddof=1)/np.sqrt(len(x)) if len(x)>1 else 0
print("| variant | scenes | found alone (tokens / words) | concepts kept (>=0.5x words) | together (tokens / words) | leakage (tokens / words) | leakage - words (paired) | IoU |")
print("|---|---|---|---|---|---|---|---|")
for v, rs in by.items():
    ft = [r["tokens"]["found_mean"] for r in rs]; fw = [r["words"]["found_mean"] for r in rs]
    kept = [all(r["tokens"]["found"][t] >= 0.5 * r["words"]["found"][t] for t in r["tokens"]["found"]) for r in rs]
    tt = [r["tokens"]["together"] for r in rs]; tw = [r["words"]["together"] for r in rs]
    lt = [r["tokens"]["leakage"] for r in rs]; lw = [r["words"]["leakage"] for r in rs]
    iou = [r["iou"] for r in rs]
    print(f"| {v} | {len(rs)} | {np.mean(ft):.2f}±{se(ft):.2f} / {np.mean(fw):.2f} (x{np.mean(ft)/max(np.mean(fw),1e-9):.2f}) | {np.mean(kept):.0%} | "
          f"{np.mean(tt):.2f}±{se(tt):.2f} / {np.mean(tw):.2f} (x{np.mean(tt)/max(np.mean(tw),1e-9):.2f}) | {np.mean(lt):.2f}±{se(lt):.2f} / {np.mean(lw):.2f} | {np.mean(np.subtract(lt, lw)):+.2f}±{se(np.subtract(lt, lw)):.2f} | {np.mean(iou):.2f} |")
