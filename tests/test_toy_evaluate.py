"""The toy quality gates, end to end on an untrained tiny toy model saved as a folder."""

import json

from jaxconcept.model import loading as model
from jaxconcept.toy import evaluate, sd


def test_gates_command_on_a_saved_model(tmp_path):
    model.save_flax(sd.random_toy("tiny"), str(tmp_path / "m"))
    out = tmp_path / "gates"
    rc = evaluate.main(["--model", str(tmp_path / "m"), "--seeds", "4-5", "--timesteps", "4", "--steps", "2",
                        "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "gates.json").read_text())
    s = result["summary"]
    assert s["scenes"] == 2 and s["objects"] == len(result["attention"]) >= 2
    for key in ("attention_iou", "attention_iou_crf", "attention_iou_shape_word", "samples_objects_found"):
        assert 0.0 <= s[key] <= 1.0, key
    assert all({"iou", "iou_crf", "iou_cleaned"} <= set(r) for r in result["attention"])
    assert (out / "gates.png").stat().st_size > 1000
    assert evaluate.main(["--model", str(tmp_path / "m"), "--seeds", "x-y", "--out", str(out)]) == 2


def test_samples_only_sweep_with_several_samples_per_caption(tmp_path):
    model.save_flax(sd.random_toy("tiny"), str(tmp_path / "m"))
    out = tmp_path / "gates"
    rc = evaluate.main(["--model", str(tmp_path / "m"), "--seeds", "4-5", "--steps", "2", "--samples-only",
                        "--samples-per-scene", "2", "--scheduler", "dpm++", "--guidance", "3", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "gates.json").read_text())
    assert len(result["samples"]) == 4 and "attention" not in result  # 2 scenes x 2 noise seeds
    assert result["summary"]["sampling"] == "dpm++, 2 steps, guidance 3.0"
    assert not (out / "gates.png").exists()
