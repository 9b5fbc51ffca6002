"""User inputs: the command-line and config forms, validation, image and user-mask loading, toy scene folders."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxconcept import JaxconceptError
from jaxconcept.runio.images import ImageError
from jaxconcept.runio.inputs import (
    FORM, ConceptSpec, ImageSpec, InputError, format_concepts_arg, from_toy_scene_folder, load, parse_concepts_arg,
    specs_from_config, validate,
)
from jaxconcept.toy import scene as S

C = ConceptSpec


# ------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize("text, expected", [
    ("dog.jpg:<dog>=dog,<rug>=rug,<room>=room/background",
     ImageSpec("dog.jpg", (C("<dog>", "dog"), C("<rug>", "rug"), C("<room>", "room", "background")))),
    ("scene.png:<v1>=circle@masks/v1.png", ImageSpec("scene.png", (C("<v1>", "circle", mask="masks/v1.png"),))),
    ("scene.png:<v1>", ImageSpec("scene.png", (C("<v1>", None, "object", None),))),
    ("a.png:<v1>@m/v1.png, <v2>=cat/background@m/v2.png , <v3>/object",
     ImageSpec("a.png", (C("<v1>", mask="m/v1.png"), C("<v2>", "cat", "background", "m/v2.png"), C("<v3>")))),
    # ':' in directory names of the image path, and in the mask path
    ("runs/10:30/a:b/x.png:<a>,<b>/background",
     ImageSpec("runs/10:30/a:b/x.png", (C("<a>"), C("<b>", kind="background")))),
    ("x.png:<a>@masks/12:00/a.png", ImageSpec("x.png", (C("<a>", mask="masks/12:00/a.png"),))),
    # Windows drives in the image and in the mask
    (r"C:\pics\dog.jpg:<dog>=dog@D:\m\dog.png,<bg>/background",
     ImageSpec(r"C:\pics\dog.jpg", (C("<dog>", "dog", mask=r"D:\m\dog.png"), C("<bg>", kind="background")))),
    ("C:/pics/dog.jpg:<dog>", ImageSpec("C:/pics/dog.jpg", (C("<dog>"),))),
    # an '@' inside the mask path, commas and spaces in the image path
    ("my pics/a,b.png:v1@m@2.png", ImageSpec("my pics/a,b.png", (C("v1", mask="m@2.png"),))),
])
def test_parse_concepts_arg(text, expected):
    spec = parse_concepts_arg(text)
    assert spec == expected
    assert parse_concepts_arg(format_concepts_arg(spec)) == spec  # the formatter is its inverse


def test_format_concepts_arg_writes_the_short_form_and_refuses_what_it_cannot_write():
    spec = ImageSpec("d.jpg", [C("<d>", "dog"), C("<r>", None, "background", "m.png")])
    assert format_concepts_arg(spec) == "d.jpg:<d>=dog,<r>/background@m.png"
    with pytest.raises(InputError, match="config form"):
        format_concepts_arg(ImageSpec("d.jpg", (C("<a/b>"),)))


@pytest.mark.parametrize("text, fragment", [
    ("dog.jpg", "no ':' between the image and its concepts"),
    (r"C:\dog.jpg", "no ':' between the image and its concepts"),  # a drive letter is not the separator
    (":<a>", "no image before ':'"),
    ("dog.jpg:", "no concepts: give at least one"),
    ("dog.jpg:  ", "no concepts: give at least one"),
    ("dog.jpg:<a>,,<b>", "empty concept"),
    ("dog.jpg:<a>,", "empty concept"),
    ("dog.jpg:<a>=", "nothing after '=' in '<a>='"),
    ("dog.jpg:=dog", "no token in '=dog'"),
    ("dog.jpg:<a>=b=c", "more than one '='"),
    ("dog.jpg:<a>/", "nothing after '/' in '<a>/'"),
    ("dog.jpg:<a>/thing", "kind 'thing' in '<a>/thing' is not one of object, background"),
    ("dog.jpg:<a>/object/x.png", "more than one '/'"),
    ("dog.jpg:<a>@", "nothing after '@' in '<a>@'"),
])
def test_malformed_concepts_args_say_what_and_the_expected_form(text, fragment):
    with pytest.raises(InputError) as e:
        parse_concepts_arg(text)
    msg = str(e.value)
    assert fragment in msg and FORM in msg and "e.g. 'dog.jpg:<dog>=dog" in msg and repr(text) in msg
    assert isinstance(e.value, JaxconceptError)


def test_parse_validates_tokens():
    with pytest.raises(InputError, match="'<a>' is given twice for image 'dog.jpg'"):
        parse_concepts_arg("dog.jpg:<a>=dog,<a>=rug")
    with pytest.raises(InputError, match="contains whitespace"):
        parse_concepts_arg("dog.jpg:my dog")
    with pytest.raises(InputError, match="the concepts argument must be a string"):
        parse_concepts_arg(None)


# ------------------------------------------------------------------------------------------ config


def test_specs_from_config_dicts_configdicts_and_strings():
    entries = [
        {"path": "a.png", "concepts": [{"token": "<a>", "init_word": "dog"},
                                       {"token": "<b>", "kind": "background", "mask": "m/b.png", "init_word": ""}]},
        ml_collections.ConfigDict({"path": "b.png",
                                   "concepts": [{"token": "<c>", "init_word": None}, "<d>=cat@m.png"]}),
        "c.png:<e>/background",
    ]
    specs = specs_from_config(entries)
    assert specs == (
        ImageSpec("a.png", (C("<a>", "dog"), C("<b>", None, "background", "m/b.png"))),
        ImageSpec("b.png", (C("<c>"), C("<d>", "cat", mask="m.png"))),
        ImageSpec("c.png", (C("<e>", kind="background"),)),
    )
    # FrozenConfigDict cannot hold dicts inside tuples, but it can hold strings, and frozen entries map fine
    frozen = ml_collections.FrozenConfigDict({"images": ("a.png:<a>=dog",),
                                              "one": {"path": "b.png", "concepts": ("<b>", "<c>/background")}})
    assert specs_from_config(frozen.images) == (ImageSpec("a.png", (C("<a>", "dog"),)),)
    assert specs_from_config([frozen.one]) == (ImageSpec("b.png", (C("<b>"), C("<c>", kind="background"))),)


@pytest.mark.parametrize("entries, fragments", [
    ([{"path": "a.png", "concept": []}], ["unknown key 'concept'", "did you mean 'concepts'", "path, concepts"]),
    ([{"path": "a.png", "concepts": [{"token": "<a>", "init": "dog"}]}],
     ["concept 0 of image entry 0 ('a.png')", "unknown key 'init'", "token, init_word, kind, mask"]),
    ([{"concepts": [{"token": "<a>"}]}], ["has no 'path'"]),
    ([{"path": "a.png", "concepts": [{"init_word": "dog"}]}], ["has no 'token'"]),
    ([{"path": "a.png", "concepts": "<a>"}], ["'concepts' must be a list"]),
    ([{"path": "a.png"}], ["no concepts: give at least one concept token for image 'a.png'"]),
    ([{"path": "a.png", "concepts": [{"token": "<a>", "mask": 3}]}], ["'mask' must be a string"]),
    ({"path": "a.png", "concepts": []}, ["must be a list"]),
    ("a.png:<a>", ["must be a list"]),
    ([], ["no images: give at least one image"]),
])
def test_bad_configs(entries, fragments):
    with pytest.raises(InputError) as e:
        specs_from_config(entries)
    for fragment in fragments:
        assert fragment in str(e.value)


# ------------------------------------------------------------------------------------------ validation


def test_validate_errors():
    with pytest.raises(InputError, match="no images"):
        validate([])
    with pytest.raises(InputError, match="no concepts: give at least one concept token for image 'a.png'"):
        validate([ImageSpec("a.png", ())])
    with pytest.raises(InputError, match=r"'<a>' is given for both 'a.png' and 'b.png'"):
        validate([ImageSpec("a.png", (C("<a>"),)), ImageSpec("b.png", (C("<b>"), C("<a>")))])
    with pytest.raises(InputError, match=r"kind 'thing' of '<a>' is not one of object, background"):
        validate([ImageSpec("a.png", (C("<a>", kind="thing"),))])
    for token in ("", "  ", None):
        with pytest.raises(InputError, match="is empty"):
            validate([ImageSpec("a.png", (C(token),))])
    with pytest.raises(InputError, match="whitespace"):
        validate([ImageSpec("a.png", (C("<a b>"),))])
    with pytest.raises(InputError, match="'./a.png' is listed twice"):
        validate([ImageSpec("a.png", (C("<a>"),)), ImageSpec("./a.png", (C("<b>"),))])
    ok = [ImageSpec("a.png", (C("<a>"), C("<b>"), C("<c>", kind="background"))), ImageSpec("b.png", (C("<d>"),))]
    assert validate(ok) == tuple(ok) and validate(ok[0]) == (ok[0],)


# ------------------------------------------------------------------------------------------ loading


def _save(array, path, mode=None, **kw):
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path, **kw)
    return str(path)


def test_load_png_jpeg_rgba_and_greyscale(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 200
    (tmp_path / "d").mkdir()
    paths = [
        _save(rgb, tmp_path / "a.png"),
        _save(rgb, tmp_path / "a.jpg", quality=95),
        _save(np.dstack([rgb, np.full((40, 60), 255, np.uint8)]), tmp_path / "d" / "a.png", "RGBA"),
        _save(np.full((50, 30), 100, np.uint8), tmp_path / "grey.png", "L"),
    ]
    specs = [ImageSpec(p, (C(f"<v{i}>"),)) for i, p in enumerate(paths)]
    inputs = load(specs, 16)
    assert inputs.images_IxHxWx3.shape == (4, 16, 16, 3) and inputs.images_IxHxWx3.dtype == np.float32
    assert inputs.images_IxHxWx3.min() >= -1 and inputs.images_IxHxWx3.max() <= 1
    np.testing.assert_allclose(inputs.images_IxHxWx3[0, ..., 0], 200 / 127.5 - 1, atol=1e-5)
    np.testing.assert_allclose(inputs.images_IxHxWx3[1, ..., 0], 200 / 127.5 - 1, atol=0.05)  # JPEG loss
    np.testing.assert_allclose(inputs.images_IxHxWx3[2], inputs.images_IxHxWx3[0])
    np.testing.assert_allclose(inputs.images_IxHxWx3[3], 100 / 127.5 - 1, atol=1e-5)
    assert inputs.names == ("a", "a_2", "a_3", "grey")
    assert inputs.tokens == ("<v0>", "<v1>", "<v2>", "<v3>") and inputs.kinds == ("object",) * 4
    assert inputs.user_masks == (None,) * 4 and inputs.user_masks_CxHxW is None
    assert not inputs.has_any_user_masks and not inputs.has_all_user_masks
    assert load(specs[:1], (8, 12)).images_IxHxWx3.shape == (1, 8, 12, 3)
    with pytest.raises(ValueError):  # arrays are read-only: the record is frozen
        inputs.images_IxHxWx3[0, 0, 0, 0] = 0


def test_missing_and_corrupt_images_give_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load([ImageSpec(str(tmp_path / "nope.png"), (C("<a>"),))], 16)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="cannot be read"):
        load([ImageSpec(str(tmp_path / "bad.png"), (C("<a>"),))], 16)


def _wide_scene(tmp_path):
    """120 x 80 (w x h) image with a red box at x 50..70, y 20..60 and masks for the box and the rest."""
    image = np.full((80, 120, 3), 30, np.uint8)
    image[20:60, 50:70] = (230, 20, 20)
    box = np.zeros((80, 120), np.uint8)
    box[20:60, 50:70] = 255
    return (_save(image, tmp_path / "wide.png"), _save(box, tmp_path / "box.png", "L"),
            _save(255 - box, tmp_path / "rest.png", "L"), box)


def test_user_masks_get_the_image_crop_geometry(tmp_path):
    image, box_mask, rest_mask, _ = _wide_scene(tmp_path)
    spec = parse_concepts_arg(f"{image}:<box>=square@{box_mask},<rest>/background@{rest_mask}")
    inputs = load([spec], 40)
    # centre crop x 20..100, scale 1/2: the box lands on rows 10..30, columns 15..25
    box_HxW = inputs.user_masks[0]
    expected = np.zeros((40, 40), bool)
    expected[10:30, 15:25] = True
    np.testing.assert_array_equal(box_HxW, expected)
    np.testing.assert_array_equal(inputs.user_masks[1], ~expected)
    image_HxWx3 = inputs.images_IxHxWx3[0]
    assert np.all(image_HxWx3[11:29, 16:24, 0] > 0.7) and np.all(image_HxWx3[11:29, 16:24, 1] < -0.7)
    assert np.all(image_HxWx3[:, :14, 0] < -0.6) and np.all(image_HxWx3[:, 26:, 0] < -0.6)
    assert inputs.has_all_user_masks and inputs.user_masks_CxHxW.shape == (2, 40, 40)
    assert inputs.user_masks_CxHxW.dtype == bool


def test_rgba_masks_count_transparent_pixels_as_off(tmp_path):
    image, _, _, box = _wide_scene(tmp_path)
    rgba = np.zeros((80, 120, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the box is opaque
    rgba[..., 3] = box
    mask = _save(rgba, tmp_path / "box_rgba.png", "RGBA")
    inputs = load([parse_concepts_arg(f"{image}:<box>@{mask}")], 40)
    assert inputs.user_masks[0].sum() == 20 * 10


def test_user_mask_errors(tmp_path):
    image, box_mask, rest_mask, box = _wide_scene(tmp_path)
    small = _save(np.full((40, 60), 255, np.uint8), tmp_path / "small.png", "L")
    with pytest.raises(InputError) as e:
        load([parse_concepts_arg(f"{image}:<box>@{small}")], 40)
    assert "60x40" in str(e.value) and "120x80" in str(e.value) and small in str(e.value) and image in str(e.value)

    empty = _save(np.zeros((80, 120), np.uint8), tmp_path / "empty.png", "L")
    with pytest.raises(InputError, match=r"mask of '<box>' .* is empty"):
        load([parse_concepts_arg(f"{image}:<box>@{empty}")], 40)

    edge = np.zeros((80, 120), np.uint8)
    edge[:, :15] = 255  # only in the part the centre crop cuts off
    edge_mask = _save(edge, tmp_path / "edge.png", "L")
    with pytest.raises(InputError, match="covers no pixel after the centre crop"):
        load([parse_concepts_arg(f"{image}:<edge>@{edge_mask}")], 40)

    rest = 255 - box
    rest[20:22, 50:70] = 255  # two rows into the box
    overlapping = _save(rest, tmp_path / "overlap.png", "L")
    with pytest.raises(InputError, match=r"masks of '<box>' and '<rest>' overlap on 40 pixels"):
        load([parse_concepts_arg(f"{image}:<box>@{box_mask},<rest>@{overlapping}")], 40)

    with pytest.raises(InputError, match="does not exist"):
        load([parse_concepts_arg(f"{image}:<box>@{tmp_path / 'none.png'}")], 40)


def test_some_masks_missing_is_only_an_error_when_all_masks_are_asked_for(tmp_path):
    image, box_mask, _, _ = _wide_scene(tmp_path)
    inputs = load([parse_concepts_arg(f"{image}:<box>@{box_mask},<rest>/background")], 40)
    assert inputs.has_any_user_masks and not inputs.has_all_user_masks
    assert inputs.user_masks[0].shape == (40, 40) and inputs.user_masks[1] is None
    with pytest.raises(InputError, match="missing for <rest>"):
        inputs.user_masks_CxHxW


def test_four_concepts_over_two_images(tmp_path):
    image, box_mask, rest_mask, _ = _wide_scene(tmp_path)
    other = _save(np.full((64, 64, 3), 90, np.uint8), tmp_path / "wide.jpg")
    specs = specs_from_config([
        f"{image}:<box>=square@{box_mask},<rest>/background@{rest_mask}",
        {"path": other,
         "concepts": [{"token": "<thing>", "init_word": "cup"}, {"token": "<wall>", "kind": "background"}]},
    ])
    inputs = load(specs, 32)
    assert inputs.num_images == 2 and inputs.num_concepts == 4
    assert inputs.names == ("wide", "wide_2")
    assert inputs.tokens == ("<box>", "<rest>", "<thing>", "<wall>")
    assert inputs.init_words == ("square", None, "cup", None)
    assert inputs.kinds == ("object", "background", "object", "background")
    np.testing.assert_array_equal(inputs.owner_C, [0, 0, 1, 1])
    assert inputs.owner_C.dtype == np.int32
    assert inputs.concepts_of(0) == (0, 1) and inputs.concepts_of(1) == (2, 3)
    assert inputs.images_IxHxWx3.shape == (2, 32, 32, 3)
    assert [m is None for m in inputs.user_masks] == [False, False, True, True]


# ------------------------------------------------------------------------------------------ toy scenes


def test_from_toy_scene_folder(tmp_path):
    scene = S.make_scene(3, 32, 2)
    S.write_scene(scene, str(tmp_path / "s3"))
    spec = from_toy_scene_folder(str(tmp_path / "s3"))
    assert spec.path == str(tmp_path / "s3" / "image.png")
    assert [c.token for c in spec.concepts] == [f"<{o.name}>" for o in scene.objects] + ["<background>"]
    assert [c.init_word for c in spec.concepts] == [f"{o.color}+{o.shape}" for o in scene.objects] + ["background"]
    assert [c.kind for c in spec.concepts] == ["object"] * 2 + ["background"]
    assert all(w in S.vocabulary() for c in spec.concepts for w in c.init_word.split("+"))

    inputs = load([spec], 32)  # same size: the crop is the whole image and masks come back exactly
    for concept, mask_HxW in zip(spec.concepts, inputs.user_masks):
        name = concept.token[1:-1]
        np.testing.assert_array_equal(mask_HxW, scene.masks[name])
    np.testing.assert_allclose(inputs.images_IxHxWx3[0], scene.image / 127.5 - 1, atol=1e-5)

    # several scenes together need distinct tokens: the suffix keeps them apart
    S.write_scene(S.make_scene(4, 32, 1), str(tmp_path / "s4"))
    with pytest.raises(InputError, match="'<background>' is given for both"):
        validate([spec, from_toy_scene_folder(str(tmp_path / "s4"))])
    both = load([spec, from_toy_scene_folder(str(tmp_path / "s4"), suffix="_s4")], 32)
    assert both.tokens[-1] == "<background_s4>" and both.names == ("image", "image_2")


def test_from_toy_scene_folder_sanitises_names_and_reports_bad_folders(tmp_path):
    S.write_scene(S.make_scene(5, 32, 1), str(tmp_path))
    record = json.loads((tmp_path / "concepts.json").read_text())
    record["concepts"][0]["name"] = "red circle!"
    (tmp_path / "concepts.json").write_text(json.dumps(record))
    assert from_toy_scene_folder(str(tmp_path)).concepts[0].token == "<red_circle>"

    with pytest.raises(InputError, match="has no concepts.json"):
        from_toy_scene_folder(str(tmp_path / "missing"))
    (tmp_path / "concepts.json").write_text("{")
    with pytest.raises(InputError, match="is not a toy scene record"):
        from_toy_scene_folder(str(tmp_path))
    os.remove(tmp_path / "concepts.json")
    (tmp_path / "concepts.json").write_text(json.dumps({"concepts": [{"kind": "object"}]}))
    with pytest.raises(InputError, match="KeyError"):
        from_toy_scene_folder(str(tmp_path))


def test_from_toy_scene_folder_shape_init(tmp_path):
    scene = S.make_scene(3, 32, 2)
    S.write_scene(scene, str(tmp_path / "s3"))
    spec = from_toy_scene_folder(str(tmp_path / "s3"), init="shape")
    assert [c.init_word for c in spec.concepts] == [o.shape for o in scene.objects] + ["background"]
    both = from_toy_scene_folder(str(tmp_path / "s3"), init="color+shape")
    assert [c.init_word for c in both.concepts] == [f"{o.color}+{o.shape}" for o in scene.objects] + ["background"]
    with pytest.raises(InputError, match="init must be"):
        from_toy_scene_folder(str(tmp_path / "s3"), init="size")
