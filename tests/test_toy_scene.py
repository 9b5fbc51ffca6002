"""Toy scenes: determinism, exact mask partitions, sizes, held-out combinations, captions and the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxconcept.toy import scene as S


def _same_scene(a: S.Scene, b: S.Scene) -> bool:
    return (np.array_equal(a.image, b.image) and a.caption == b.caption and a.objects == b.objects
            and a.masks.keys() == b.masks.keys() and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks))


def test_same_seed_gives_the_same_scene_and_different_seeds_differ():
    assert _same_scene(S.make_scene(7), S.make_scene(7))
    assert _same_scene(S.make_scene(7, 32, 2), S.make_scene(7, 32, 2))
    assert not np.array_equal(S.make_scene(7).image, S.make_scene(8).image)
    assert len({S.make_scene(seed).caption for seed in range(30)}) >= 25


def test_scene_content_does_not_depend_on_the_size():
    for seed in range(10):
        small, large = S.make_scene(seed, 32), S.make_scene(seed, 64)
        assert small.caption == large.caption and small.objects == large.objects
        assert small.image.shape == (32, 32, 3) and large.image.shape == (64, 64, 3)


@pytest.mark.parametrize("size", [32, 64])
def test_masks_partition_the_image_and_objects_are_sizeable(size):
    counts = set()
    for seed in range(100):
        scene = S.make_scene(seed, size)
        counts.add(len(scene.objects))
        assert list(scene.masks) == [o.name for o in scene.objects] + ["background"]
        stack = np.stack(list(scene.masks.values()))
        assert stack.dtype == bool and stack.shape[1:] == (size, size)
        np.testing.assert_array_equal(stack.sum(axis=0), 1, err_msg=f"seed {seed}")
        assert scene.masks["background"][[0, -1]].all() and scene.masks["background"][:, [0, -1]].all()
        for obj in scene.objects:
            mask = scene.masks[obj.name]
            share = mask.mean()
            assert 0.015 <= share <= 0.2, (seed, obj.name, share)
            rows, cols = np.nonzero(mask)
            cells = 16 / size  # a 16 x 16 latent grid
            assert (np.ptp(rows) + 1) * cells >= 3 and (np.ptp(cols) + 1) * cells >= 3, (seed, obj.name)
            # every object pixel shows the object's colour or its pattern shade
            pixels = {tuple(p) for p in scene.image[mask]}
            assert pixels <= {S.COLORS[obj.color], S.pattern_shade(obj.color)}, (seed, obj.name)
            assert obj.color in S.compatible_colors(scene.background.color)
    assert counts == {1, 2, 3}


def test_object_count_can_be_chosen_and_bad_arguments_are_refused():
    for n in (1, 2, 3):
        assert all(len(S.make_scene(seed, 32, n).objects) == n for seed in range(10))
    with pytest.raises(ValueError, match="num_objects"):
        S.make_scene(0, 64, 4)
    with pytest.raises(ValueError, match="size"):
        S.make_scene(0, 8)


@pytest.mark.parametrize("size", [32, 64])
def test_patterns_keep_the_object_colour_dominant(size):
    for seed in range(60):
        scene = S.make_scene(seed, size)
        for obj in scene.objects:
            mask = scene.masks[obj.name]
            shade = np.all(scene.image[mask] == S.pattern_shade(obj.color), axis=-1).mean()
            if obj.pattern == "solid":
                assert shade == 0
            else:
                assert 0.1 <= shade <= 0.45, (seed, obj.name, shade)


def test_exclude_is_honoured_and_leaves_other_scenes_unchanged():
    held_out_seen = 0
    for seed in range(150):
        restricted = S.make_scene(seed, 32, exclude=S.HELD_OUT)
        assert not S.is_held_out(restricted)
        assert all((o.color, o.shape) not in S.HELD_OUT for o in restricted.objects)
        full = S.make_scene(seed, 32)
        if S.is_held_out(full):
            held_out_seen += 1
        else:
            assert _same_scene(full, restricted), seed
    assert held_out_seen > 0  # the exclusion was exercised
    no_red = frozenset(("red", shape) for shape in S.SHAPES)
    assert all(o.color != "red" for seed in range(50) for o in S.make_scene(seed, 32, exclude=no_red).objects)
    everything = {(c, s) for c in S.COLORS for s in S.SHAPES}
    with pytest.raises(ValueError, match="exclude"):
        S.make_scene(0, exclude=everything)


def test_captions_name_every_object_and_the_background_in_vocabulary_words():
    vocab = set(S.vocabulary())
    assert all(w.isascii() and w.isalpha() and w.islower() for w in vocab)
    assert {"a", "and", "on", "background", "photo", "of"} <= vocab
    for seed in range(100):
        scene = S.make_scene(seed)
        words = scene.caption.split()
        assert set(words) <= vocab, scene.caption
        assert len(words) + 2 < 30  # start and end tokens; every vocabulary word is one token
        for obj in scene.objects:
            assert " ".join(obj.words) in scene.caption and {obj.color, obj.shape} <= set(words)
            if obj.pattern != "solid":
                assert obj.pattern in words
        assert scene.caption.endswith(" on a " + " ".join(scene.background.words))
        assert scene.background.color in words and words[-1] == "background"


def test_caption_grammar_and_unique_names():
    objects = [S.SceneObject("red", "circle", "striped", "red_striped_circle", (0, 0, 0)),
               S.SceneObject("orange", "square", "solid", "orange_square", (0, 0, 0))]
    caption = S.make_caption(objects, S.Background("teal", "grass"))
    assert caption == "a red striped circle and an orange square on a teal grass background"
    assert S.make_caption(objects[1:], S.Background("gray", "plain")) == "an orange square on a gray background"
    words = [("red", "circle"), ("red", "circle"), ("blue", "square"), ("red", "circle")]
    assert S._unique_names(words) == ["red_circle", "red_circle_2", "blue_square", "red_circle_3"]
    for seed in range(100):
        names = [o.name for o in S.make_scene(seed, 32).objects]
        assert len(set(names)) == len(names)


def test_cli_writes_image_masks_caption_and_concepts(tmp_path, capsys):
    out = tmp_path / "scene7"
    assert S.main(["--seed", "7", "--out", str(out), "--size", "32", "--objects", "2"]) == 0
    scene = S.make_scene(7, 32, 2)
    record = json.loads((out / "concepts.json").read_text())
    assert record["image"] == "image.png" and record["caption"] == scene.caption
    assert (out / "caption.txt").read_text().strip() == scene.caption
    assert np.array_equal(np.asarray(Image.open(out / "image.png").convert("RGB")), scene.image)
    assert [c["name"] for c in record["concepts"]] == [o.name for o in scene.objects] + ["background"]
    for concept, obj in zip(record["concepts"], scene.objects):
        assert concept["kind"] == "object"
        assert (concept["color"], concept["shape"], concept["pattern"]) == (obj.color, obj.shape, obj.pattern)
    assert record["concepts"][-1] == {"name": "background", "kind": "background", "mask": "mask_background.png",
                                      "color": scene.background.color, "texture": scene.background.texture}
    for concept in record["concepts"]:
        assert concept["mask"] == f"mask_{concept['name']}.png"
        with Image.open(out / concept["mask"]) as img:
            assert img.mode == "L"
            mask = np.asarray(img)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, scene.masks[concept["name"]])
    assert scene.caption in capsys.readouterr().out


def test_cli_reports_an_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert S.main(["--seed", "1", "--out", str(blocker / "scene")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the scene") and "Traceback" not in err


@pytest.mark.parametrize("args", [["--size", "8"], ["--objects", "4"], ["--seed", "x"]])
def test_cli_refuses_bad_arguments(tmp_path, args):
    with pytest.raises(SystemExit) as e:
        S.main(["--out", str(tmp_path)] + args)
    assert e.value.code == 2
