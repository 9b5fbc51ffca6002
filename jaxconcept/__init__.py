"""jaxconcept: mask-free multi-concept personalization of Stable Diffusion in JAX/Flax.

The commands sit at the top (`train`, `generate`, `evaluate`, `export`, `show_attention`), beside the config
(`config`, `settings`) and the errors; the rest lives in subpackages by concern: `model/`, `em/`, `masks/`,
`runio/`, `parallel/`, `eval/`, `toy/`, `bench/`, `presets/`.

The modules' former top-level names still import from here (`from jaxconcept import tokens, learner, runs`),
as the notebooks and the README's Python API use them: each is imported on first use. So are `load_model`
and `ModelBundle`: importing diffusers/transformers takes seconds, and light modules (the toy scene
generator, the errors) should not pay for it.
"""

import importlib

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
