"""Silencing the libraries' noise: diffusers' Flax modules warn of their deprecation on every trace, and
transformers' CLIP tokenizer that ftfy/spacy are missing. `silence_deprecations` runs when this module is imported
(before the adapter imports diffusers) and again once the adapter's modules are imported (the libraries' handlers
exist only then)."""

from __future__ import annotations

import logging


class _DropDeprecation(logging.Filter):
    """diffusers' Flax modules log a deprecation warning on every `setup` (i.e. every trace)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("classes are deprecated" in msg and "will be removed" in msg)


_NOISY_LOGGERS = (
    "diffusers.models.attention_flax",
    "diffusers.models.unets.unet_2d_blocks_flax",
    "diffusers.models.unets.unet_2d_condition_flax",
    "diffusers.models.resnet_flax",
    "diffusers.models.vae_flax",
    "diffusers.models.embeddings_flax",
    "diffusers.models.modeling_flax_utils",
    "diffusers.schedulers.scheduling_utils_flax",
    "diffusers.schedulers.scheduling_ddpm_flax",
    "diffusers.schedulers.scheduling_ddim_flax",
    "diffusers.schedulers.scheduling_pndm_flax",
    "diffusers.schedulers.scheduling_dpmsolver_multistep_flax",
    "transformers.modeling_flax_utils",
    "transformers.models.clip.modeling_flax_clip",
)


def silence_deprecations() -> None:
    # A logger's filters only see records logged on that logger, not those propagated from children:
    # attach to each emitting module logger and to the libraries' own handlers.
    drop = _DropDeprecation()
    targets = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    for lib in ("diffusers", "transformers"):
        targets += logging.getLogger(lib).handlers
    for target in targets:
        if not any(isinstance(f, _DropDeprecation) for f in target.filters):
            target.addFilter(drop)
    # "ftfy or spacy is not installed": harmless, CLIP falls back to its BasicTokenizer.
    logging.getLogger("transformers.models.clip.tokenization_clip").setLevel(logging.ERROR)


silence_deprecations()  # on import: before the adapter imports diffusers and transformers
