"""Generation: schedulers land where they should, images are deterministic per seed and do not depend on
the device count or the batch size, the learned rows are used, the files are written, and bad input
gets a clear message."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from jaxconcept import config, generate
from jaxconcept.model import adapter, sampling
from jaxconcept.parallel import sharding
from jaxconcept.runio import outputs, runs
from jaxconcept.errors import JaxconceptError, PromptError

PROMPTS = ["a photo of <v1>", "a photo of <v2> and a dog"]
FAST = generate.Settings(num_images=2, steps=3, guidance=5.0, seed=3)


SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                   steps_offset=1, clip_sample=False)


def _point_mass_eps(alphas_cumprod, x_t, t_B, x0, prediction="epsilon"):
    """The exact noise (or v) predictor when all data sits at the constant image x0."""
    a_t = alphas_cumprod[t_B].reshape((-1,) + (1,) * (x_t.ndim - 1))
    eps = (x_t - a_t ** 0.5 * x0) / (1.0 - a_t) ** 0.5
    return eps if prediction == "epsilon" else a_t ** 0.5 * eps - (1.0 - a_t) ** 0.5 * x0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm++"])
def test_every_scheduler_matches_pytorch_diffusers(name, prediction):
    """Our guided loop with diffusers' Flax scheduler vs PyTorch diffusers' scheduler loop, on a predictor
    with a known answer (targets A=0.5 cond, B=-0.25 uncond, guidance 3), for epsilon and v-prediction models
    (the prediction type comes from the model's scheduler config). The Flax DPM-Solver++ ends at
    t=0 rather than sigma=0: PyTorch's final_sigmas_type="sigma_min" is the same solver."""
    import inspect

    import diffusers
    import torch

    schedule = dict(SD_SCHEDULE, prediction_type=prediction)
    sched, state = adapter.inference_scheduler(name, schedule)
    ac = state.common.alphas_cumprod
    eps_fn = lambda x, t, ctx: _point_mass_eps(ac, x, t, ctx[:, 0, 0][:, None, None, None], prediction)  # noqa: E731
    noise = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 8, 8)))
    cond, uncond = jnp.full((2, 3, 5), 0.5), jnp.full((2, 3, 5), -0.25)
    ours = jax.jit(sampling.guided_sample, static_argnums=(0, 1, 6))(eps_fn, sched, state, noise, cond, uncond, 20, 3.0)

    cls, extra = {"ddim": (diffusers.DDIMScheduler, {}), "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
                  "dpm++": (diffusers.DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min"})}[name]
    accepted = inspect.signature(cls.__init__).parameters
    pt = cls(**{k: v for k, v in schedule.items() if k in accepted}, **extra)
    pt.set_timesteps(20)
    ac64 = pt.alphas_cumprod.numpy().astype(np.float64)
    x = torch.tensor(noise)
    for t in pt.timesteps:
        e_u, e_c = (_point_mass_eps(ac64, x.numpy(), np.array([int(t)]), v, prediction) for v in (-0.25, 0.5))
        x = pt.step(torch.tensor(e_u + 3.0 * (e_c - e_u), dtype=torch.float32), t, x).prev_sample
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-5)
    # and both land on the guided target B + g (A - B) = 2, up to the noise left at t=0 (sqrt(1 - abar_0) = 3%)
    assert np.abs(np.asarray(ours) - 2.0).max() < 0.15 and np.abs(np.asarray(ours) - 2.0).mean() < 0.03


def test_scheduler_names_and_aliases():
    assert adapter.scheduler_name("DPMSolver++") == "dpm++" and adapter.scheduler_name("plms") == "pndm"
    with pytest.raises(ValueError, match="available: ddim, pndm, dpm\\+\\+"):
        adapter.scheduler_name("euler")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny):
    """A finished run folder as the learner writes it (no joint stage), made without training."""
    folder = tmp_path_factory.mktemp("run")
    cfg = config.get_config()
    cfg.model, cfg.joint.steps = "tiny", 0
    (folder / "config.json").write_text(cfg.to_json())
    rows = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    outputs.save_concepts(str(folder / "concepts.safetensors"), ["<v1>", "<v2>"], rows, ["dog", None])
    return folder


@pytest.fixture(scope="module")
def loaded(run_dir, tiny):
    return runs.load_run(str(run_dir), bundle=tiny)


@pytest.fixture(scope="module")
def on_four(loaded):
    assert jax.device_count() == 4
    return generate.generate(loaded, PROMPTS + ["a dog"], FAST, mesh=sharding.make_mesh(), progress=False)


def test_sharded_batch_equals_one_device_and_is_deterministic(loaded, on_four):
    assert on_four.shape == (3, 2, 32, 32, 3) and on_four.dtype == np.uint8
    again = generate.generate(loaded, PROMPTS + ["a dog"], FAST, mesh=sharding.make_mesh(), progress=False)
    np.testing.assert_array_equal(on_four, again)
    one = generate.generate(loaded, PROMPTS + ["a dog"], FAST, mesh=sharding.make_mesh(jax.devices()[:1]),
                            progress=False)
    assert np.abs(one.astype(int) - on_four).max() <= 1  # float reassociation across device blocking only
    assert not np.array_equal(on_four[0, 0], on_four[0, 1])  # each image its own noise


def test_images_do_not_depend_on_batching_or_other_prompts(loaded, on_four):
    # 6 images in calls of 4 (the last padded) vs the same first prompt alone (one padded call)
    alone = generate.generate(loaded, PROMPTS[:1], FAST, mesh=sharding.make_mesh(), progress=False)
    assert np.abs(alone[0].astype(int) - on_four[0]).max() <= 1  # a uint8 rounding flip at most
    other_seed = generate.generate(loaded, PROMPTS[:1], generate.Settings(**{**FAST.__dict__, "seed": 4}),
                                   mesh=sharding.make_mesh(), progress=False)
    assert not np.array_equal(other_seed[0], on_four[0])


