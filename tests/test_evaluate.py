"""Batch evaluation: prompt expansion, scores on constructed cases (a scene's own image must be found and be
its own best CLIP match), and the whole command on the toy model with files a browser shows."""

import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jaxconcept import config, evaluate, generate
from jaxconcept.eval import metrics
from jaxconcept.model import tokens
from jaxconcept.parallel import sharding
from jaxconcept.runio import outputs
from jaxconcept.errors import JaxconceptError
from jaxconcept.model.loading import load_model
from jaxconcept.toy import scene as toy_scene


def _concept(token, kind="object", ref=None, iou=None):
    return evaluate.Concept(token, kind, evaluate.describe(token, None), ref, evaluate.toy_attributes(token), iou)


def test_toy_tokens_spell_out_their_attributes():
    assert evaluate.toy_attributes("<purple_dotted_ring>") == {"color": "purple", "shape": "ring", "pattern": "dotted"}
    assert evaluate.toy_attributes("<red_triangle_s7>") == {"color": "red", "shape": "triangle", "pattern": "solid"}
    assert evaluate.toy_attributes("<dog>") is None
    assert evaluate.describe("<purple_dotted_ring>", "purple") == "purple dotted ring"
    assert evaluate.describe("<v1>", "dog") == "dog" and evaluate.describe("<my_dog>", None) == "my dog"


def test_templates_expand_per_concept_and_all_together():
    cs = [_concept("<red_circle>"), _concept("<blue_square>"), _concept("<background>", "background")]
    got = evaluate.expand_templates(["a {} on a teal water background", "a {all} here"], cs, "a {}", " and a ")
    assert [g["prompt"] for g in got] == ["a <red_circle> on a teal water background",
                                          "a <blue_square> on a teal water background",
                                          "a <red_circle> and a <blue_square> here"]
    assert got[2]["words"] == "a red circle and a blue square here" and got[2]["concepts"] == ["<red_circle>",
                                                                                                "<blue_square>"]
    with pytest.raises(JaxconceptError, match="names no concept"):
        evaluate.expand_templates(["a photo"], cs, "a {}", " and ")


def test_reference_crop_is_the_mask_box_with_a_margin():
    img = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:20, 20:30] = True
    assert evaluate.reference_crop(img, mask).shape == (12, 12, 3)
    assert evaluate.reference_crop(img, np.zeros_like(mask)).shape == (40, 40, 3)


@pytest.fixture(scope="module")
def clip():
    return metrics.load_clip("tiny-clip")


