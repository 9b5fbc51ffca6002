"""Diagnostic (docs/concepts_back.md section 11): what do the learned rows do to the *other* words of a prompt?
MODE plain samples a sweep run's tokens as they are; hybrid takes the token positions' text states from the learned
rows and every other position's from the words prompt (each vector replaced by its init word), i.e. the learned
tokens without their effect on the rest of the prompt. One mode per process (the sampler is compiled once).
python docs/concepts_back/hybrid.py runs/SWEEP/VARIANT__SCENE N plain|hybrid [BACKGROUND [SEED]]
(BACKGROUND: the phrase the samples ask for, default the judge's "teal water background"; SEED: the samples' seed)"""
import sys, os, json
import numpy as np, jax.numpy as jnp
from jaxconcept.runio import runs
from jaxconcept.model import load_model, tokens as tk
from jaxconcept import generate
from jaxconcept.toy import judge
run_dir, n = sys.argv[1], int(sys.argv[2])
base = load_model("toy")
run = runs.load_run(run_dir, bundle=base)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import init_word_ids  # noqa: E402
word_ids = init_word_ids(base, run_dir)
cids = np.asarray(run.concept_ids); assert len(word_ids) == len(cids), (word_ids, cids)
tag = os.path.basename(run_dir).split("__")[1]
rec = json.load(open(f"runs/concepts_back/scenes/{tag}/concepts.json"))
toy = [judge.ToyConcept("<" + c["name"] + ">", c["color"], c["shape"], c.get("pattern", "solid"))
       for c in rec["concepts"] if c.get("kind", "object") == "object"]
src_bg = next(c["color"] for c in rec["concepts"] if c.get("kind") == "background")
settings = generate.Settings(num_images=n, steps=25, guidance=5.0, seed=int(sys.argv[5]) if len(sys.argv) > 5 else 1234)
asked = judge.Asked(toy, background=sys.argv[4]) if len(sys.argv) > 4 else judge.Asked(toy)
orig = tk.text_hidden_states
def hybrid(text_encoder, text_params, ids_BxT, concept_ids_N=None, rows_NxD=None):
    learned = orig(text_encoder, text_params, ids_BxT, concept_ids_N, rows_NxD)
    if concept_ids_N is None:
        return learned
    wids = ids_BxT
    for c, w in zip(cids, word_ids):
        wids = jnp.where(wids == c, w, wids)
    words = orig(text_encoder, text_params, wids)
    is_tok = jnp.isin(ids_BxT, jnp.asarray(cids))[..., None]
    return jnp.where(is_tok, learned, words)
words = {}
out = {}
for mode in sys.argv[3].split(","):
    tk.text_hidden_states = hybrid if mode == "hybrid" else orig
    m = judge.measure(run, base, asked, src_bg, settings, words=words)
    out[mode] = {k: m["tokens"][k] for k in ("found", "together", "leakage", "leaks")}
    print(mode, json.dumps(out[mode]), flush=True)
print("words", json.dumps({k: m["words"][k] for k in ("found", "together", "leakage", "leaks")}))
