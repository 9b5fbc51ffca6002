"""Scoring generated images: `metrics` (Flax CLIP for CLIP-I/CLIP-T, concept presence, LPIPS-style diversity).
The `python -m jaxconcept.evaluate` command that uses it sits at the package top."""
