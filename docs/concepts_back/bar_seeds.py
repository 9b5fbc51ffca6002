"""The shipped-model test's measure (tests/test_concepts_back.py: samples of 24 showing what their prompt names) at
run seeds 0-4 with the current recipe, to set its bar with its seed-to-seed noise.
python docs/concepts_back/bar_seeds.py [SEEDS]"""
import os, sys, tempfile, pathlib
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import test_concepts_back as t
from jaxconcept.model import load_model

toy = load_model("toy")
for seed in [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2,3,4").split(",")]:
    t.RUN_SEED = seed
    with tempfile.TemporaryDirectory() as d:
        print("seed", seed, end=": ", flush=True)
        try:
            t.test_the_bundled_scenes_concepts_come_back(toy, pathlib.Path(d))
        except AssertionError as e:
            print("FAILS:", e, flush=True)
