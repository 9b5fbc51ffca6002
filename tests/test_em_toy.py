"""EM proves itself on the shipped toy model: on one fixed hard scene (hard set seed 2, tokens from random
rows, run seed 0) `em` must beat `attention` by a margin measured with its run-to-run noise
(docs/em_settling.md, section 7):

    em final object IoU - attention object IoU, bench settings (200 token steps, E-step every 25, 16 timesteps,
    no joint stage) and the learner's token settings (lr 1e-2, attention weight 0.3, the same E-step noise every
    round), single device, shipped toy model, hard validation scenes 0, 2 and 5 x run seeds 0-2 (measured to
    choose this one): scene 2 run seeds 0 (tested) / 1 / 2: +0.48 (0.52 -> 1.00), +0.67 (0.33 -> 1.00), +0.56
    (0.44 -> 1.00); scenes 0 and 5 gained +0.59 / +0.07 / -0.04 and +0.00 / +0.70 / +0.04. Scene 2 is the one
    positive for every seed; the margin 0.25 is its smallest gain less two seed-to-seed standard deviations
    (0.10): it fails when EM no longer climbs from attention's 0.52 to the objects, not on the small numeric
    differences of another device count. (Before the token settings changed, the pinned run was scene 3, run
    seed 1, +0.44, and no scene was positive for every seed.)

`attention` keeps the stage-1 masks: the same first E-step as `em` (same seed, same init rows), so a run of
mode attention without token steps gives exactly its masks, and the test checks that em's round 0 equals them.
"""

import dataclasses
import os

import numpy as np
import pytest

from jaxconcept.bench import fidelity
from jaxconcept.model.loading import load_model
from jaxconcept.toy import scene

SCENE, RUN_SEED = 2, 0
GAINS = (0.48, 0.67, 0.56)  # scene 2, run seeds 0 (tested), 1, 2
MARGIN = 0.25


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


def test_em_beats_attention_on_a_hard_toy_scene(toy, tmp_path):
    s = dataclasses.replace(fidelity.hard_scene(SCENE, toy.resolution), seed=RUN_SEED)
    folder = str(tmp_path / "scene")
    scene.write_scene(s, folder)
    settings = fidelity.Settings(num_samples=0)
    bs = fidelity.BenchScene(s, folder, "hard")
    em = fidelity.bench_run(toy, None, bs, "random", "em", settings, str(tmp_path / "em"))
    attention = fidelity.bench_run(toy, None, bs, "random", "attention",
                                   fidelity.Settings(num_samples=0, token_steps=0), str(tmp_path / "attention"))
    assert em["iou_by_round"][0] == pytest.approx(attention["iou_final"], abs=1e-9)  # the same stage-1 masks
    gain = em["iou_final"] - attention["iou_final"]
    assert gain >= MARGIN, (f"em {em['iou_final']:.3f} vs attention {attention['iou_final']:.3f}: gain {gain:.3f} "
                            f"< {MARGIN} (measured gains {GAINS}); rounds {np.round(em['iou_by_round'], 3)}")
    assert os.path.exists(tmp_path / "em" / "summary.json")
