"""The EM learner on the toy model and its bundled held-out scene (what `python -m jaxconcept.train` runs).

    python -m jaxconcept.train --config configs/em_toy.py --out runs/em_toy
    python -m jaxconcept.train --config configs/em_toy.py --config.mode=attention --out runs/attention_toy
"""

from jaxconcept.config import get_config  # noqa: F401  (the package default is this config)
