"""Seeded toy scenes: 1-3 coloured, patterned shapes on a textured background, with exact masks and a caption.

    python -m jaxconcept.toy.scene --seed 7 --out runs/scene7 [--size 64] [--objects 2]

The toy world exists so that a tiny Stable Diffusion can be trained from scratch and its multi-concept
personalisation judged without CLIP (see `analysis`). Design rules that the analysis relies on:

* Objects use a saturated palette (`COLORS`), backgrounds a separate muted one (`BACKGROUND_COLORS`), and an
  object colour is only placed on a background whose tones stay at least `MIN_CONTRAST` away from it
  (including the object's pattern shade), so "which pixels are background" is a colour question.
* Patterns are drawn in a darker shade of the object's colour (black: a lighter grey), on at most
  `MAX_PATTERN_SHARE` (45%) of its pixels, so the object's colour stays dominant. Stripes are horizontal;
  stripe period and dot spacing scale with the image size (visible at 32 and 64 px).
* Objects never overlap and keep a gap of `GAP` (relative to the image side) between their boxes and a
  margin `MARGIN` to the border, so each one is its own connected region and the border is pure background.
* Masks partition the image exactly: one per object plus "background"; pixels are hard-edged (no
  anti-aliasing), so every pixel of an object mask has the object's colour or its pattern shade.
* Everything but the per-pixel background texture is drawn in size-independent relative units before any
  pixel is touched, so the same seed gives the same scene content at 32 px and at 64 px.

Captions name each object as "a <color> [<pattern>] <shape>" and the background as
"a <color> [<texture>] background"; the default pattern "solid" and texture "plain" are left out of captions
(and of object names) to keep them short: "a red striped circle and an orange square on a teal grass
background". Object names are the caption phrase joined with "_" ("red_striped_circle", "orange_square"),
with "_2", "_3" appended when identical objects occur.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------------ vocabulary

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (215, 195, 160),
    "teal": (60, 140, 140),
    "pink": (235, 165, 190),
    "lime": (170, 220, 80),
}
TEXTURES: tuple[str, ...] = ("plain", "grass", "sand", "water", "checker")
CONNECTIVES: tuple[str, ...] = ("a", "an", "and", "on", "background")
# Not used by `caption` but allowed in prompts built around it ("a photo of ...").
TEMPLATE_WORDS: tuple[str, ...] = ("photo", "of")

DEFAULT_PATTERN = "solid"
DEFAULT_TEXTURE = "plain"

# (color, shape) combinations kept out of training scenes, for evaluating composition.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "ring")}
)

# ------------------------------------------------------------------------------------------ drawing constants

MAX_PATTERN_SHARE = 0.45              # patterns cover at most this share of an object (its colour dominates)
SHADE_FACTOR = 0.55                   # pattern shade = colour x this (black: BLACK_SHADE)
BLACK_SHADE = (90, 90, 90)
TEXTURE_RANGE = (0.85, 1.15)          # background tones are base colour x a factor in this range
MIN_CONTRAST = 65.0                   # min RGB distance between an object's colours and its background's tones
RING_INNER = 0.55                     # inner radius / outer radius
CROSS_ARM = 0.36                      # half-width of a cross arm / half the side
MARGIN = 0.06                         # min distance of an object box to the image border (relative)
GAP = 0.125                           # min distance between object boxes (relative)
SIDE_RANGE = {1: (0.32, 0.44), 2: (0.27, 0.36), 3: (0.24, 0.31)}  # object box side / image side
MIN_SIZE = 16


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can contain, plus `TEMPLATE_WORDS` and the unnamed defaults ("solid", "plain"),
    sorted: the word list a restricted tokenizer must encode as whole words."""
    words = (set(COLORS) | set(SHAPES) | set(PATTERNS) | set(BACKGROUND_COLORS) | set(TEXTURES)
             | set(CONNECTIVES) | set(TEMPLATE_WORDS))
    return tuple(sorted(words))


# ------------------------------------------------------------------------------------------ palette rules


def pattern_shade(color: str) -> tuple[int, int, int]:
    """The RGB a pattern is drawn in: a darker shade of the colour (black has none darker: a grey)."""
    if color == "black":
        return BLACK_SHADE
    return tuple(int(round(c * SHADE_FACTOR)) for c in COLORS[color])


