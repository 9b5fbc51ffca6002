"""jaxconcept: mask-free multi-concept personalization of Stable Diffusion in JAX/Flax.

The commands sit at the top (`train`, `generate`, `evaluate`, `export`, `show_attention`), beside the config
(`config`, `settings`) and the errors; the rest lives in subpackages by concern: `model/`, `em/`, `masks/`,
`runio/`, `parallel/`, `eval/`, `toy/`, `bench/`, `presets/`.

The modules' former top-level names still import from here (`from jaxconcept import tokens, learner, runs`),
as the notebooks and the README's Python API use them: each is imported on first use. So are `load_model`
and `ModelBundle`: importing diffusers/transformers takes seconds, and light modules (the toy scene
generator, the errors) should not pay for it.

Shape letters. Arrays in the math code are named with their shape, axes joined by `x` (`probs_BxAxQxT`,
`masks_CxHxW`, `rows_NxD`); the letters mean the same everywhere:

    B  batch                                  P  prompts
    C  concepts of a run (all its images)     K  concepts of one image (a subset of C)
    I  images of a run                        J  jobs (concept sets learned in one program)
    N  learned rows (vectors: 1+ per token)   D  text embedding width
    V  vocabulary                             T  prompt tokens (the text length)
    A  attention heads                        Q  attention queries (the cells of a layer's grid)
    Z  latent channels                        E  timesteps drawn by an E-step
    R  EM rounds                              S  samples per prompt
    F  features (a layer's hidden channels)   g x g  the attention loss's grid (`tokens.attn_resolution`)
    h x w  the latent grid                    H x W  the image grid (masks, images); 3: RGB

The DenseCRF modules (`masks/crf.py`, `masks/crf_exact.py`) write mean-field algebra in its own letters,
defined in `crf_exact`'s docstring: L labels (K + 1), N pixels, B a block of pixel rows, F features.
"""

import importlib
import os
import sys

# The commands never use PyTorch, but diffusers imports it whenever it is installed (Colab and most GPU images
# have it): 4 s of every command's start on a 2-core machine (11 s -> 7 s to a bad-input error). A command
# started with `python -m` skips it; imported from Python (notebooks, the benchmarks' PyTorch reference) nothing
# changes. JAXCONCEPT_IMPORT_TORCH=1 keeps the import.
TORCH_FREE_COMMANDS = ("train", "generate", "evaluate", "export", "show_attention")


def _started_as_a_torch_free_command(orig_argv) -> bool:
    if "-m" not in orig_argv[:-1]:
        return False
    return orig_argv[orig_argv.index("-m") + 1] in {f"{__name__}.{c}" for c in TORCH_FREE_COMMANDS}


if ("torch" not in sys.modules and _started_as_a_torch_free_command(getattr(sys, "orig_argv", []))
        and os.environ.get("JAXCONCEPT_IMPORT_TORCH") != "1"):
    sys.modules["torch"] = None  # `import torch` raises ImportError: diffusers and transformers go on without it

from .errors import ConceptTokenError, JaxconceptError, ModelSourceError, PromptError, ShardingError

__all__ = [
    "ConceptTokenError", "JaxconceptError", "ModelBundle", "ModelSourceError", "PromptError", "ShardingError",
    "load_model",
]

# a former top-level module name -> where the module lives now
_MOVED = {
    "adapter": "model.adapter", "convert": "model.convert", "bpe": "model.bpe", "tokens": "model.tokens",
    "capture": "model.capture", "diffusion": "model.diffusion", "sampling": "model.sampling",
    "learner": "em.learner", "jobs": "em.jobs", "steps": "em.steps", "losses": "em.losses", "data": "em.data",
    "aggregate": "masks.aggregate", "estep": "masks.estep", "settle": "masks.settle", "crf": "masks.crf",
    "crf_exact": "masks.crf_exact",
    "inputs": "runio.inputs", "images": "runio.images", "runfolder": "runio.runfolder",
    "outputs": "runio.outputs", "runs": "runio.runs", "checkpoints": "runio.checkpoints", "viz": "runio.viz",
    "sharding": "parallel.sharding", "distributed": "parallel.distributed",
    "metrics": "eval.metrics",
}


def __getattr__(name):
    if name in ("load_model", "ModelBundle"):
        from .model import loading

        return getattr(loading, name)
    if name in _MOVED:
        return importlib.import_module(f"{__name__}.{_MOVED[name]}")
    raise AttributeError(f"module 'jaxconcept' has no attribute {name!r}")
