"""EM proves itself on the shipped toy model: on one fixed hard scene (hard set seed 0: a blue triangle and a
purple dotted cross on a beige checker background, tokens from random rows) `em` must beat `attention` by a
margin measured with its run-to-run noise (docs/em_settling.md, section 4):

    em final object IoU - attention object IoU, bench settings (200 token steps, E-step every 25, 16 timesteps,
    no joint stage), single device, on the shipped toy model v3: run seed 0 (the one tested) +0.23 (0.41 -> 0.64);
    run seeds 1 and 2 (other random rows and timesteps) +0.11 and -0.04. The margin 0.10 is about one
    seed-to-seed standard deviation (0.14) below the tested run's gain: it fails when this run's EM no longer
    climbs (its rounds stay near attention's 0.41), not on the small numeric differences of another device
    count. The gain is NOT robust across seeds on this scene (docs/em_settling.md, section 4): the test pins one
    trajectory, not EM's average gain.

`attention` keeps the stage-1 masks: the same first E-step as `em` (same seed, same init rows), so a run of
mode attention without token steps gives exactly its masks, and the test checks that em's round 0 equals them.
"""

import os

import numpy as np
import pytest

from jaxconcept.bench import fidelity
from jaxconcept.model import load_model
from jaxconcept.toy import scene

GAINS = (0.23, 0.11, -0.04)  # run seeds 0 (tested), 1, 2 on toy v3 (on v1: 0.46, 0.18, -0.01)
MARGIN = 0.10


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


def test_em_beats_attention_on_a_hard_toy_scene(toy, tmp_path):
    s = fidelity.hard_scene(0, toy.resolution)
    folder = str(tmp_path / "scene")
    scene.write_scene(s, folder)
    settings = fidelity.Settings(num_samples=0)
    em = fidelity.bench_run(toy, None, s, folder, "hard", "random", "em", settings, str(tmp_path / "em"))
    attention = fidelity.bench_run(toy, None, s, folder, "hard", "random", "attention",
                                   fidelity.Settings(num_samples=0, token_steps=0), str(tmp_path / "attention"))
    assert em["iou_by_round"][0] == pytest.approx(attention["iou_final"], abs=1e-9)  # the same stage-1 masks
    gain = em["iou_final"] - attention["iou_final"]
    assert gain >= MARGIN, (f"em {em['iou_final']:.3f} vs attention {attention['iou_final']:.3f}: gain {gain:.3f} "
                            f"< {MARGIN} (measured gains {GAINS}); rounds {np.round(em['iou_by_round'], 3)}")
    assert os.path.exists(tmp_path / "em" / "summary.json")
