"""Files a learning run writes (side effects only; the learner decides what and when).

    RUN/config.json                      the resolved config
    RUN/images/<image>.png               each input as the model saw it (cropped, resized)
    RUN/masks/round_NN/<image>__<token>.png, RUN/masks/final/...   0/255 at image resolution
    RUN/overlays/<image>.png             final masks in colour over the image
    RUN/masks_evolution.png              rows: images; columns: rounds, then a colour key
    RUN/concepts.safetensors             one embedding row per token, named by the token
    RUN/unet/                            the tuned UNet (diffusers Flax folder), after joint tuning
    RUN/lora.safetensors                 instead of unet/ when the joint stage tuned LoRA adapters (PEFT layout)
    RUN/metrics.jsonl, RUN/summary.json
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save as safetensors_bytes

from . import images, viz
from .inputs import safe_name  # noqa: F401  (file names of tokens: outputs.safe_name)
from ..errors import JaxconceptError
from ..model import lora

LORA_FILE = "lora.safetensors"

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


def file_names(tokens) -> list[str]:
    """One file name per token: its `safe_name` (training refuses tokens whose names collide, see
    `inputs.validate`); a repeated one, which only older runs can hold, gets a suffix."""
    out, seen = [], {}
    for t in tokens:
        base = safe_name(t)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}_{n + 1}")
    return out


def check_writable(folder: str) -> None:
    """Fail early, before any work, if the run folder cannot be written."""
    if "://" in folder:  # os would quietly make a local folder named "gs:"
        raise JaxconceptError(f"output folder {folder!r} is a URL; files are written with the local file system: "
                              "mount the bucket (e.g. gcsfuse) and pass the mounted path to --out.")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_{os.getpid()}")  # several processes may check at once
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise JaxconceptError(f"cannot write to the output folder {folder!r} ({e.strerror}); "
                              "choose another with --out.") from e


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # never a half-written file


def save_masks(folder: str, image_names, token_names, owner_C, masks_CxHxW) -> None:
    os.makedirs(folder, exist_ok=True)
    for c, mask in enumerate(np.asarray(masks_CxHxW, bool)):
        name = f"{image_names[owner_C[c]]}__{token_names[c]}.png"
        images.save_image(mask.astype(np.uint8) * 255, os.path.join(folder, name))


def load_masks(folder: str, image_names, token_names, owner_C) -> np.ndarray:
    """The C x H x W bool masks `save_masks` wrote."""
    from PIL import Image

    out = []
    for c, token in enumerate(token_names):
        with Image.open(os.path.join(folder, f"{image_names[owner_C[c]]}__{token}.png")) as img:
            out.append(np.asarray(img.convert("L")) > 127)
    return np.stack(out)


def mask_color(k: int) -> np.ndarray:
    """The colour of an image's k-th mask in overlays and in their key."""
    return PALETTE[k % len(PALETTE)]


def color_overlay(image_u8_HxWx3, masks_KxHxW, alpha: float = 0.5) -> np.ndarray:
    """The image, in grey, with each mask tinted in its own colour: blended over the image's own colours a tint
    takes their hue (the ring's green over a purple ring reads grey), over its luminance it keeps its own."""
    luma_HxW = image_u8_HxWx3.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    out = np.repeat(luma_HxW[..., None], 3, axis=-1)
    for k, mask in enumerate(np.asarray(masks_KxHxW, bool)):
        out[mask] = (1 - alpha) * out[mask] + alpha * mask_color(k)
    return np.clip(out, 0, 255).astype(np.uint8)


def evolution_picture(images_u8, owner_C, rounds: list[np.ndarray], tokens, cell: int = 128) -> np.ndarray:
    """Rows: images; columns: the image, the masks (colour overlay) after every round, then a key naming
    each colour's concept."""
    owner_C = np.asarray(owner_C)
    tiles, labels = [], []
    for i, image in enumerate(images_u8):
        mine = np.flatnonzero(owner_C == i)
        key = viz.key_tile([tokens[c] for c in mine], [mask_color(k) for k in range(len(mine))], cell)
        tiles.append([image] + [color_overlay(image, r[mine]) for r in rounds] + [key])
        labels.append([f"image {i}"] + [f"round {k}" for k in range(len(rounds))] + ["colours"])
    return viz.grid(tiles, labels, cell=cell)


def token_tensors(tokens, rows_NxD, counts=None) -> dict[str, np.ndarray]:
    """token -> its embedding: a D row, or n x D for a token of n vectors (`counts`; none: one each), as
    diffusers' (multi-vector) textual-inversion files hold them."""
    rows_NxD = np.asarray(rows_NxD, np.float32)
    counts = list(counts) if counts else [1] * len(tokens)
    parts = np.split(rows_NxD, np.cumsum(counts)[:-1])
    return {t: np.ascontiguousarray(p[0] if n == 1 else p) for t, n, p in zip(tokens, counts, parts)}


def save_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file that is the same bytes for the same contents, with the permissions of every other file
    (0666 less the umask), written whole or not at all (a temporary file, then a rename). safetensors' own
    writer orders the metadata at random (a Rust HashMap) and creates the file 0600: here its header is written
    again with sorted metadata (the tensors' entries keep their order and offsets)."""
    blob = safetensors_bytes(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.write(memoryview(blob)[8 + n:])
    os.replace(tmp, path)


def save_concepts(path: str, tokens, rows_NxD, init_words=None, counts=None) -> None:
    """Embeddings by token (safetensors, `token_tensors`); init words in the metadata."""
    tensors = token_tensors(tokens, rows_NxD, counts)
    meta = {"format": "jaxconcept", "tokens": json.dumps(list(tokens))}
    if init_words is not None:
        meta["init_words"] = json.dumps(list(init_words))
    save_safetensors(path, tensors, meta)


def load_concepts(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise JaxconceptError(f"no learned concepts at {path!r}: is it a finished run folder?")
    return dict(load_file(path))


def save_lora(path: str, adapters, spec, unet_params) -> None:
    """The joint stage's adapters as a PEFT LoRA file (`pipe.load_lora_weights(folder)` in PyTorch diffusers)."""
    tensors, meta = lora.to_peft(adapters, spec, unet_params)
    save_safetensors(path, tensors, meta)


def load_lora(path: str, unet_params):
    """(adapters, spec) of a LoRA file `save_lora` wrote; a damaged file is a JaxconceptError."""
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return lora.from_peft(tensors, meta, unet_params)
    except (OSError, ValueError, KeyError) as e:
        raise JaxconceptError(f"cannot read the LoRA adapters in {path!r} ({e}); the file is damaged or not for "
                              "this model: start the same train command again to rewrite it.") from e
