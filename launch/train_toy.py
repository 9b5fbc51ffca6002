"""Pre-train the toy Stable Diffusion (see configs/toy_pretrain.py for the command lines)."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxconcept.errors import JaxconceptError
from jaxconcept.toy import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy_pretrain.py", "toy pre-training config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/toy_pretrain", "run folder (resumes if it has checkpoints)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs its whole configuration at INFO
    try:
        train.train(_CONFIG.value, _WORKDIR.value)
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
