"""The model: everything that touches the diffusers/transformers Flax classes or the weights.

`adapter/` (the only importer of diffusers/transformers model classes, one module per concern), `loading`
(`load_model` → `ModelBundle`), `convert` (PyTorch → Flax weights without torch), `bpe` (the tiny and toy
vocabularies), `tokens` (concept tokens and text encoding), `conditioning` (what the UNet is conditioned on: SD's
text states or SDXL's states, pooled embedding and time ids), `lora` (LoRA adapters on the frozen UNet: init,
merge, the PEFT file), `capture` (UNet with cross-attention capture), `diffusion` (VAE and forward noising),
`sampling` (guided samplers as one compiled loop).

`load_model` and `ModelBundle` are also importable from here (on first use: diffusers takes seconds to import).
"""


def __getattr__(name):
    if name in ("load_model", "ModelBundle"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'jaxconcept.model' has no attribute {name!r}")
