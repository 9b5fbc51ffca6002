"""toy/judge.py: samples judged as users see them (found alone, all together, leakage) on rendered pictures."""

import numpy as np
import pytest

from jaxconcept.toy import judge, scene

RING = judge.ToyConcept("<purple_dotted_ring>", "purple", "ring", "dotted")
TRIANGLE = judge.ToyConcept("<red_triangle>", "red", "triangle")


def picture(objects, bg="teal", texture="plain", size=64):
    """A rendered toy picture of (color, shape, pattern) objects on a background."""
    boxes = [(0.12, 0.12, 0.36), (0.55, 0.52, 0.36)][:len(objects)]
    objs = [scene.SceneObject(c, s, p, f"o{i}", box) for i, ((c, s, p), box) in enumerate(zip(objects, boxes))]
    image, _ = scene.render(objs, scene.Background(bg, texture), size, np.random.default_rng(0))
    return image


def test_words_and_prompts_match_the_toy_captions():
    assert RING.words == "a purple dotted ring"
    assert judge.ToyConcept("<o>", "orange", "square").words == "an orange square"
    got = judge.prompts([TRIANGLE, RING], "teal water background")
    assert [p["kind"] for p in got] == ["alone", "alone", "together"]
    assert got[1]["tokens"] == "a <purple_dotted_ring> on a teal water background"
    assert got[2]["words"] == "a red triangle and a purple dotted ring on a teal water background"
    assert judge.background_color("teal water background") == "teal"
    bare = judge.prompts([TRIANGLE, RING], judge.BARE)  # as `generate --run` prompts: no background phrase
    assert [p["tokens"] for p in bare] == ["a <red_triangle>", "a <purple_dotted_ring>",
                                           "a <red_triangle> and a <purple_dotted_ring>"]
    assert bare[2]["words"] == "a red triangle and a purple dotted ring"
    assert judge.background_color(judge.BARE) is None


def test_the_asked_object_alone_is_found_without_leaks():
    got = judge.judge_single(picture([("purple", "ring", "dotted")]), RING, [TRIANGLE], "gray", "teal")
    assert got == {"found": True, "leaks": {"other": False, "mixed": False, "background": False}, "leaked": False}


def test_a_purple_triangle_for_the_ring_is_a_mixed_leak_not_a_find():
    # what the issue saw: <purple_dotted_ring> learned beside a red triangle draws purple triangles
    got = judge.judge_single(picture([("purple", "triangle", "solid")]), RING, [TRIANGLE], "gray", "teal")
    assert not got["found"] and got["leaks"]["mixed"] and not got["leaks"]["other"] and got["leaked"]


def test_the_other_source_object_and_the_source_background_leak():
    pic = picture([("purple", "ring", "dotted"), ("red", "triangle", "solid")], bg="gray")
    got = judge.judge_single(pic, RING, [TRIANGLE], "gray", "teal")
    assert got["found"] and got["leaks"] == {"other": True, "mixed": False, "background": True}
    # the source background is no leak where it was asked for
    assert not judge.judge_single(pic, RING, [TRIANGLE], "gray", "gray")["leaks"]["background"]


def test_together_needs_every_named_object_in_one_image():
    both = picture([("purple", "ring", "dotted"), ("red", "triangle", "solid")])
    one = picture([("red", "triangle", "solid")])
    assert judge.judge_together(both, [TRIANGLE, RING]) == {"found": [True, True], "all": True}
    assert judge.judge_together(one, [TRIANGLE, RING]) == {"found": [True, False], "all": False}


def test_summaries_are_per_concept_and_for_all_together_not_means_over_rows():
    measured = judge.prompts([TRIANGLE, RING])
    pics = [[picture([("red", "triangle", "solid")])] * 2,                       # triangle: 2 of 2
            [picture([("purple", "triangle", "solid")]), picture([("purple", "ring", "dotted")])],  # ring: 1 of 2
            [picture([("red", "triangle", "solid")])] * 2]                       # together: triangle only
    s = judge.summarize(measured, judge.judge(pics, measured, [TRIANGLE, RING], "gray", "teal"))
    assert s["found"] == {"<red_triangle>": 1.0, "<purple_dotted_ring>": 0.5}
    assert s["found_mean"] == pytest.approx(0.75) and s["together"] == 0.0   # a mean over rows would say 0.5
    assert s["leakage"] == pytest.approx(0.25) and s["leaks"]["mixed"] == pytest.approx(0.25)
    words = dict(s, found={"<red_triangle>": 1.0, "<purple_dotted_ring>": 1.0}, found_mean=1.0, together=0.5,
                 leakage=0.0)
    r = judge.report(s, words)
    assert r["weakest_ratio"] == 0.5 and r["found_ratio"] == 0.75 and r["together_ratio"] == 0.0
    assert r["leakage_excess"] == pytest.approx(0.25)
    assert judge.ratio(0.0, 0.0) == 1.0 and judge.ratio(None, 1.0) is None
