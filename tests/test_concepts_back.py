"""The bundled scene's concepts come back on the shipped toy model (issue 27, docs/concepts_back.md).

A shortened default run of the bundled scene (100 token steps, an E-step every 50 over 8 timesteps, 100 joint steps;
the toy recipe otherwise: one vector per init word, joint lr 3e-5, min-SNR 5, outside loss 0.3), then 8 samples of
each object alone and of both together (DDIM 25, guidance 5, sample seed = run seed), judged by the toy analysis. "Shown": samples of the 24
where every object the prompt names is found. Measured on the 2-core CPU, run seeds 0-4 (seed 3 tested):

    recipe              shown of 24: 11 / 10 / 12 / 18 / 18 (mean 13.8, seed-to-seed SD 3.9); together >= 1 of 8 each
    ... without the outside loss (stop 44): 13 / 10 / 10 / 17 / 15 (mean 13.0, SD 3.1)
    ... uniform weights (before min-SNR 5, stop 41): 11 / 15 / 11 / 20 / 17 (mean 14.8, SD 3.9)
    previous recipe     (one vector at the mean of the words, joint lr 1e-4), seeds 0-2: 7 / 8 / 6; together 0 of 8

The bar, 10, is at or under every recipe seed and over every previous-recipe seed: the tested seed's 18 is 2 SDs
above it (`docs/concepts_back/bar_seeds.py` measures the five seeds). It fails when a concept is lost again (the ring
drawn as a purple triangle) or never comes back together."""

import os

import pytest

from jaxconcept import config, generate, inputs, learner, runs, sharding
from jaxconcept.model import load_model
from jaxconcept.toy import judge

RUN_SEED, BAR = 3, 10
SCENE = os.path.join(os.path.dirname(judge.__file__), "examples", "heldout_scene")


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


def test_the_bundled_scenes_concepts_come_back(toy, tmp_path):
    import jax

    cfg = config.get_config()
    cfg.seed = RUN_SEED
    cfg.tokens.steps, cfg.tokens.estep_every, cfg.masks.num_timesteps, cfg.joint.steps = 100, 50, 8, 100
    out = str(tmp_path / "run")
    learner.learn(cfg, [inputs.from_toy_scene_folder(SCENE)], out, bundle=toy, progress=False,
                  mesh=sharding.make_mesh(jax.devices()[:1]))
    run = runs.load_run(out, bundle=toy)
    concepts = [judge.ToyConcept("<red_triangle>", "red", "triangle"),
                judge.ToyConcept("<purple_dotted_ring>", "purple", "ring", "dotted")]
    # the tokens' samples only (the words oracle's figures are the bar's measurement, not needed to test it)
    measured = judge.prompts(concepts)
    pictures = generate.generate(run, [p["tokens"] for p in measured],
                                 generate.Settings(num_images=8, steps=25, guidance=5.0, seed=RUN_SEED), progress=False)
    judged = judge.judge(pictures, measured, concepts, "gray", "teal")
    alone = [[x["found"] for x in per] for per in judged[:2]]
    together = [x["all"] for x in judged[2]]
    shown = sum(map(sum, alone)) + sum(together)
    print(f"shown {shown} of 24 (alone {[sum(a) for a in alone]} of 8 each, together {sum(together)} of 8)")
    assert shown >= BAR, f"only {shown} of 24 samples show what their prompt names (bar {BAR})"
    assert all(sum(a) > 0 for a in alone), "a concept never came back alone"
    assert sum(together) >= 1, "the two objects never came back together"
