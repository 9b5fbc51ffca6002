"""The toy quality gates, end to end on an untrained tiny toy model saved as a folder."""

import json

from jaxconcept import model
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
    assert 0.0 <= s["attention_iou"] <= 1.0 and 0.0 <= s["samples_objects_found"] <= 1.0
    assert (out / "gates.png").stat().st_size > 1000
    assert evaluate.main(["--model", str(tmp_path / "m"), "--seeds", "x-y", "--out", str(out)]) == 2
