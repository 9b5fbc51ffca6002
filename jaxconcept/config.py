"""Default configuration of the concept learner: the toy model and the bundled toy scene.

    python -m jaxconcept.train                                   # this config, every stage, on the toy scene
    python -m jaxconcept.train --config.mode=attention --out runs/attention_baseline
    python -m jaxconcept.train --concepts "dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background" \\
        --config.model=stabilityai/stable-diffusion-2-1-base

Every field can be overridden with --config.<field>=<value>; `configs/` holds variants. The fields, their
defaults, checks and meaning are declared once, in `jaxconcept/settings.py`; why the defaults are what they
are is in docs/config_notes.md.
"""

import ml_collections

from jaxconcept import settings  # absolute: absl loads this file as a config file, outside the package


def get_config() -> ml_collections.ConfigDict:
    return settings.default_config()