def _segment_distance(a0, a1, b0, b1, steps: int = 33) -> float:
    """Smallest RGB distance between two colour segments (sampled): covers blends of base and shade."""
    t = np.linspace(0.0, 1.0, steps)[:, None]
    pa = np.asarray(a0, float) + t * (np.asarray(a1, float) - np.asarray(a0, float))
    pb = np.asarray(b0, float) + t * (np.asarray(b1, float) - np.asarray(b0, float))
    return float(np.min(np.linalg.norm(pa[:, None] - pb[None], axis=-1)))


def background_tones(bg_color: str) -> tuple[np.ndarray, np.ndarray]:
    """Darkest and brightest RGB a background of this colour can show (texture factors applied, clipped)."""
    base = np.asarray(BACKGROUND_COLORS[bg_color], float)
    return np.clip(base * TEXTURE_RANGE[0], 0, 255), np.clip(base * TEXTURE_RANGE[1], 0, 255)


@functools.lru_cache(maxsize=None)
def compatible_colors(bg_color: str) -> tuple[str, ...]:
    """Object colours allowed on this background: base, pattern shade and their blends all stay at least
    `MIN_CONTRAST` from every background tone, so objects can be told from background by colour alone."""
    lo, hi = background_tones(bg_color)
    return tuple(c for c in COLORS if _segment_distance(COLORS[c], pattern_shade(c), lo, hi) >= MIN_CONTRAST)


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class SceneObject:
    """One object: its words, its unique mask name and its box (x, y, side) in units of the image side."""

    color: str
    shape: str
    pattern: str
    name: str
    box: tuple[float, float, float]

    @property
    def words(self) -> tuple[str, ...]:
        return object_words(self.color, self.shape, self.pattern)

    def to_dict(self) -> dict:
        return {"name": self.name, "color": self.color, "shape": self.shape, "pattern": self.pattern}


@dataclass(frozen=True)
class Background:
    """The background: a colour from BACKGROUND_COLORS and a texture from TEXTURES."""

    color: str
    texture: str

    @property
    def words(self) -> tuple[str, ...]:
        return (self.color,) + ((self.texture,) if self.texture != DEFAULT_TEXTURE else ()) + ("background",)


@dataclass
class Scene:
    """A rendered scene. `masks` holds one H x W bool mask per object name plus "background"; they
    partition the image."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    objects: list[SceneObject]
    background: Background
    caption: str
    seed: int
    size: int = field(default=64)


def object_words(color: str, shape: str, pattern: str) -> tuple[str, ...]:
    """Caption words of an object; the default pattern is not named."""
    return (color,) + ((pattern,) if pattern != DEFAULT_PATTERN else ()) + (shape,)


def _with_article(words: tuple[str, ...]) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join((article,) + words)


def make_caption(objects: list[SceneObject], background: Background) -> str:
    """"a red striped circle and an orange square on a teal grass background"."""
    things = " and ".join(_with_article(o.words) for o in objects)
    return f"{things} on {_with_article(background.words)}"


def _unique_names(words_list: list[tuple[str, ...]]) -> list[str]:
    """"_".join(words), with "_2", "_3" for repeats, so names can key a dict and a file name."""
    seen: dict[str, int] = {}
    names = []
    for words in words_list:
        base = "_".join(words)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


# ------------------------------------------------------------------------------------------ sampling


def _pick(rng: np.random.Generator, items) -> str:
    items = list(items)
    return str(items[int(rng.integers(len(items)))])


def _allowed_combos(bg_color: str, exclude: frozenset) -> list[tuple[str, str]]:
    return [(c, s) for c in compatible_colors(bg_color) for s in SHAPES if (c, s) not in exclude]


def _draw_attributes(rng: np.random.Generator, n: int, bg_color: str, exclude: frozenset):
    """(color, shape, pattern) per object. Excluded combos are re-drawn, so a scene without any excluded
    combo is identical with and without `exclude` (held-out training sets are subsets of the same scenes)."""
    allowed = _allowed_combos(bg_color, exclude)
    out = []
    for _ in range(n):
        for _try in range(100):
            combo = (_pick(rng, compatible_colors(bg_color)), _pick(rng, SHAPES))
            if combo not in exclude:
                break
        else:  # nearly everything excluded: draw straight from what is left
            combo = allowed[int(rng.integers(len(allowed)))]
        out.append(combo + (_pick(rng, PATTERNS),))
    return out


def _boxes_apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Boxes (x, y, side) separated by at least GAP along x or along y."""
    (ax, ay, asd), (bx, by, bsd) = a, b
    return ax + asd + GAP <= bx or bx + bsd + GAP <= ax or ay + asd + GAP <= by or by + bsd + GAP <= ay


