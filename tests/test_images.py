"""Image files as a user has them: 16-bit, palette, CMYK, transparent and EXIF-rotated files read as displayed;
images too small refused, extreme aspect ratios warned; resize "pad" keeps the whole image and its masks."""

import logging
import os
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxconcept import config
from jaxconcept.em.prepare import prepare
from jaxconcept.runio import images
from jaxconcept.runio.images import ImageError
from jaxconcept.runio.inputs import ConceptSpec as C
from jaxconcept.runio.inputs import ImageSpec, InputError, load, parse_concepts_arg


def _png(path, array, colour_type: int) -> str:
    """A PNG written byte by byte (Pillow cannot write 16-bit colour): 2 = RGB, 6 = RGBA, 0 = grey, 16 bits."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array.reshape(h, w, -1))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return str(path)


def _u8(path) -> np.ndarray:
    return np.asarray(images.open_rgb(str(path)))


def test_16_bit_files_keep_their_values(tmp_path):
    grey = np.array([[0, 257 * 100], [65535, 257 * 200]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")  # Pillow reads it back as mode I;16
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(_u8(tmp_path / "g16.png")[..., 0], [[0, 100], [255, 200]])
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[0, 0] = (65535, 0, 257 * 50)
    rgb[1, 1] = (257 * 10, 257 * 128, 65535)
    np.testing.assert_array_equal(_u8(_png(tmp_path / "rgb16.png", rgb, 2)), np.round(rgb / 257).astype(np.uint8))
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 65535, np.uint16)], axis=-1)
    np.testing.assert_array_equal(_u8(_png(tmp_path / "rgba16.png", rgba, 6)), np.round(rgb / 257).astype(np.uint8))
    np.testing.assert_array_equal(_u8(_png(tmp_path / "grey16.png", grey[..., None], 0))[..., 1], [[0, 100], [255, 200]])
    loaded = images.load_image(str(tmp_path / "g16.png"), 2)  # the case: no longer all white
    np.testing.assert_allclose(loaded[..., 0], np.array([[0, 100], [255, 200]]) / 127.5 - 1, atol=1e-6)


def test_palette_cmyk_and_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_u8(tmp_path / "p.png")[0], [[255, 0, 0], [0, 0, 255]])
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pt.png", transparency=1)
    np.testing.assert_array_equal(_u8(tmp_path / "pt.png")[0], [[255, 0, 0], [255, 255, 255]])  # over white

    cmyk = Image.new("CMYK", (3, 1))
    for x, v in enumerate([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)]):
        cmyk.putpixel((x, 0), v)
    cmyk.save(tmp_path / "c.jpg", quality=100)
    cmyk.save(tmp_path / "c.tif")
    np.testing.assert_array_equal(_u8(tmp_path / "c.tif")[0], [[0, 255, 255], [0, 0, 0], [255, 255, 255]])
    np.testing.assert_allclose(_u8(tmp_path / "c.jpg")[0], [[0, 255, 255], [0, 0, 0], [255, 255, 255]], atol=4)

    rgba = np.array([[[200, 0, 0, 255], [200, 0, 0, 0], [0, 0, 200, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(_u8(tmp_path / "a.png")[0], [[200, 0, 0], [255, 255, 255], [127, 127, 227]], atol=1)
    Image.fromarray(np.array([[[60, 255], [60, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(_u8(tmp_path / "la.png")[0], [[60] * 3, [255] * 3])


def test_exif_rotated_photos_and_their_masks_are_read_upright(tmp_path):
    """Stored 3 wide x 2 high with orientation 6 (shown rotated 90 degrees clockwise): displayed 2 x 3."""
    stored = np.zeros((2, 3, 3), np.uint8)
    stored[0, 0] = (255, 0, 0)  # top-left as stored -> top-right as shown
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    assert images.image_size(str(tmp_path / "r.png")) == (2, 3)
    shown = _u8(tmp_path / "r.png")
    assert shown.shape == (3, 2, 3) and tuple(shown[0, 1]) == (255, 0, 0) and shown[..., 0].sum() == 255
    big = np.zeros((20, 30, 3), np.uint8)
    big[:10, :10] = 255
    Image.fromarray(big).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    mask = np.zeros((30, 20), np.uint8)  # painted on the photo as shown: the white block is at the top right
    mask[:10, 10:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    got = load([parse_concepts_arg(f"{tmp_path / 'photo.jpg'}:<a>@{tmp_path / 'm.png'}")], (30, 20))
    assert np.all(got.images_IxHxWx3[0, 1:9, 11:19] > 0.9) and np.all(got.images_IxHxWx3[0, 12:, :] < -0.9)
    np.testing.assert_array_equal(got.user_masks[0], mask > 0)


def test_too_small_images_are_refused_naming_size_and_minimum(tmp_path):
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "dot.png")
    with pytest.raises(ImageError) as e:
        load([ImageSpec(str(tmp_path / "dot.png"), (C("<a>"),))], 512)
    assert str(e.value) == (f"image {str(tmp_path / 'dot.png')!r} is 1x1 pixels (width x height), too small for "
                            "training at 512x512: it needs at least 128x128 pixels (it would be enlarged 512.0x; at "
                            "most 4x is allowed). Use a larger image.")
    Image.new("RGB", (600, 100)).save(tmp_path / "strip.png")  # crop: its 100 px side limits; pad: its 600 px side
    with pytest.raises(ImageError, match="is 600x100 pixels .* at least 128x128 pixels"):
        load([ImageSpec(str(tmp_path / "strip.png"), (C("<a>"),))], 512)
    assert load([ImageSpec(str(tmp_path / "strip.png"), (C("<a>"),))], 512, "pad").images_IxHxWx3.shape[1] == 512
    Image.new("RGB", (128, 128)).save(tmp_path / "ok.png")
    assert load([ImageSpec(str(tmp_path / "ok.png"), (C("<a>"),))], 512).images_IxHxWx3.shape == (1, 512, 512, 3)


def test_train_cli_refuses_a_too_small_image_with_exit_2(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    root = os.path.dirname(os.path.dirname(os.path.abspath(images.__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    train = lambda *a: subprocess.run([sys.executable, "-m", "jaxconcept.train", "--out", "run", *a], cwd=tmp_path,  # noqa: E731
                                      capture_output=True, text=True, env=env, timeout=300)
    proc = train("--config.model=tiny", "--concepts", "dot.png:<a>=dog")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: image 'dot.png' is 1x1 pixels (width x height), too small for training at 32x32: it needs at least "
        "8x8 pixels (it would be enlarged 32.0x; at most 4x is allowed). Use a larger image.")
    proc = train("--config", "sd15", "--concepts", "dot.png:<a>=dog")  # refused before the model is fetched
    assert proc.returncode == 2 and "error: image 'dot.png' is 1x1 pixels (width x height), too small for training " \
        "at 512x512: it needs at least 128x128 pixels" in proc.stderr, proc.stderr[-2000:]


def test_extreme_aspect_ratios_are_warned_with_the_share(tmp_path, caplog):
    Image.new("RGB", (2000, 50), (200, 10, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.png")  # 4:3, a quarter cropped: no warning
    spec = ImageSpec(str(tmp_path / "wide.png"), (C("<a>"),))
    with caplog.at_level(logging.WARNING, logger="jaxconcept"):
        load([spec, ImageSpec(str(tmp_path / "photo.png"), (C("<b>"),))], 32)
    assert [r.getMessage() for r in caplog.records] == [
        f"image {spec.path!r} is 2000x50 pixels: the centre crop to the 32x32 training frame cuts away 97.5% of it; "
        "pass --config.resize=pad to keep the whole image"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxconcept"):
        load([spec], 32, "pad")
    assert [r.getMessage() for r in caplog.records] == [
        f"image {spec.path!r} is 2000x50 pixels: padded to the 32x32 training frame, 96.9% of the frame is padding "
        "(outside every concept's mask)"]
    with pytest.raises(InputError, match="resize must be one of crop, pad, got 'squash'"):
        load([spec], 32, "squash")


def _tall_scene(tmp_path):
    """40 wide x 80 high: red top half, blue bottom half; masks of the two halves."""
    image = np.zeros((80, 40, 3), np.uint8)
    image[:40] = (250, 0, 0)
    image[40:] = (0, 0, 250)
    top = np.zeros((80, 40), np.uint8)
    top[:40] = 255
    paths = [str(tmp_path / n) for n in ("tall.png", "top.png", "bottom.png")]
    Image.fromarray(image).save(paths[0])
    Image.fromarray(top, "L").save(paths[1])
    Image.fromarray(255 - top, "L").save(paths[2])
    return paths


def test_pad_keeps_the_whole_image_and_places_masks_with_it(tmp_path):
    image, top, bottom = _tall_scene(tmp_path)
    got = load([parse_concepts_arg(f"{image}:<top>@{top},<bottom>/background@{bottom}")], 40, "pad")
    frame = got.images_IxHxWx3[0]  # scaled to 20 x 40, centred: columns 10..30 show the image
    np.testing.assert_allclose(frame[:, :10], images.PAD_GREY / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(frame[:, 30:], images.PAD_GREY / 127.5 - 1, atol=1e-6)
    assert np.all(frame[:19, 10:30, 0] > 0.9) and np.all(frame[21:, 10:30, 2] > 0.9)  # red above, blue below
    expected_top = np.zeros((40, 40), bool)
    expected_top[:20, 10:30] = True
    np.testing.assert_array_equal(got.user_masks[0], expected_top)
    np.testing.assert_array_equal(got.user_masks[1], np.roll(expected_top, 20, axis=0))  # none on the padding
    np.testing.assert_array_equal(got.valid(0), expected_top | np.roll(expected_top, 20, axis=0))
    crop = load([parse_concepts_arg(f"{image}:<top>@{top},<bottom>/background@{bottom}")], 40)
    assert crop.valid_IxHxW is None and crop.valid(0).all() and crop.user_masks[0][:20].all()


def _e_step(setup, maps_fn):
    """The learner's E-step (estep.estimate_masks) with maps from `maps_fn`, CRF off."""
    from jaxconcept.masks import estep

    maps = lambda i, key: maps_fn(None, None, None, None, None, key)  # noqa: E731
    return estep.estimate_masks(maps, setup, jax.random.key(0), estep.MaskRules(0.55, use_crf=False))


