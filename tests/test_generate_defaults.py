"""Sampling defaults: a model folder's sampling.json is what generate and the toy gates use unless told."""

import json
import types

from jaxconcept import generate
from jaxconcept.model import loading as model


def _args(**kw):
    base = dict(num_images=2, steps=None, guidance=None, scheduler=None, negative_prompt="", seed=0, batch_size=0)
    return types.SimpleNamespace(**{**base, **kw})


def test_folder_recommendation_applies_unless_overridden(tmp_path):
    (tmp_path / "sampling.json").write_text(json.dumps({"scheduler": "dpm++", "steps": 20, "guidance": 3.0}))
    assert model.recommended_sampling(str(tmp_path)) == {"scheduler": "dpm++", "steps": 20, "guidance": 3.0}
    s = generate.settings_for(_args(), str(tmp_path))
    assert (s.scheduler, s.steps, s.guidance) == ("dpm++", 20, 3.0)
    s = generate.settings_for(_args(steps=7, scheduler="ddim"), str(tmp_path))
    assert (s.scheduler, s.steps, s.guidance) == ("ddim", 7, 3.0)


def test_without_recommendation_the_usual_defaults(tmp_path):
    assert model.recommended_sampling(str(tmp_path)) == {}
    assert model.recommended_sampling("owner/some-hub-model") == {}
    s = generate.settings_for(_args(), str(tmp_path))
    assert (s.scheduler, s.steps, s.guidance) == ("ddim", 50, 7.5)


def test_the_shipped_toy_model_recommends_its_validated_settings():
    rec = model.recommended_sampling("toy")
    assert set(rec) == {"scheduler", "steps", "guidance"}
    assert rec == json.load(open(model._NAMED_FOLDERS["toy"] + "/sampling.json"))
