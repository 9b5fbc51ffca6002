"""bench.fidelity with config changes on top of the recipe (section 21: the recipe without min-SNR, paired on the same
evaluation scenes): python docs/concepts_back/fidelity_with.py KEY=VALUE[,KEY=VALUE] -- BENCH.FIDELITY ARGS..."""
import sys
from jaxconcept.bench import fidelity

changes = dict(kv.split("=") for kv in sys.argv[1].split(","))
plain = fidelity.run_config


def run_config(*a, **k):
    cfg = plain(*a, **k)
    for key, value in changes.items():
        node, *path, last = [cfg] + key.split(".")
        for p in path:
            node = node[p]
        node[last] = type(node[last])(value)
    return cfg


fidelity.run_config = run_config
sys.exit(fidelity.main(sys.argv[3:]))
