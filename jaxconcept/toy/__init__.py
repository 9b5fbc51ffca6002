"""Toy world: seeded scenes of coloured, patterned shapes on textured backgrounds, with exact masks and
captions (`scene`), a palette-aware image analysis that names the objects in an image (`analysis`), and the
judge of learned concepts' samples beside the words oracle (`judge`: found alone, all together, leakage);
the toy Stable Diffusion (`sd`: its architecture and vocabulary), its pre-training (`train`, run by
`launch/train_toy.py`) and quality gates (`evaluate`); the shipped weights and model card (`weights/`) and the
bundled example scene (`examples/`).

The world itself is pure numpy + Pillow, so that a tiny Stable Diffusion can be trained from scratch on it and
its samples judged without CLIP.
"""

import importlib.util
import os


def recipe_config(path: str):
    """`get_config()` of the ml_collections config file at `path`: how each toy recipe (`configs/toy_vN.py`)
    starts from the one before it."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