def test_the_learner_keeps_the_padding_outside_every_estimated_mask(tiny, tmp_path):
    image, _, _ = _tall_scene(tmp_path)
    cfg = config.get_config()
    cfg.model, cfg.resize, cfg.masks.crf = "tiny", "pad", False
    setup = prepare(cfg, [parse_concepts_arg(f"{image}:<top>=red,<rest>/background")], tiny)

    def maps_fn(rows, frozen, latents, ids, positions, key):  # the object's attention is high everywhere
        return jnp.ones((2,) + setup.latent_hw)

    got, raw, _ = _e_step(setup, maps_fn)
    valid = setup.inputs.valid(0)
    assert not valid.all() and valid.any()
    assert not got[:, ~valid].any() and not raw[:, ~valid].any()  # the padding is in no mask
    assert got[0][valid].all()  # the object claims the whole image

    def padding_maps(rows, frozen, latents, ids, positions, key):  # attention high only on the padding
        object_map = jnp.ones(setup.latent_hw).at[:, 4:12].set(jnp.linspace(0.1, 0.3, 16)[:, None])
        return jnp.stack([object_map, jnp.zeros(setup.latent_hw)])

    got, _, info = _e_step(setup, padding_maps)
    assert got[0].any() and not got[0][~valid].any()  # its fallback lands on the image, not on the padding
