"""Diagnostic: the default run's tokens and the words on `generate`'s own prompts ("a <tok>", no background phrase),
judged like the closing check, 16 samples per prompt. python docs/concepts_back/bare_prompts.py runs/toy [SEED]"""
import sys
from jaxconcept import generate
from jaxconcept.runio import runs
from jaxconcept.model import load_model
from jaxconcept.toy import judge
base = load_model("toy"); run = runs.load_run(sys.argv[1], bundle=base)
C = [judge.ToyConcept("<red_triangle>", "red", "triangle"), judge.ToyConcept("<purple_dotted_ring>", "purple", "ring", "dotted")]
tok = ["a <red_triangle>", "a <purple_dotted_ring>", "a <red_triangle> and a <purple_dotted_ring>"]
wor = ["a red triangle", "a purple dotted ring", "a red triangle and a purple dotted ring"]
measured = [{"kind": "alone", "concepts": [C[0]]}, {"kind": "alone", "concepts": [C[1]]}, {"kind": "together", "concepts": C}]
st = generate.Settings(num_images=16, steps=25, guidance=5.0, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 1234)
for name, model, prompts in (("tokens", run, tok), ("words", base, wor)):
    pics = generate.generate(model, prompts, st, progress=False)
    j = judge.judge(pics, measured, C, None, None)
    s = judge.summarize(measured, j)
    print(name, "found", {k: round(v, 2) for k, v in s["found"].items()}, "together %.2f" % s["together"],
          "leaks", {k: round(v, 2) for k, v in s["leaks"].items()}, flush=True)