def test_scores_on_constructed_cases(clip):
    """The true scene as 'generated' images: the toy analysis finds both objects; an image is its own
    reference (CLIP-I 1); identical images have zero diversity; a blank image finds nothing."""
    s = toy_scene.make_scene(340, 64, 2)  # a red triangle and a purple dotted ring
    toks = {"<red_triangle>": _concept("<red_triangle>", ref=s.image),
            "<purple_dotted_ring>": _concept("<purple_dotted_ring>", ref=s.image)}
    prompt = {"prompt": "x", "words": "a red triangle and a purple dotted ring", "template": "{all}",
              "concepts": list(toks)}
    records, per_prompt = evaluate.score_images(np.stack([s.image, s.image]), prompt, toks, clip, toy=True)
    for rec in records:
        assert rec["toy_all_found"]
        for token in toks:
            assert rec["concepts"][token]["toy_found"] and rec["concepts"][token]["toy_pattern"]
            assert rec["concepts"][token]["clip_i"] == pytest.approx(1.0, abs=1e-5)
            assert "present_clip" in rec["concepts"][token]
        assert -1.0 <= rec["clip_t"] <= 1.0
    assert per_prompt["diversity"] == pytest.approx(0.0, abs=1e-6)
    blank = np.full((2, 64, 64, 3), 128, np.uint8)
    records, per_prompt = evaluate.score_images(blank, prompt, toks, clip, toy=True)
    assert not any(r["toy_all_found"] for r in records) and per_prompt["diversity"] == pytest.approx(0, abs=1e-6)
    assert records[0]["concepts"]["<red_triangle>"]["clip_i"] < 1.0 - 1e-4


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished run on the toy model, as the learner writes it, with rows from the init words."""
    run = tmp_path_factory.mktemp("toy_run")
    s = toy_scene.make_scene(340, 64, 2)
    base = load_model("toy")
    names = {"<red_triangle>": ("red_triangle", "red", "object"),
             "<purple_dotted_ring>": ("purple_dotted_ring", "purple", "object"),
             "<background>": ("background", "background", "background")}
    table = np.asarray(tokens.embedding_table(base.params["text_encoder"]))
    rows = np.stack([table[base.tokenizer(w, add_special_tokens=False).input_ids[0]] for _, w, _ in names.values()])
    outputs.save_concepts(str(run / "concepts.safetensors"), list(names), rows, [w for _, w, _ in names.values()])
    cfg = config.get_config()
    cfg.joint.steps = 0
    (run / "config.json").write_text(cfg.to_json())
    os.makedirs(run / "images")
    Image.fromarray(s.image).save(run / "images" / "image.png")
    os.makedirs(run / "masks" / "final")
    for token, (name, _, _) in names.items():
        Image.fromarray(s.masks[name].astype(np.uint8) * 255).save(run / "masks" / "final" / f"image__{name}.png")
    summary = {"tokens": list(names), "mode": "em", "template": cfg.template, "joiner": cfg.joiner,
               "iou_final": {"<red_triangle>": 0.9, "<purple_dotted_ring>": 0.5, "<background>": 0.95},
               "concepts": [{"token": t, "kind": k, "init_word": w, "image": "images/image.png",
                             "mask": f"masks/final/image__{n}.png"} for t, (n, w, k) in names.items()]}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_the_closing_check_judges_new_background_and_bare_prompts(toy_run):
    # the train command's closing check: the judge's prompts ("... on a teal water background") and the bare ones
    # `generate --run` writes, each beside the words (docs/concepts_back.md §15: the two can disagree)
    lines = evaluate.check_toy_run(str(toy_run), num_images=2)
    assert "new background" in lines[1] and "bare (generate)" in lines[1]
    assert any(line.strip().startswith("<purple_dotted_ring> found alone") for line in lines)
    got = json.loads((toy_run / "samples_check.json").read_text())
    assert got["prompts"][0]["tokens"] == "a <red_triangle> on a teal water background"
    assert [p["tokens"] for p in got["bare"]["prompts"]] == [
        "a <red_triangle>", "a <purple_dotted_ring>", "a <red_triangle> and a <purple_dotted_ring>"]
    assert got["bare"]["prompts"][1]["words"] == "a purple dotted ring"
    assert got["bare"]["tokens"]["leaks"]["background"] == 0.0  # no background asked: none can leak
    rows = 2 * 2 * 3  # (new background, bare) x (tokens, words) x (two alone, together)
    assert np.asarray(Image.open(toy_run / "samples_check.png")).shape[0] >= rows * 64


def test_evaluation_end_to_end_on_the_toy_model(toy_run, tmp_path, clip):
    import jax

    out = tmp_path / "eval"
    settings = generate.Settings(num_images=2, steps=4, guidance=7.5, seed=0)
    # one device: a batch sharded over several computes what one device does (tests/test_generate.py), and
    # evaluation over two processes equals this process's (tests/test_multihost.py)
    result = evaluate.evaluate([str(toy_run)], list(evaluate.TOY_TEMPLATES), str(out), settings, clip,
                               mesh=sharding.make_mesh(jax.devices()[:1]), progress=False)
    # 2 single-object prompts + 1 with both objects, 2 images each
    assert result["overall"]["prompts"] == 3 and result["overall"]["images"] == 6
    for key in ("clip_i", "clip_t", "diversity", "toy_found", "presence_clip_multi", "mask_iou"):
        assert result["overall"][key] is not None, key
    assert result["overall"]["mask_iou"] == pytest.approx((0.9 + 0.5) / 2)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 1 + 2 * 1 + 2 * 2  # image x concept rows
    assert {r["concept"] for r in rows} == {"<red_triangle>", "<purple_dotted_ring>"}
    page = (out / "index.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    # samples, the words oracle's samples (same prompts in words, base model), 3 references
    assert len(srcs) == 6 + 6 + 3 and all((out / s).is_file() for s in srcs)
    assert sum("/words/" in s for s in srcs) == 6 and "the base model given the words" in page
    # what users see, beside the words oracle: per run and overall, and per prompt and sample
    for key in evaluate.TOY_FIGURES:
        assert 0.0 <= result["overall"]["toy_" + key] <= 1.0, key
    toy = result["runs"][str(toy_run)]["toy"]
    assert set(toy["tokens"]["found"]) == {"<red_triangle>", "<purple_dotted_ring>"}
    assert toy["tokens"]["together"] is not None and set(toy["report"]) >= {"found_ratio", "weakest_ratio"}
    assert len(toy["per_prompt"]) == 3 and all(len(v["tokens"]) == 2 for v in toy["per_prompt"].values())
    assert "a &lt;red_triangle&gt; and a &lt;purple_dotted_ring&gt; on a beige sand background" in page


@pytest.mark.parametrize("argv,message", [
    ([], "no run given"),
    (["--run", "/nonexistent"], "does not exist"),
])
def test_cli_bad_input(argv, message, tmp_path, capsys):
    assert evaluate.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_cli_template_without_a_concept_and_unfinished_run(toy_run, tmp_path, capsys):
    assert evaluate.main(["--run", str(toy_run), "--template", "a photo", "--num-images", "1", "--steps", "1",
                          "--out", str(tmp_path / "o")]) == 2
    assert "names no concept" in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    assert evaluate.main(["--run", str(tmp_path / "unfinished"), "--out", str(tmp_path / "o")]) == 2
    assert "not a finished run" in capsys.readouterr().err
