"""Toy world: seeded scenes of coloured, patterned shapes on textured backgrounds, with exact masks and
captions (`scene`), and a palette-aware image analysis that names the objects in an image (`analysis`).

Pure numpy + Pillow, so that a tiny Stable Diffusion can be trained from scratch on it and its samples
judged without CLIP.
"""