def draw_layout(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """n non-overlapping boxes (x, y, side) inside [MARGIN, 1 - MARGIN]^2, by rejection sampling; after a
    failed attempt all sides shrink by 8%, which always ends (small boxes fit anywhere)."""
    lo, hi = SIDE_RANGE[n]
    shrink = 1.0
    while True:
        boxes: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _try in range(50):
                side = float(rng.uniform(lo, hi)) * shrink
                x = float(rng.uniform(MARGIN, 1.0 - MARGIN - side))
                y = float(rng.uniform(MARGIN, 1.0 - MARGIN - side))
                if all(_boxes_apart(b, (x, y, side)) for b in boxes):
                    boxes.append((x, y, side))
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
        shrink *= 0.92


# ------------------------------------------------------------------------------------------ rendering


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points in a shape drawn in the box [-1, 1]^2 (u right, v down). Shared with the
    analysis, which matches these templates against found regions."""
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= RING_INNER**2)
    if shape == "triangle":  # apex up, base at the bottom
        return (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":
        return ((np.abs(u) <= CROSS_ARM) & (np.abs(v) <= 1)) | ((np.abs(v) <= CROSS_ARM) & (np.abs(u) <= 1))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_mask(shape: str, box: tuple[float, float, float], size: int) -> np.ndarray:
    """H x W bool: pixels whose centre lies in the shape drawn in the relative box (x, y, side)."""
    x, y, side = box
    centers_N = (np.arange(size) + 0.5) / size
    half = side / 2
    u_HxW = (centers_N[None, :] - (x + half)) / half
    v_HxW = (centers_N[:, None] - (y + half)) / half
    return shape_inside(shape, u_HxW, v_HxW)


def stripe_period(size: int) -> int:
    return max(5, round(size / 10))


def dot_spacing(size: int) -> int:
    return max(5, round(size / 8))


def pattern_mask(pattern: str, mask_HxW: np.ndarray) -> np.ndarray:
    """H x W bool: the object's pixels drawn in the pattern shade: horizontal stripes (2 of every 5-6 rows at
    32-64 px) or whole dots on a square grid, covering 12-45% of the object."""
    size_h, size_w = mask_HxW.shape
    if pattern == "solid" or not mask_HxW.any():
        return np.zeros_like(mask_HxW)
    rows, cols = np.nonzero(mask_HxW)
    if pattern == "striped":
        period = stripe_period(max(size_h, size_w))
        dark = max(2, round(0.4 * period))
        dy_H = np.arange(size_h) - rows.min()
        # the first phase (from "top rows in the colour") whose stripes cover at most MAX_PATTERN_SHARE:
        # on a small triangle the default phase can put a stripe on its widest rows
        options = [mask_HxW & (((dy_H + shift) % period) >= period - dark)[:, None] for shift in range(period)]
        shares = [np.count_nonzero(o) / np.count_nonzero(mask_HxW) for o in options]
        ok = [i for i, share in enumerate(shares) if share <= MAX_PATTERN_SHARE]
        return options[ok[0] if ok else int(np.argmin(shares))]
    if pattern == "dotted":
        spacing = dot_spacing(max(size_h, size_w))
        cy = (rows.min() + rows.max() + 1) / 2
        cx = (cols.min() + cols.max() + 1) / 2
        # grid phases: a dot on the object's centre, or half a spacing off along y, x or both
        options = [_whole_dots(mask_HxW, cy + py, cx + px, spacing)
                   for py in (0.0, spacing / 2) for px in (0.0, spacing / 2)]
        return max(options, key=lambda d: _dots_preference(d, mask_HxW))  # max keeps the first of equals
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


def _dot_grid(hw: tuple[int, int], cy: float, cx: float, spacing: int) -> tuple[np.ndarray, np.ndarray]:
    """(H x W bool dots, H x W int dot index): round dots of radius 0.3 * spacing on a square grid through
    (cy, cx), snapped to a pixel centre (odd spacing) or corner (even) so all dots have one pixel shape."""
    snap = 0.5 if spacing % 2 else 0.0
    cy, cx = np.floor(cy) + snap, np.floor(cx) + snap
    ry_H = np.arange(hw[0]) + 0.5 - cy + spacing / 2
    rx_W = np.arange(hw[1]) + 0.5 - cx + spacing / 2
    oy_H, ox_W = ry_H % spacing - spacing / 2, rx_W % spacing - spacing / 2
    dots = oy_H[:, None] ** 2 + ox_W[None, :] ** 2 <= (0.3 * spacing) ** 2
    index = (ry_H // spacing).astype(int)[:, None] * (hw[1] + 1) + (rx_W // spacing).astype(int)[None, :]
    return dots, index


def _whole_dots(mask_HxW: np.ndarray, cy: float, cx: float, spacing: int) -> np.ndarray:
    """The dots of the grid lying entirely inside the object (a dot cut by the outline reads as a notch
    or a stripe); all dots touching it when none fits whole (tiny objects)."""
    dots, index = _dot_grid(mask_HxW.shape, cy, cx, spacing)
    ids, inv = np.unique(index[dots], return_inverse=True)
    outside = np.bincount(inv, weights=~mask_HxW[dots], minlength=len(ids)) > 0
    whole = np.zeros_like(mask_HxW)
    whole[dots] = ~outside[inv]
    return whole if whole.any() else dots & mask_HxW


def _dots_preference(dots_HxW: np.ndarray, mask_HxW: np.ndarray) -> tuple[bool, int]:
    """Prefer dot layouts covering at most MAX_PATTERN_SHARE of the object, then more dot pixels (fewer
    when all cover too much)."""
    share = np.count_nonzero(dots_HxW) / max(np.count_nonzero(mask_HxW), 1)
    n = np.count_nonzero(dots_HxW)
    return (share <= MAX_PATTERN_SHARE, n if share <= MAX_PATTERN_SHARE else -n)


def _moving_average_rows(z_HxW: np.ndarray, length: int) -> np.ndarray:
    c = np.cumsum(np.concatenate([np.zeros((1, z_HxW.shape[1])), z_HxW]), axis=0)
    return (c[length:] - c[:-length]) / length


def texture_factor(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """H x W brightness factors within TEXTURE_RANGE: grass = vertical blades, sand = speckle with dark grains,
    water = wavy bright lines, checker = two-tone squares."""
    lo, hi = TEXTURE_RANGE
    amp = (hi - lo) / 2
    ys_H = (np.arange(size) + 0.5) / size
    xs_W = (np.arange(size) + 0.5) / size
    if texture == "plain":
        return np.ones((size, size))
    if texture == "grass":
        length = max(2, size // 12)
        z = _moving_average_rows(rng.standard_normal((size + length - 1, size)), length) * np.sqrt(length)
        return 1.0 + amp / 2 * np.clip(z, -2, 2)
    if texture == "sand":
        f = 1.0 + amp / 4 * np.clip(rng.standard_normal((size, size)), -2, 2)
        return np.where(rng.random((size, size)) < 0.05, lo + 0.02, f)
    if texture == "water":
        phase, wobble = rng.random(2)
        waves = ys_H[:, None] * 6 + 0.25 * np.sin(2 * np.pi * (xs_W[None, :] * 2 + wobble)) + phase
        return np.where(waves % 1.0 < 0.22, hi - 0.02, 1.0)
    if texture == "checker":
        cell = max(2, size // 8)
        idx = np.arange(size) // cell
        return np.where((idx[:, None] + idx[None, :]) % 2 == 0, 1.0, lo + 0.03)
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def render(objects: list[SceneObject], background: Background, size: int, rng: np.random.Generator):
    """(image H x W x 3 uint8, masks) for objects whose boxes do not overlap."""
    base = np.asarray(BACKGROUND_COLORS[background.color], float)
    factor_HxW = texture_factor(background.texture, size, rng)
    image_HxWx3 = np.clip(np.round(base * factor_HxW[..., None]), 0, 255).astype(np.uint8)
    masks: dict[str, np.ndarray] = {}
    covered_HxW = np.zeros((size, size), bool)
    for obj in objects:
        mask_HxW = shape_mask(obj.shape, obj.box, size) & ~covered_HxW
        image_HxWx3[mask_HxW] = COLORS[obj.color]
        image_HxWx3[pattern_mask(obj.pattern, mask_HxW)] = pattern_shade(obj.color)
        masks[obj.name] = mask_HxW
        covered_HxW |= mask_HxW
    masks["background"] = ~covered_HxW
    return image_HxWx3, masks


def make_scene(seed: int, size: int = 64, num_objects: int | None = None,
               exclude: frozenset[tuple[str, str]] | set = frozenset()) -> Scene:
    """A deterministic scene for (seed, size, num_objects, exclude): 1-3 objects when num_objects is None;
    no (color, shape) in `exclude` appears. Only the background texture's pixels depend on `size`."""
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    if num_objects is not None and num_objects not in SIDE_RANGE:
        raise ValueError(f"num_objects must be one of {sorted(SIDE_RANGE)} or None, got {num_objects!r}")
    exclude = frozenset(tuple(combo) for combo in exclude)  # lists from JSON work too
    usable_bgs = [b for b in BACKGROUND_COLORS if _allowed_combos(b, exclude)]
    if not usable_bgs:
        raise ValueError("exclude leaves no (color, shape) combination to draw")
    rng = np.random.default_rng(seed)
    bg_color = _pick(rng, BACKGROUND_COLORS)
    if bg_color not in usable_bgs:  # only with huge exclude sets
        bg_color = _pick(rng, usable_bgs)
    background = Background(bg_color, _pick(rng, TEXTURES))
    n = int(num_objects) if num_objects is not None else int(rng.integers(1, 4))
    attributes = _draw_attributes(rng, n, bg_color, exclude)
    boxes = draw_layout(rng, n)
    names = _unique_names([object_words(*a) for a in attributes])
    objects = [SceneObject(c, s, p, name, box) for (c, s, p), name, box in zip(attributes, names, boxes)]
    image, masks = render(objects, background, int(size), rng)
    return Scene(image=image, masks=masks, objects=objects, background=background,
                 caption=make_caption(objects, background), seed=int(seed), size=int(size))


