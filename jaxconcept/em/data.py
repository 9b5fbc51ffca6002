"""Training data of one personalisation run, kept on device, and the per-step draw (docs/method.md §2).

Everything a step needs is precomputed once on the host into small arrays:
- latents per image and per flip (the VAE runs once); optionally zoomed views of each image (`zoom_windows`:
  random square crops resized back, encoded once, their masks cropped alike each round) and a bank of plain
  backgrounds' latents, which `swap_background` puts behind the named concepts;
- a *prompt table*: for every image, every ordered subset of its concepts ("union sampling"), the
  tokenized prompt "a photo of <v2> and <v1>", the prompt position of each concept (-1 where absent), and
  a draw weight such that images are equally likely, then the number of concepts k is uniform in 1..N,
  then every ordered subset of size k is equally likely.
`draw_batch` is pure and runs inside the jitted step, so drawing costs no host round trip and the step
never retraces (masks are arguments: the E-step replaces them between blocks of steps).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import JaxconceptError
from ..model import diffusion, tokens
from . import losses

TEMPLATE = "a photo of {}"
JOINER = " and "
# ordered subsets grow as K!; beyond this many concepts per image, subsets are drawn without ordering
MAX_ORDERED = 5
# and unordered ones as 2^K: 10 concepts make 1,023 prompts (~2.5 s to tokenize), 14 make 16,383 (~50 s), 20 over
# a million (minutes, before any output): more concepts per image are refused
MAX_CONCEPTS_PER_IMAGE = 10


def check_concepts_per_image(n: int, image: str = "an image") -> None:
    """A JaxconceptError when one image (`image`: its description, "image 'a.png'") has more concepts than the
    prompt table takes (MAX_CONCEPTS_PER_IMAGE)."""
    if n > MAX_CONCEPTS_PER_IMAGE:
        raise JaxconceptError(
            f"{image} has {n} concepts; at most {MAX_CONCEPTS_PER_IMAGE} per image can be learned together "
            f"(union sampling trains on every subset of an image's concepts: {num_prompts([n]):,} prompts for {n}). "
            "Learn fewer concepts per image: merge the minor ones into a background concept, or split them over "
            "several runs.")


@dataclasses.dataclass(frozen=True)
class PromptTable:
    """P prompts: ids P x T, positions P x C (-1: concept absent), image P, weight P (sums to 1)."""

    ids_PxT: np.ndarray
    positions_PxC: np.ndarray
    image_P: np.ndarray
    weight_P: np.ndarray
    texts: tuple[str, ...]


def concept_prompt(concept_tokens, template: str = TEMPLATE, joiner: str = JOINER) -> str:
    return template.format(joiner.join(concept_tokens))


def prompt_table(tokenizer, concept_tokens, owner_C, concept_ids, max_length: int,
                 template: str = TEMPLATE, joiner: str = JOINER) -> PromptTable:
    """All union-sampling prompts of the run (see the module docstring)."""
    owner_C = np.asarray(owner_C)
    n_images = int(owner_C.max()) + 1
    texts, positions, images, weights = [], [], [], []
    for i in range(n_images):
        mine = [c for c in range(len(owner_C)) if owner_C[c] == i]
        if not mine:
            raise JaxconceptError(f"image {i} has no concepts: give each image at least one concept.")
        check_concepts_per_image(len(mine), f"image {i}")
        for k in range(1, len(mine) + 1):
            subsets = (list(itertools.permutations(mine, k)) if len(mine) <= MAX_ORDERED
                       else list(itertools.combinations(mine, k)))
            for subset in subsets:
                texts.append(concept_prompt([concept_tokens[c] for c in subset], template, joiner))
                images.append(i)
                weights.append(1.0 / n_images / len(mine) / len(subsets))
    ids = tokens.tokenize(tokenizer, texts, max_length)
    for ids_T in ids:
        positions.append(tokens.token_positions(ids_T, concept_ids))
    return PromptTable(ids, np.asarray(positions, np.int32), np.asarray(images, np.int32),
                       np.asarray(weights, np.float64) / np.sum(weights), tuple(texts))


def vector_positions(ids_BxT, vector_ids_CxV):
    """(positions B x C x V, in-prompt B x C x V as float 0/1): where each concept's v-th vector sits in each prompt
    (0 where absent; `vector_ids_CxV`, `tokens.Concepts.ids_CxV`, is -1 past a concept's last vector)."""
    hit_BxCxVxT = ids_BxT[:, None, None, :] == vector_ids_CxV[None, :, :, None]
    present_BxCxV = jnp.any(hit_BxCxVxT, axis=-1) & (vector_ids_CxV >= 0)[None]
    return jnp.argmax(hit_BxCxVxT, axis=-1).astype(jnp.int32), present_BxCxV.astype(jnp.float32)


def image_prompts(tokenizer, concept_tokens, owner_C, concept_ids, max_length: int,
                  template: str = TEMPLATE, joiner: str = JOINER) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the prompt naming all its concepts (for mask estimation): ids I x T, positions I x C."""
    owner_C = np.asarray(owner_C)
    texts = [concept_prompt([t for t, o in zip(concept_tokens, owner_C) if o == i], template, joiner)
             for i in range(int(owner_C.max()) + 1)]
    ids = tokens.tokenize(tokenizer, texts, max_length)
    return ids, np.asarray([tokens.token_positions(x, concept_ids) for x in ids], np.int32)


def context_prompts(concept_tokens, owner_C, object_C, phrases, template: str = TEMPLATE,
                    joiner: str = JOINER) -> list[str]:
    """The context regulariser's prompts: per image, each object concept alone and all its objects together, each
    followed by each phrase ("a <ring> on a pink sand background"). Background concepts are left out: a phrase
    replaces them. Empty without phrases or objects."""
    owner_C, texts = np.asarray(owner_C), []
    for i in range(int(owner_C.max()) + 1 if len(owner_C) else 0):
        mine = [concept_tokens[c] for c in range(len(owner_C)) if owner_C[c] == i and object_C[c]]
        groups = [[t] for t in mine] + ([mine] if len(mine) > 1 else [])
        texts += [f"{concept_prompt(g, template, joiner)} {phrase}" for g in groups for phrase in phrases]
    return texts


def encode_with_flips(vae, vae_params, images_IxHxWx3, latent_scale: float, batch: int = 8):
    """Scaled posterior-mean latents N x 2 x C x h x w (index 1: the horizontally flipped image)."""
    encode = jax.jit(lambda p, x: diffusion.encode_images(vae, p, x)[0])
    both = np.concatenate([images_IxHxWx3, images_IxHxWx3[:, :, ::-1]])
    out = np.concatenate([np.asarray(encode(vae_params, jnp.asarray(both[i:i + batch])))
                          for i in range(0, len(both), batch)])
    n = len(images_IxHxWx3)
    return np.stack([out[:n], out[n:]], axis=1) * latent_scale


def table_arrays(table: PromptTable) -> dict:
    """The prompt table as device arrays (what `draw_batch` reads)."""
    return {"ids_PxT": jnp.asarray(table.ids_PxT), "positions_PxC": jnp.asarray(table.positions_PxC),
            "image_P": jnp.asarray(table.image_P), "logw_P": jnp.asarray(np.log(table.weight_P), jnp.float32)}


def logw_without(table: PromptTable, excluded_C) -> np.ndarray:
    """log draw weights P with every prompt naming an excluded concept (a background) taken out; the weights of the
    other prompts renormalised. Unchanged when that would leave nothing to draw."""
    named_PxC = table.positions_PxC >= 0
    drop_P = np.any(named_PxC & np.asarray(excluded_C, bool)[None], axis=1)
    if drop_P.all():
        return np.log(table.weight_P).astype(np.float32)
    w_P = np.where(drop_P, 0.0, table.weight_P)
    with np.errstate(divide="ignore"):
        return np.log(w_P / w_P.sum()).astype(np.float32)


def draw_batch(key, table: dict, latents, masks, batch_size: int, flip_prob: float = 0.5):
    """One step's instance batch: prompt ids B x T, concept positions B x C, latents B x Z x h x w, and the
    concept masks B x C x h x w flipped with their image.

    latents I x 2 x Z x h x w with masks C x h x w; or, with zoomed views (`zoom_windows`), I x V x 2 x Z x h x w
    with masks V x C x h x w (view 0: the image itself), every view as likely."""
    k_p, k_f = jax.random.split(key)
    p_B = jax.random.categorical(k_p, table["logw_P"], shape=(batch_size,))
    flip_B = (jax.random.uniform(k_f, (batch_size,)) < flip_prob).astype(jnp.int32)
    image_B = table["image_P"][p_B]
    if latents.ndim == 6:  # a key of its own: runs without views draw what they always drew
        view_B = jax.random.randint(jax.random.fold_in(k_f, 1), (batch_size,), 0, latents.shape[1])
        latents, masks_BxCxhxw = latents[image_B, view_B, flip_B], masks[view_B]
    else:
        view_B = jnp.zeros_like(flip_B)
        latents, masks_BxCxhxw = latents[image_B, flip_B], jnp.broadcast_to(masks[None], (batch_size,) + masks.shape)
    masks = jnp.where(flip_B[:, None, None, None] == 1, masks_BxCxhxw[..., ::-1], masks_BxCxhxw)
    return {"ids": table["ids_PxT"][p_B], "positions": table["positions_PxC"][p_B], "latents": latents,
            "masks": masks, "image": image_B, "flip": flip_B, "view": view_B}


def zoom_windows(n: int, min_side: float, seed: int) -> np.ndarray:
    """(1 + n) x 3 square crop windows (top, left, side) as fractions of the image's side; row 0 is the whole image.
    Each side is uniform in [min_side, 1), its place uniform within the image.

    Why: the token stage sees each object at one size and place only; its rows learn that layout along with the
    object (the scene's second object comes back beside it in single-concept samples) and the object's outline at
    one latent resolution only (thin crosses and patterns drawn blurred). The crops show it larger and elsewhere."""
    rng = np.random.default_rng([seed, 0x200])
    side = rng.uniform(min_side, 1.0, n)
    top, left = rng.uniform(0.0, 1.0, n) * (1 - side), rng.uniform(0.0, 1.0, n) * (1 - side)
    return np.concatenate([[[0.0, 0.0, 1.0]], np.stack([top, left, side], axis=1)]).astype(np.float64)


def zoom(x_NxHxWxc, window, method: str = "linear") -> np.ndarray:
    """The crop `window` (top, left, side; fractions) of each picture, resized back to H x W: "linear" for
    images, "nearest" for masks (floats 0/1)."""
    n, h, w, c = x_NxHxWxc.shape
    top, left, side = window
    if side >= 1.0:  # the whole image (view 0): nothing to cut or resize
        return np.asarray(x_NxHxWxc, np.float32)
    r0, c0 = int(round(top * h)), int(round(left * w))
    ch, cw = max(1, int(round(side * h))), max(1, int(round(side * w)))
    crop = jnp.asarray(x_NxHxWxc[:, r0:r0 + ch, c0:c0 + cw], jnp.float32)
    return np.asarray(jax.image.resize(crop, (n, h, w, c), method=method, antialias=False))


def zoomed_views(images_IxHxWx3, windows) -> np.ndarray:
    """I x V x H x W x 3: each image in each window (`zoom_windows`)."""
    return np.stack([zoom(images_IxHxWx3, wdw) for wdw in windows], axis=1)


def zoomed_masks(masks_CxHxW, windows) -> np.ndarray:
    """V x C x H x W float32: the masks in each window, cut as their images are (nearest)."""
    m_CxHxWx1 = np.asarray(masks_CxHxW, np.float32)[..., None]
    return np.stack([zoom(m_CxHxWx1, wdw, "nearest")[..., 0] for wdw in windows])


def background_bank(n: int, size_hw: tuple[int, int], seed: int) -> np.ndarray:
    """n plain backgrounds N x H x W x 3 in [-1, 1]: a random colour under a smooth random shading (x0.8-1.2,
    a 4 x 4 grid of tones bilinearly upsampled), the kind of picture `swap_background` puts behind the objects."""
    rng = np.random.default_rng(seed)
    h, w = size_hw
    colour_Nx3 = rng.uniform(0.1, 0.9, (n, 3))
    grid_Nx4x4 = rng.uniform(0.8, 1.2, (n, 4, 4))
    rows, cols = np.linspace(0, 3, h), np.linspace(0, 3, w)
    r0, c0 = np.minimum(rows.astype(int), 2), np.minimum(cols.astype(int), 2)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    g = grid_Nx4x4
    shade_NxHxW = (g[:, r0][:, :, c0] * (1 - fr) * (1 - fc) + g[:, r0 + 1][:, :, c0] * fr * (1 - fc)
                   + g[:, r0][:, :, c0 + 1] * (1 - fr) * fc + g[:, r0 + 1][:, :, c0 + 1] * fr * fc)
    pictures = np.clip(colour_Nx3[:, None, None, :] * shade_NxHxW[..., None], 0.0, 1.0)
    return (pictures * 2.0 - 1.0).astype(np.float32)


def swap_background(key, latents_BxZxhxw, masks_BxCxhxw, positions_BxC, background_C, bank_NxZxhxw, prob: float):
    """The batch's latents with, in each instance whose prompt names no background concept, everything outside
    its named concepts' masks replaced by a bank background, with probability `prob` per instance.

    Why: an object token only ever sees its object on the source background; the masked loss reads the object's
    cells, but those cells' prediction leans on their surroundings, so the token learns the surroundings too and
    draws the source background where another is asked. Prompts that name the background keep the source image:
    its token has to learn it."""
    k_use, k_pick = jax.random.split(key)
    b = latents_BxZxhxw.shape[0]
    named_BxC = positions_BxC >= 0
    names_background_B = jnp.any(named_BxC & background_C[None, :], axis=1)
    use_B = (jax.random.uniform(k_use, (b,)) < prob) & ~names_background_B
    keep_Bx1xhxw = losses.union_mask(masks_BxCxhxw, named_BxC)
    keep_Bx1xhxw = jnp.where(use_B[:, None, None, None], keep_Bx1xhxw, 1.0).astype(latents_BxZxhxw.dtype)
    other_BxZxhxw = bank_NxZxhxw[jax.random.randint(k_pick, (b,), 0, bank_NxZxhxw.shape[0])]
    return keep_Bx1xhxw * latents_BxZxhxw + (1 - keep_Bx1xhxw) * other_BxZxhxw.astype(latents_BxZxhxw.dtype)


def area_resize(masks_xHxW, out_hw: tuple[int, int]):
    """The mean of each output cell's pixels (the image side a multiple of the output's, as an image and its
    latents are): a cell on an object's edge weighs what it holds of the object."""
    h, w = masks_xHxW.shape[-2:]
    fh, fw = h // out_hw[0], w // out_hw[1]
    if (fh * out_hw[0], fw * out_hw[1]) != (h, w):
        raise ValueError(f"area_resize needs a whole number of pixels per cell: {(h, w)} -> {tuple(out_hw)}")
    blocks = masks_xHxW.reshape(masks_xHxW.shape[:-2] + (out_hw[0], fh, out_hw[1], fw))
    return blocks.mean(axis=(-3, -1))


def nearest_resize(masks_xHxW, out_hw: tuple[int, int]):
    """Nearest-neighbour resize of the last two axes (Break-a-Scene downsamples masks this way)."""
    h, w = masks_xHxW.shape[-2:]
    rows = (jnp.arange(out_hw[0]) * h) // out_hw[0]
    cols = (jnp.arange(out_hw[1]) * w) // out_hw[1]
    return masks_xHxW[..., rows[:, None], cols[None, :]]


def num_prompts(concepts_per_image) -> int:
    """How many prompts `prompt_table` makes (for messages and tests)."""
    total = 0
    for n in concepts_per_image:
        for k in range(1, n + 1):
            total += math.perm(n, k) if n <= MAX_ORDERED else math.comb(n, k)
    return total
