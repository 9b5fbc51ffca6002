"""Image files in and out: RGB as it is displayed, fitted to the training frame, as float arrays in [-1, 1].

Reading (`open_rgb`): the EXIF orientation is applied (a phone photo shot upright is read upright); 16-bit
greyscale is scaled to 8 bits (not clipped to white); palette, CMYK, greyscale and 1-bit images are converted to
RGB; transparent pixels (RGBA, LA, palette with transparency) are composited over white.

Fitting (`placement`, `place`), `resize`:
  * "crop" (default): scaled to cover the frame, the centre kept; the sides beyond it are cut away.
  * "pad": scaled to fit inside the frame, centred, the rest filled with mid grey: the whole image is kept.
    User masks and ground truth get the same placement, with the padding outside every mask, and the learner
    keeps the padding outside every estimated mask too: no concept is learned from it.
An image is refused when it would have to be enlarged more than MAX_UPSCALE times (`check_size`), and a
warning says how much is cut away (crop) or padding (pad) when that is more than WARN_SHARE of it (`fit_note`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import JaxconceptError

RESIZE_MODES = ("crop", "pad")
MAX_UPSCALE = 4  # an image may be enlarged at most this many times to fill the frame
WARN_SHARE = 0.5  # warn when more than this share is cropped away, or of the frame is padding
PAD_GREY = 128  # the padding colour (all three channels): about 0 in [-1, 1]
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(JaxconceptError):
    """An image file that cannot be used."""


# ------------------------------------------------------------------------------------------ reading


def open_oriented(path: str, what: str = "image") -> Image.Image:
    """The file's image, loaded, with its EXIF orientation applied; ImageError if missing or unreadable."""
    if os.path.isdir(path):
        raise ImageError(f"{what} {path!r} is a folder, not an image file: give the file itself")
    if not os.path.isfile(path):
        raise ImageError(f"{what} {path!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{what} {path!r} cannot be read ({e}); is it a complete PNG/JPEG/WebP file?") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode: 16-bit and 32-bit greyscale scaled to 8 bits, transparency composited over white."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        return Image.fromarray(_grey_to_u8(np.asarray(img), img.mode), "L").convert("RGB")
    if img.mode in _ALPHA or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def _grey_to_u8(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey from 16-bit ("I;16*", and "I", which PIL uses for 16-bit PNGs too) or float ("F", 0..1) values."""
    values = values.astype(np.float64)
    if mode == "F":
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    else:
        top = max(65535.0, float(values.max(initial=0)))  # 32-bit "I" beyond 16 bits: its own range
    return np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)


def open_rgb(path: str) -> Image.Image:
    """The image as it is displayed, in RGB (see the module docstring)."""
    return to_rgb(open_oriented(path))


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation."""
    return open_oriented(path).size


# ------------------------------------------------------------------------------------------ fitting


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a source image lands in the training frame: `box` (left, top, right, bottom) of the source that is
    kept, resized to `paste` (x, y, width, height) of the `out_hw` frame; the rest of the frame is padding."""

    src_wh: tuple[int, int]
    out_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    paste: tuple[int, int, int, int]
    mode: str

    @property
    def scale(self) -> float:
        """How many times the kept part is enlarged (below 1: reduced)."""
        return self.paste[2] / max(self.box[2] - self.box[0], 1)

    @property
    def cropped_share(self) -> float:
        kept = (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])
        return 1.0 - kept / (self.src_wh[0] * self.src_wh[1])

    @property
    def padded_share(self) -> float:
        return 1.0 - self.paste[2] * self.paste[3] / (self.out_hw[0] * self.out_hw[1])


def placement(src_wh: tuple[int, int], out_hw: tuple[int, int], mode: str = "crop") -> Placement:
    """The placement of a `src_wh` image in an `out_hw` frame by `mode` ("crop" or "pad")."""
    if mode not in RESIZE_MODES:
        raise ImageError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    (w, h), (out_h, out_w) = src_wh, out_hw
    if mode == "crop":
        scale = max(out_w / w, out_h / h)
        crop_w, crop_h = round(out_w / scale), round(out_h / scale)
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        return Placement(src_wh, out_hw, (left, top, left + crop_w, top + crop_h), (0, 0, out_w, out_h), mode)
    scale = min(out_w / w, out_h / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    paste = ((out_w - new_w) // 2, (out_h - new_h) // 2, new_w, new_h)
    return Placement(src_wh, out_hw, (0, 0, w, h), paste, mode)


def place(img: Image.Image, p: Placement, resample=Image.LANCZOS, fill=PAD_GREY) -> Image.Image:
    """`img` (of size `p.src_wh`) in the frame: the kept box resized into the paste rectangle, `fill` around it."""
    x, y, pw, ph = p.paste
    part = img.resize((pw, ph), resample, box=p.box)
    if (pw, ph) == (p.out_hw[1], p.out_hw[0]):
        return part
    frame = Image.new(img.mode, (p.out_hw[1], p.out_hw[0]), fill if img.mode != "RGB" else (fill,) * 3)
    frame.paste(part, (x, y))
    return frame


def valid_region(p: Placement) -> np.ndarray:
    """H x W bool: True where the frame shows the image, False on padding."""
    x, y, pw, ph = p.paste
    out = np.zeros(p.out_hw, bool)
    out[y:y + ph, x:x + pw] = True
    return out


def check_size(path: str, p: Placement) -> None:
    """ImageError when the image would be enlarged more than MAX_UPSCALE times to fill the frame."""
    if p.scale <= MAX_UPSCALE:
        return
    (w, h), (out_h, out_w) = p.src_wh, p.out_hw
    min_w, min_h = math.ceil(out_w / MAX_UPSCALE), math.ceil(out_h / MAX_UPSCALE)
    need = (f"at least {min_w}x{min_h} pixels" if p.mode == "crop"
            else f"at least {min_w} pixels wide or {min_h} pixels high")
    raise ImageError(f"image {path!r} is {w}x{h} pixels (width x height), too small for training at {out_w}x{out_h}: "
                     f"it needs {need} (it would be enlarged {p.scale:.1f}x; at most {MAX_UPSCALE}x is allowed). "
                     "Use a larger image.")


def fit_note(path: str, p: Placement) -> str | None:
    """A warning when more than WARN_SHARE of the image is cut away (crop) or of the frame is padding (pad)."""
    (w, h), (out_h, out_w) = p.src_wh, p.out_hw
    if p.mode == "crop" and p.cropped_share > WARN_SHARE:
        return (f"image {path!r} is {w}x{h} pixels: the centre crop to the {out_w}x{out_h} training frame cuts away "
                f"{p.cropped_share:.1%} of it; pass --config.resize=pad to keep the whole image")
    if p.mode == "pad" and p.padded_share > WARN_SHARE:
        return (f"image {path!r} is {w}x{h} pixels: padded to the {out_w}x{out_h} training frame, {p.padded_share:.1%} "
                "of the frame is padding (outside every concept's mask)")
    return None


def to_float(img: Image.Image) -> np.ndarray:
    """H x W x 3 float32 in [-1, 1] of an RGB image."""
    return np.asarray(img, np.float32) / 127.5 - 1.0


def load_image(path: str, size: int | tuple[int, int], resize: str = "crop") -> np.ndarray:
    """H x W x 3 float32 in [-1, 1]: the file read as displayed, fitted to `size` (side, or (height, width)) by
    `resize` (Lanczos); ImageError when it is too small for that size."""
    img = open_rgb(path)
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    p = placement(img.size, out_hw, resize)
    check_size(path, p)
    return to_float(place(img, p))


# ------------------------------------------------------------------------------------------ writing


def to_uint8(image_HxWx3: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8."""
    return np.clip(np.round((np.asarray(image_HxWx3, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path)