def is_held_out(scene: Scene) -> bool:
    """Whether the scene shows any (color, shape) combination reserved for evaluation."""
    return any((o.color, o.shape) in HELD_OUT for o in scene.objects)


# ------------------------------------------------------------------------------------------ files


def concepts_record(scene: Scene) -> dict:
    """The concepts.json content: image and mask file names, caption, and each concept's attributes."""
    concepts = [dict(o.to_dict(), kind="object", mask=f"mask_{o.name}.png") for o in scene.objects]
    concepts.append({"name": "background", "kind": "background", "mask": "mask_background.png",
                     "color": scene.background.color, "texture": scene.background.texture})
    return {"image": "image.png", "caption": scene.caption, "seed": scene.seed, "size": scene.size,
            "concepts": concepts}


def write_scene(scene: Scene, out_dir: str) -> dict:
    """Write image.png, mask_<name>.png (L mode, 0/255), caption.txt and concepts.json; raises OSError."""
    os.makedirs(out_dir, exist_ok=True)
    record = concepts_record(scene)
    Image.fromarray(scene.image, "RGB").save(os.path.join(out_dir, record["image"]))
    for concept in record["concepts"]:
        mask = scene.masks[concept["name"]].astype(np.uint8) * 255
        Image.fromarray(mask, "L").save(os.path.join(out_dir, concept["mask"]))
    with open(os.path.join(out_dir, "caption.txt"), "w", encoding="utf-8") as f:
        f.write(scene.caption + "\n")
    with open(os.path.join(out_dir, "concepts.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.toy.scene",
                                description="Write one seeded toy scene with its masks, caption and concepts.json.")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--size", type=int, default=64, help=f"image side in pixels, >= {MIN_SIZE} (default 64)")
    p.add_argument("--objects", type=int, choices=sorted(SIDE_RANGE), default=None,
                   help="number of objects (default: 1-3, drawn from the seed)")
    p.add_argument("--exclude-held-out", action="store_true",
                   help="never draw the (color, shape) combinations in HELD_OUT")
    args = p.parse_args(argv)
    if args.size < MIN_SIZE:
        p.error(f"--size must be >= {MIN_SIZE}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scene = make_scene(args.seed, args.size, args.objects, HELD_OUT if args.exclude_held_out else frozenset())
    try:
        write_scene(scene, args.out)
    except OSError as e:
        print(f"error: cannot write the scene into {args.out!r}: {e}", file=sys.stderr)
        return 2
    print(f"{scene.caption}\n-> {os.path.join(args.out, 'concepts.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