def test_learned_rows_are_what_the_prompt_sees(loaded, on_four):
    moved = runs.LoadedRun(loaded.bundle, loaded.tokens, loaded.concept_ids, loaded.rows_NxD * -3.0, loaded.run_dir)
    got = generate.generate(moved, PROMPTS[:1], FAST, mesh=sharding.make_mesh(), progress=False)
    assert np.abs(got[0].astype(int) - on_four[0]).mean() > 1.0


def test_prompt_naming_an_unknown_token_is_an_error(loaded, tiny):
    with pytest.raises(PromptError, match=r"<v3>.*concept tokens: <v1>, <v2>"):
        generate.generate(loaded, ["a photo of <v3>"], FAST, progress=False)
    with pytest.raises(PromptError, match="base model"):
        generate.generate(tiny, ["a photo of <v1>"], FAST, progress=False)
    with pytest.raises(JaxconceptError, match="unknown scheduler"):
        generate.generate(tiny, ["a dog"], generate.Settings(scheduler="euler"), progress=False)


def test_batch_plan_splits_evenly():
    assert generate.batch_plan(6, 0, 4) == 8 and generate.batch_plan(6, 3, 4) == 4
    assert generate.batch_plan(100, 0, 1) == 8 and generate.batch_plan(1, 0, 1) == 1


def test_cli_on_a_base_model_writes_pngs_grid_and_record(tmp_path, capsys):
    out = tmp_path / "gen"
    rc = generate.main(["--model", "tiny", "--prompt", "a red dog", "--prompt", "a cat on the beach",
                        "--num-images", "2", "--steps", "3", "--scheduler", "dpm++", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "generation.json").read_text())
    assert record["settings"]["scheduler"] == "dpm++" and len(record["files"]) == 2
    for files in record["files"]:
        assert all((out / f).is_file() for f in files) and len(files) == 2
    assert (out / "grid.png").is_file()
    assert "grid.png" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--run", "/nonexistent/run", "--prompt", "a dog"], "does not exist"),
    (["--model", "tiny", "--prompt", "a dog", "--scheduler", "euler"], "unknown scheduler"),
    (["--model", "tiny"], "no prompt"),
])
def test_cli_bad_input_is_a_clear_message(argv, message, tmp_path, capsys):
    assert generate.main(argv + ["--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_incomplete_run_folder_is_a_clear_message(tmp_path, run_dir, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((run_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(cfg))
    assert generate.main(["--run", str(broken), "--prompt", "a dog", "--out", str(tmp_path / "o")]) == 2
    assert "concepts.safetensors is missing" in capsys.readouterr().err
    cfg["joint"]["steps"] = 10
    (broken / "config.json").write_text(json.dumps(cfg))
    os.link(run_dir / "concepts.safetensors", broken / "concepts.safetensors")
    assert generate.main(["--run", str(broken), "--prompt", "a dog", "--out", str(tmp_path / "o")]) == 2
    assert "unet/ is missing" in capsys.readouterr().err


def test_cli_without_prompt_uses_each_concept_then_all(run_dir, tmp_path, capsys):
    summary = {"tokens": ["<v1>", "<v2>"], "template": "a photo of {}", "joiner": " and ",
               "concepts": [{"token": "<v1>", "kind": "object"}, {"token": "<v2>", "kind": "background"}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert generate.default_prompts(str(run_dir)) == ["a photo of <v1>"]
    summary["concepts"][1]["kind"] = "object"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert generate.default_prompts(str(run_dir)) == ["a photo of <v1>", "a photo of <v2>", "a photo of <v1> and <v2>"]


def test_grid_captions_are_whole_prompts_wrapped_at_spaces_across_the_row(tmp_path, monkeypatch):
    from jaxconcept import generate
    from jaxconcept.runio import viz

    seen, real = {}, viz.grid

    def spy(rows, labels=None, **kw):
        seen.update(kw, labels=labels)
        return real(rows, labels, **kw)

    monkeypatch.setattr(viz, "grid", spy)
    prompts = ["a <purple_dotted_ring>", "a <red_triangle> and a <purple_dotted_ring> on a blue wood background"]
    pictures = np.zeros((2, 3, 8, 8, 3), np.uint8)
    generate.save_generation(str(tmp_path), prompts, pictures, generate.Settings(), {})
    assert seen["labels"] is None and seen["row_labels"] == prompts  # no prompt cut into per-cell pieces
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    row_w = 3 * (128 + 4) - 4
    for prompt in prompts:
        lines = viz.caption_lines(prompt, row_w - 4)
        assert " ".join(lines) == prompt  # every word, tokens whole, in order
        assert all(len(line) * viz.CHAR_W <= row_w - 4 for line in lines)
    assert viz.caption_lines(prompts[1], 128) == ["a <red_triangle> and", "a", "<purple_dotted_ring>",
                                                  "on a blue wood", "background"]  # 21 characters a line
    assert viz.caption_lines("<a_very_long_token>", 60) == ["<a_very_lo"]  # cut only when one word overflows
    # the second caption needs two lines across a 3-image row: its row starts lower than with a one-line one
    one_line = 4 + (viz.LINE_H + 2) + 128 + 4
    assert grid.shape[0] == one_line + 2 * viz.LINE_H + 2 + 128 + 4
    assert (grid[one_line + 2: one_line + 2 * viz.LINE_H, 4:row_w] < 128).any()  # text on its second line
