"""jaxconcept: mask-free multi-concept personalization of Stable Diffusion in JAX/Flax."""

from .errors import ConceptTokenError, JaxconceptError, ModelSourceError, PromptError, ShardingError
from .model import ModelBundle, load_model

__all__ = [
    "ConceptTokenError", "JaxconceptError", "ModelBundle", "ModelSourceError", "PromptError", "ShardingError",
    "load_model",
]
