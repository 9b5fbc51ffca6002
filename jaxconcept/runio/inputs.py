"""What the user wants learned: images, their concept tokens, init words, kinds and optional user masks.

Host-side only (numpy + Pillow): specs are parsed and validated here, then `load` turns them into arrays.
Whether a token is new to the vocabulary and whether an init word is known is checked later by
`tokens.add_concept_tokens`, which needs the tokenizer.

Command-line form (`parse_concepts_arg`), one image per argument::

    IMAGE:TOKEN[=INIT][/KIND][@MASK],TOKEN[=INIT][/KIND][@MASK],...

    dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background
    scene.png:<v1>=circle@masks/v1.png,<v2>@masks/v2.png
    photos/cat.png:<cat>                      # no init word (random start), kind "object", no mask
    C:\\photos\\cat.png:<cat>=cat@D:\\masks\\cat.png

* TOKEN: the new word, e.g. ``<dog>``; no whitespace and none of ``, = / @ :``.
* INIT: an existing word whose embedding starts the token (left out: a random start); words joined by
  ``+`` (``purple+ring``) start it at the mean of their embeddings.
* KIND: ``object`` (default) or ``background``.
* MASK: a mask file of the image's size as displayed (after its EXIF orientation; white = the concept), for
  training with user masks, cropped or padded like its image (`resize`, see `jaxconcept.runio.images`); it is the
  rest of the item after the first ``@``, so it may hold ``/``, ``:`` and ``@`` but not ``,``.
* Spaces around items are ignored (``a.png:<a>, <b>``).

Where the image ends: at the first ``:`` after which no concept has a ``:`` before its ``@``. Tokens, init
words and kinds cannot contain ``:``, so a ``:`` inside the image path is passed over (``runs/10:30/x.png``,
``C:\\x.png``: the text after such a ``:`` still holds the separator ``:``), while mask paths may hold ``:``.
A drive letter (one letter, ``:``, then ``\\`` or ``/``) is never the separator, so ``C:\\x.png`` alone is
reported as missing its concepts. The one case this rule reads wrongly is an image path with a ``:`` and,
later, an ``@`` (``a:b@c.png:<v>``); use the config form for such paths.

Config form (`specs_from_config`), e.g. from an ml_collections config::

    [{"path": "dog.jpg", "concepts": [{"token": "<dog>", "init_word": "dog"},
                                       {"token": "<room>", "kind": "background", "mask": "m/room.png"}]}]

where an image may also be given as a command-line string and a concept as a ``TOKEN[=INIT][/KIND][@MASK]``
string: FrozenConfigDict cannot hold dicts inside lists, but it can hold tuples of strings.

Toy scenes written by ``python -m jaxconcept.toy.scene --out DIR`` are read by `from_toy_scene_folder`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import images
from ..errors import JaxconceptError

KINDS: tuple[str, ...] = ("object", "background")
FORM = "IMAGE:TOKEN[=INIT][/KIND][@MASK],TOKEN[=INIT][/KIND][@MASK],..."
EXAMPLE = "dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background"
IMAGE_KEYS: tuple[str, ...] = ("path", "concepts")
CONCEPT_KEYS: tuple[str, ...] = ("token", "init_word", "kind", "mask")
MASK_THRESHOLD = 128  # grey level from which a mask pixel belongs to the concept

log = logging.getLogger(__name__)


class InputError(JaxconceptError):
    """Images, concepts or masks given by the user that cannot be used."""


def safe_name(text: str) -> str:
    """A file-name-safe form of a token or image name ("<red circle>" -> "red_circle"): what a token's files are
    named by (masks/*/IMAGE__NAME.png, the export's embeddings/NAME.safetensors, evaluate's references)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")
    return name or "concept"


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    """One concept to learn: its new token, optional init word, kind, and optional user mask file."""

    token: str
    init_word: str | None = None
    kind: str = "object"
    mask: str | None = None


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One image and the concepts it shows."""

    path: str
    concepts: tuple[ConceptSpec, ...]

    def __post_init__(self):
        # lists are accepted for convenience; stored as a tuple so the spec stays hashable
        object.__setattr__(self, "concepts", tuple(self.concepts))


# ------------------------------------------------------------------------------------------ command line


def _form_error(text: str, reason: str) -> InputError:
    return InputError(f"cannot read the concepts argument {text!r}: {reason}. Expected {FORM}, e.g. {EXAMPLE!r}")


def _is_drive_colon(text: str, i: int) -> bool:
    return i == 1 and text[0].isascii() and text[0].isalpha() and text[2:3] in ("\\", "/")


def _split_image(text: str) -> tuple[str, str]:
    """(image, concept list): at the first ':' after which no item has a ':' before its '@'."""
    for i, ch in enumerate(text):
        if ch != ":" or _is_drive_colon(text, i):
            continue
        if all(":" not in item.partition("@")[0] for item in text[i + 1:].split(",")):
            return text[:i], text[i + 1:]
    raise _form_error(text, "no ':' between the image and its concepts")


def _parse_item(item: str, text: str) -> ConceptSpec:
    """One TOKEN[=INIT][/KIND][@MASK]; `text` is the whole argument, for messages."""
    item = item.strip()
    if not item:
        raise _form_error(text, "an empty concept (two commas in a row, or a trailing comma?)")
    head, at, mask = item.partition("@")
    mask = mask.strip()
    if at and not mask:
        raise _form_error(text, f"nothing after '@' in {item!r}: give the mask file ('<v1>@masks/v1.png') or drop '@'")
    parts = head.split("/")
    if len(parts) > 2:
        raise _form_error(text, f"more than one '/' in {item!r}: a concept is TOKEN[=INIT][/KIND]; "
                                "a mask path goes after '@'")
    kind = "object"
    if len(parts) == 2:
        kind = parts[1].strip()
        if not kind:
            raise _form_error(text, f"nothing after '/' in {item!r}: give a kind ({', '.join(KINDS)}) or drop '/'")
        if kind not in KINDS:
            raise _form_error(text, f"kind {kind!r} in {item!r} is not one of {', '.join(KINDS)}")
    token, eq, init = parts[0].partition("=")
    token, init = token.strip(), init.strip()
    if not token:
        raise _form_error(text, f"no token in {item!r}: name the concept first, e.g. '<dog>=dog'")
    if "=" in init:
        raise _form_error(text, f"more than one '=' in {item!r}: a concept has one init word")
    if eq and not init:
        raise _form_error(text, f"nothing after '=' in {item!r}: give an init word ('<dog>=dog') "
                                "or drop '=' for a random start")
    return ConceptSpec(token, init or None, kind, mask or None)


def parse_concepts_arg(text: str) -> ImageSpec:
    """An ImageSpec from ``IMAGE:TOKEN[=INIT][/KIND][@MASK],...`` (see the module docstring), validated."""
    if not isinstance(text, str):
        raise InputError(f"the concepts argument must be a string like {EXAMPLE!r}, got {type(text).__name__}")
    image, concepts = _split_image(text)
    if not image.strip():
        raise _form_error(text, "no image before ':'")
    if not concepts.strip():
        raise _form_error(text, "no concepts: give at least one concept token after ':'")
    spec = ImageSpec(image, tuple(_parse_item(item, text) for item in concepts.split(",")))
    validate([spec])
    return spec


def format_concepts_arg(spec: ImageSpec) -> str:
    """The command-line string of a spec (the inverse of `parse_concepts_arg`); an error if it has none."""
    items = []
    for c in spec.concepts:
        item = c.token + (f"={c.init_word}" if c.init_word else "") + (f"/{c.kind}" if c.kind != "object" else "")
        items.append(item + (f"@{c.mask}" if c.mask else ""))
    text = f"{spec.path}:{','.join(items)}"
    try:
        same = parse_concepts_arg(text) == spec
    except InputError:
        same = False
    if not same:  # a token or path with ',', '=', '/', '@' or ':' in the wrong place
        raise InputError(f"image {spec.path!r} with its concepts cannot be written as {FORM}; use the config form")
    return text


# ------------------------------------------------------------------------------------------ config


def _as_dict(obj) -> dict | None:
    """dict / ConfigDict / FrozenConfigDict / any mapping-like as a plain dict; None if not mapping-like."""
    if isinstance(obj, (str, bytes)) or not (hasattr(obj, "keys") and hasattr(obj, "__getitem__")):
        return None
    return {k: obj[k] for k in obj.keys()}


def _check_keys(entry: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{where} has an unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}")


def _optional_str(value, key: str, where: str) -> str | None:
    if value is None or value == "":  # configs often use "" for "not set"
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def _concept_from_config(obj, where: str) -> ConceptSpec:
    if isinstance(obj, str):
        return _parse_item(obj, obj)
    entry = _as_dict(obj)
    if entry is None:
        raise InputError(f"{where} must be a mapping with keys {', '.join(CONCEPT_KEYS)} or a string "
                         f"TOKEN[=INIT][/KIND][@MASK], got {obj!r}")
    _check_keys(entry, CONCEPT_KEYS, where)
    if "token" not in entry:
        raise InputError(f"{where} has no 'token': name the concept, e.g. {{'token': '<dog>', 'init_word': 'dog'}}")
    kind = _optional_str(entry.get("kind"), "kind", where) or "object"
    return ConceptSpec(entry["token"], _optional_str(entry.get("init_word"), "init_word", where), kind,
                       _optional_str(entry.get("mask"), "mask", where))


def specs_from_config(entries) -> tuple[ImageSpec, ...]:
    """Validated ImageSpecs from a list of ``{"path": ..., "concepts": [...]}`` (dicts or ConfigDicts), where
    an image may also be a command-line string and a concept a ``TOKEN[=INIT][/KIND][@MASK]`` string."""
    if isinstance(entries, str) or _as_dict(entries) is not None or not isinstance(entries, (Sequence, tuple)):
        raise InputError(f"the images must be a list of {{'path': ..., 'concepts': [...]}} entries or "
                         f"strings like {EXAMPLE!r}, got {type(entries).__name__}")
    specs = []
    for i, obj in enumerate(entries):
        if isinstance(obj, str):
            specs.append(parse_concepts_arg(obj))
            continue
        entry = _as_dict(obj)
        if entry is None:
            raise InputError(f"image entry {i} must be a mapping with keys {', '.join(IMAGE_KEYS)} or a string "
                             f"like {EXAMPLE!r}, got {obj!r}")
        where = f"image entry {i}" + (f" ({entry['path']!r})" if "path" in entry else "")
        _check_keys(entry, IMAGE_KEYS, where)
        path = _optional_str(entry.get("path"), "path", where)
        if path is None:
            raise InputError(f"{where} has no 'path': give the image file")
        concepts = entry.get("concepts")
        if concepts is None:
            concepts = ()
        if isinstance(concepts, str) or _as_dict(concepts) is not None or not isinstance(concepts, Sequence):
            raise InputError(f"{where}: 'concepts' must be a list of concepts, got {concepts!r}")
        specs.append(ImageSpec(path, tuple(_concept_from_config(c, f"concept {j} of {where}")
                                           for j, c in enumerate(concepts))))
    return validate(specs)


# ------------------------------------------------------------------------------------------ validation


def validate(specs: Sequence[ImageSpec]) -> tuple[ImageSpec, ...]:
    """The specs as a tuple, or an InputError for the first problem: no images, an image without concepts, an
    image listed twice, a bad token, kind or field type, or a token used twice. Vocabulary clashes and unknown
    init words are `tokens.add_concept_tokens`'s to check."""
    if isinstance(specs, ImageSpec):
        specs = (specs,)
    specs = tuple(specs)
    if not specs:
        raise InputError(f"no images: give at least one image with its concepts, e.g. {EXAMPLE!r}")
    owner_of: dict[str, str] = {}
    seen_paths: dict[str, str] = {}
    for spec in specs:
        if not isinstance(spec, ImageSpec):
            raise InputError(f"expected ImageSpec entries, got {spec!r}")
        if not isinstance(spec.path, str) or not spec.path.strip():
            raise InputError(f"image path {spec.path!r} is empty or not a string")
        key = os.path.normpath(spec.path)
        if key in seen_paths:
            raise InputError(f"image {spec.path!r} is listed twice: give all its concepts in one entry")
        seen_paths[key] = spec.path
        if not spec.concepts:
            raise InputError(f"no concepts: give at least one concept token for image {spec.path!r}, "
                             f"e.g. {spec.path}:<v1>=dog")
        for c in spec.concepts:
            _validate_concept(c, spec.path)
            if c.token in owner_of:
                other = owner_of[c.token]
                where = f"twice for image {other!r}" if other == spec.path else f"for both {other!r} and {spec.path!r}"
                raise InputError(f"concept token {c.token!r} is given {where}: each concept needs its own token")
            owner_of[c.token] = spec.path
    _check_file_names(owner_of)
    return specs


def _check_file_names(tokens) -> None:
    """Two tokens whose files would share a name (`safe_name`, case ignored as on macOS and Windows) are
    refused: a run's masks, the final-round rule, the export and evaluate's references go by that name."""
    by_name: dict[str, list[str]] = {}
    for token in tokens:
        by_name.setdefault(safe_name(token).lower(), []).append(token)
    clashes = [ts for ts in by_name.values() if len(ts) > 1]
    if clashes:
        ts = clashes[0]
        raise InputError(
            f"concept tokens {' and '.join(map(repr, ts))} would share the file name {safe_name(ts[0])!r} (in "
            f"masks/round_NN/IMAGE__{safe_name(ts[0])}.png, the export and evaluate): a token's file name keeps "
            "its letters, digits, '.', '_' and '-', with every other run of characters turned into '_', and case is "
            "ignored. Rename one of them so that their names differ in letters or digits, e.g. "
            f"{ts[0]!r} and {_renamed(ts[1], by_name)!r}.")


def _renamed(token: str, by_name: dict) -> str:
    """A suggestion: `token` with a digit added before its closing '>' (or at its end) that no other token uses."""
    head, tail = (token[:-1], ">") if token.endswith(">") else (token, "")
    k = 2
    while safe_name(f"{head}{k}{tail}").lower() in by_name:
        k += 1
    return f"{head}{k}{tail}"


def _validate_concept(c: ConceptSpec, path: str) -> None:
    if not isinstance(c, ConceptSpec):
        raise InputError(f"image {path!r}: expected ConceptSpec entries, got {c!r}")
    if not isinstance(c.token, str) or not c.token.strip():
        raise InputError(f"image {path!r}: concept token {c.token!r} is empty or not a string: "
                         "use a name such as '<v1>'")
    if any(ch.isspace() for ch in c.token):
        raise InputError(f"image {path!r}: concept token {c.token!r} contains whitespace; use one word, e.g. '<v1>'")
    if c.kind not in KINDS:
        raise InputError(f"image {path!r}: kind {c.kind!r} of {c.token!r} is not one of {', '.join(KINDS)}")
    for name, value in (("init word", c.init_word), ("mask", c.mask)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"image {path!r}: {name} {value!r} of {c.token!r} must be a non-empty string or None")


# ------------------------------------------------------------------------------------------ prior images

PRIOR_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def prior_files(folder: str) -> list[str]:
    """The class images of prior preservation (`prior.folder`), sorted (refused when there are none)."""
    files = (sorted(f for f in os.listdir(folder) if f.lower().endswith(PRIOR_EXTENSIONS))
             if os.path.isdir(folder) else [])
    if not files:
        what = "does not exist" if not os.path.exists(folder) else (
            "is a file, not a folder" if not os.path.isdir(folder) else f"has no images ({', '.join(PRIOR_EXTENSIONS)})")
        raise InputError(f"prior-preservation folder {folder!r} {what}; fill it with class images or set "
                         "--config.prior.folder=''.")
    return [os.path.join(folder, f) for f in files]


# ------------------------------------------------------------------------------------------ loading


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no single truth value
class Inputs:
    """Loaded images and their concepts, flattened over images in order (C concepts, N images)."""

    images_IxHxWx3: np.ndarray          # float32 in [-1, 1]
    names: tuple[str, ...]              # image stems, made unique ("a", "a_2")
    paths: tuple[str, ...]
    concepts: tuple[ConceptSpec, ...]
    owner_C: np.ndarray                 # int32: index of the image each concept belongs to
    kinds: tuple[str, ...]
    user_masks: tuple[np.ndarray | None, ...]  # per concept: H x W bool (cropped and resized like its image)
    valid_IxHxW: np.ndarray | None = None      # bool: False on padding (resize "pad"); None: no padding anywhere

    def valid(self, image_index: int) -> np.ndarray:
        """H x W bool: where image `image_index`'s frame shows the image (False on padding)."""
        if self.valid_IxHxW is None:
            return np.ones(self.images_IxHxWx3.shape[1:3], bool)
        return self.valid_IxHxW[image_index]

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(c.token for c in self.concepts)

    @property
    def init_words(self) -> tuple[str | None, ...]:
        return tuple(c.init_word for c in self.concepts)

    @property
    def num_images(self) -> int:
        return len(self.names)

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def concepts_of(self, image_index: int) -> tuple[int, ...]:
        """Indices of the concepts of one image."""
        return tuple(int(c) for c in np.flatnonzero(self.owner_C == image_index))

    @property
    def has_any_user_masks(self) -> bool:
        return any(m is not None for m in self.user_masks)

    @property
    def has_all_user_masks(self) -> bool:
        return all(m is not None for m in self.user_masks)

    @property
    def user_masks_CxHxW(self) -> np.ndarray | None:
        """C x H x W bool when every concept has a user mask, None when none has; an error when only some have
        (user-mask training takes the masks as ground truth for every concept)."""
        if not self.has_any_user_masks:
            return None
        if not self.has_all_user_masks:
            missing = [c.token for c, m in zip(self.concepts, self.user_masks) if m is None]
            raise InputError(f"training with user masks needs a mask for every concept; missing for "
                             f"{', '.join(missing)} (add '@MASK' / 'mask', or drop all masks)")
        return np.stack(self.user_masks)


def _unique_names(paths: Sequence[str]) -> tuple[str, ...]:
    used: set[str] = set()
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, k = stem, 2
        while name in used:  # a loop, not a counter per stem: "a_2" may itself be a stem
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        names.append(name)
    return tuple(names)


def _read_mask(path: str, token: str, image_path: str, image_wh: tuple[int, int]) -> np.ndarray:
    """H0 x W0 bool at the image's original size: greyscale >= 128; transparent pixels count as black."""
    if not os.path.isfile(path):
        raise InputError(f"mask {path!r} of {token!r} (image {image_path!r}) does not exist")
    try:
        with Image.open(path) as raw:
            raw.load()
            img = ImageOps.exif_transpose(raw)  # the orientation it is shown in, like its image
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # masks painted on a transparent layer: unpainted (transparent) pixels are not the concept
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            grey = img.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"mask {path!r} of {token!r} cannot be read ({e}); is it a complete PNG file?") from e
    if grey.size != image_wh:
        raise InputError(
            f"mask {path!r} of {token!r} is {grey.size[0]}x{grey.size[1]} pixels but its image {image_path!r} is "
            f"{image_wh[0]}x{image_wh[1]} (width x height): a user mask must have its image's size")
    return np.asarray(grey) >= MASK_THRESHOLD


def _place_mask(full_H0xW0: np.ndarray, p: images.Placement) -> np.ndarray:
    img = Image.fromarray(full_H0xW0.astype(np.uint8) * 255, "L")
    # nearest keeps masks hard-edged; resizing non-overlapping masks this way cannot make them overlap;
    # padding ("pad") belongs to no concept
    return np.asarray(images.place(img, p, Image.NEAREST, fill=0)) >= MASK_THRESHOLD


def _image_masks(spec: ImageSpec, p: images.Placement) -> list[np.ndarray | None]:
    if not any(c.mask for c in spec.concepts):
        return [None] * len(spec.concepts)
    image_wh = p.src_wh
    out_h, out_w = p.out_hw
    full = {c.token: _read_mask(c.mask, c.token, spec.path, image_wh) for c in spec.concepts if c.mask}
    tokens = list(full)
    for i, a in enumerate(tokens):
        if not full[a].any():
            raise InputError(f"mask of {a!r} ({_mask_path(spec, a)!r}) is empty: no pixel reaches grey level "
                             f"{MASK_THRESHOLD}; paint the concept white on black")
        for b in tokens[i + 1:]:
            # at the original resolution: user masks are ground truth, so any shared pixel is a mistake
            n = int(np.count_nonzero(full[a] & full[b]))
            if n:
                raise InputError(f"masks of {a!r} and {b!r} overlap on {n} pixels of image {spec.path!r} "
                                 f"({_mask_path(spec, a)!r}, {_mask_path(spec, b)!r}): user masks must not overlap")
    out = []
    for c in spec.concepts:
        if not c.mask:
            out.append(None)
            continue
        mask_HxW = _place_mask(full[c.token], p)
        if not mask_HxW.any():
            raise InputError(f"mask of {c.token!r} ({c.mask!r}) covers no pixel after the "
                             f"{'centre crop' if p.mode == 'crop' else 'padding'} and resize "
                             f"to {out_w}x{out_h}: it lies in the cropped-off border or is too thin")
        mask_HxW.setflags(write=False)
        out.append(mask_HxW)
    return out


def _mask_path(spec: ImageSpec, token: str) -> str:
    return next(c.mask for c in spec.concepts if c.token == token)


def _load_image(spec: ImageSpec, out_hw: tuple[int, int], resize: str):
    """(image H x W x 3 in [-1, 1], its placement): too small refused, much cut away or padded warned."""
    img = images.open_rgb(spec.path)
    p = images.placement(img.size, out_hw, resize)
    images.check_size(spec.path, p)
    note = images.fit_note(spec.path, p)
    if note:
        log.warning("%s", note)
    return images.to_float(images.place(img, p)), p


def _check_resize(resize: str) -> None:
    if resize not in images.RESIZE_MODES:
        raise InputError(f"resize must be one of {', '.join(images.RESIZE_MODES)}, got {resize!r} "
                         "(--config.resize=crop or --config.resize=pad)")


def _frame(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(map(int, size))


def check_sizes(specs: Sequence[ImageSpec], size: int | tuple[int, int], resize: str = "crop") -> None:
    """Refuse images too small for `size` (and an unknown `resize`) before anything slow, e.g. a model download."""
    _check_resize(resize)
    for spec in validate(specs):
        images.check_size(spec.path, images.placement(images.image_size(spec.path), _frame(size), resize))


def load(specs: Sequence[ImageSpec] | ImageSpec, size: int | tuple[int, int], resize: str = "crop") -> Inputs:
    """Validate and load: images fitted to `size` (side, or (height, width)) by `resize` ("crop": centre-cropped,
    "pad": whole, padded; see `images`), and user masks placed the same way."""
    specs = validate(specs)
    _check_resize(resize)
    out_hw = _frame(size)
    loaded = [_load_image(s, out_hw, resize) for s in specs]
    masks = [m for s, (_, p) in zip(specs, loaded) for m in _image_masks(s, p)]
    images_IxHxWx3 = np.stack([a for a, _ in loaded]).astype(np.float32)
    valid_IxHxW = np.stack([images.valid_region(p) for _, p in loaded])
    owner_C = np.asarray([i for i, s in enumerate(specs) for _ in s.concepts], np.int32)
    for array in (images_IxHxWx3, owner_C, valid_IxHxW):
        array.setflags(write=False)
    concepts = tuple(c for s in specs for c in s.concepts)
    return Inputs(
        images_IxHxWx3=images_IxHxWx3, names=_unique_names([s.path for s in specs]),
        paths=tuple(s.path for s in specs), concepts=concepts, owner_C=owner_C,
        kinds=tuple(c.kind for c in concepts), user_masks=tuple(masks),
        valid_IxHxW=None if valid_IxHxW.all() else valid_IxHxW,
    )


# ------------------------------------------------------------------------------------------ toy scenes


def _toy_token(name: str, suffix: str) -> str:
    safe = re.sub(r"[^0-9A-Za-z_-]+", "_", str(name)).strip("_") or "concept"
    return f"<{safe}{suffix}>"


INIT_JOINER = "+"  # "purple+ring": several init words, one token started at the mean of their rows


def init_word_parts(word: str) -> list[str]:
    """The words of an init word (`INIT_JOINER`-joined; one word: itself)."""
    return word.split(INIT_JOINER)


TOY_INITS = ("color", "shape", "color+shape")  # an object's init word(s) in a toy scene folder


def from_toy_scene_folder(folder: str, suffix: str = "", init: str = "color+shape") -> ImageSpec:
    """The ImageSpec of a folder written by ``python -m jaxconcept.toy.scene --out DIR``: one concept per
    object (token ``<red_striped_circle>``) plus the background (token ``<background>``, init word
    "background"), each with its mask file. An object's init words are its colour and shape (`init`
    "color+shape", the default: the mean of the two rows, `tokens.add_concept_tokens`), its colour ("color") or
    its shape ("shape"); the token has to learn the rest (pattern, texture). Why both: the toy model's attention
    follows colour words best (shape words alone gave worse masks), and the samples need the shape. On six toy
    validation scenes (10100002/03/06/14/21/24, full learner, 16 samples a prompt) colour+shape drew the right
    object alone in 54% of samples and both together in 44%, colour alone 42% / 30%, with masks exact on every
    scene (colour alone: 0.90, two orange objects tied on one word) (docs/em_settling.md, section 7).
    `suffix` (e.g. "_s7") keeps tokens apart when several scenes are used together."""
    if init not in TOY_INITS:
        raise InputError(f"init must be one of {', '.join(TOY_INITS)}, got {init!r}")
    from ..toy import scene as toy_scene  # numpy + Pillow only

    record_path = os.path.join(folder, "concepts.json")
    if not os.path.isfile(record_path):
        raise InputError(f"{folder!r} has no concepts.json: expected a folder written by "
                         "'python -m jaxconcept.toy.scene --out DIR'")
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        vocab = set(toy_scene.vocabulary())
        concepts = []
        for c in record["concepts"]:
            kind = c.get("kind", "object")
            words = ["background"] if kind == "background" else [c.get(part) for part in init_word_parts(init)]
            word = INIT_JOINER.join(words) if all(w in vocab for w in words) else None
            concepts.append(ConceptSpec(
                token=_toy_token(c["name"], suffix), init_word=word, kind=kind,
                mask=os.path.join(folder, c["mask"]) if c.get("mask") else None,
            ))
        spec = ImageSpec(os.path.join(folder, record.get("image", "image.png")), tuple(concepts))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{record_path!r} is not a toy scene record ({type(e).__name__}: {e}); rewrite it with "
                         "'python -m jaxconcept.toy.scene --out DIR'") from e
    validate([spec])
    return spec


__all__ = [
    "CONCEPT_KEYS", "ConceptSpec", "EXAMPLE", "FORM", "IMAGE_KEYS", "ImageSpec", "InputError", "Inputs", "KINDS",
    "PRIOR_EXTENSIONS", "check_sizes", "format_concepts_arg", "from_toy_scene_folder", "init_word_parts", "load",
    "parse_concepts_arg", "prior_files", "safe_name", "specs_from_config", "validate",
]
