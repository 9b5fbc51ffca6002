"""jaxconcept: mask-free multi-concept personalization of Stable Diffusion in JAX/Flax.

`load_model` and `ModelBundle` are imported on first use: importing diffusers/transformers takes
seconds, and light modules (the toy scene generator, the errors) should not pay for it.
"""

from .errors import ConceptTokenError, JaxconceptError, ModelSourceError, PromptError, ShardingError

__all__ = [
    "ConceptTokenError", "JaxconceptError", "ModelBundle", "ModelSourceError", "PromptError", "ShardingError",
    "load_model",
]


def __getattr__(name):
    if name in ("load_model", "ModelBundle"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'jaxconcept' has no attribute {name!r}")
