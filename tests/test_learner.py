"""The EM learner end to end on the tiny model: outputs, one compile per program, resume equivalence,
the three modes, and bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import interrupt_at, same_results, set_fields
from jaxconcept import config, settings
from jaxconcept.em import learner, steps
from jaxconcept.em.prepare import crf_where, prepare
from jaxconcept.masks import estep
from jaxconcept.model import adapter
from jaxconcept.parallel import sharding
from jaxconcept.runio import checkpoints, inputs, outputs
from jaxconcept.errors import JaxconceptError
from jaxconcept.toy import scene


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    scene.write_scene(scene.make_scene(340, 32, 2), str(folder))  # a red triangle and a purple dotted ring
    return folder


def _spec(folder, with_masks=True):
    m = (lambda name: str(folder / f"mask_{name}.png")) if with_masks else (lambda name: None)
    return inputs.ImageSpec(str(folder / "image.png"), (
        inputs.ConceptSpec("<tri>", "red", "object", m("red_triangle")),
        inputs.ConceptSpec("<ring>", None, "object", m("purple_dotted_ring")),
        inputs.ConceptSpec("<bg>", "background", "background", m("background")),
    ))


def _cfg(**changes):
    c = config.get_config()
    c.model = "tiny"
    c.tokens.steps, c.tokens.estep_every, c.joint.steps = 4, 2, 2
    c.masks.num_timesteps, c.log_every = 4, 2
    return set_fields(c, changes)


def _learn(*args, **kwargs):
    """learner.learn on one device: multi-device runs are tests/test_sharding.py's and test_jobs.py's subject,
    and a tiny run on 4 simulated devices costs ~20% more."""
    return learner.learn(*args, mesh=sharding.make_mesh(jax.devices()[:1]), **kwargs)


def wrapping_steps(wrap):
    """steps.make_train_step whose steps, once bound, are `around(step)`, with `around = wrap(made)` called as each
    train step is made: the programs stay those of an unwrapped run."""
    original = steps.make_train_step

    def making(*a, **k):
        made = original(*a, **k)
        around, bind = wrap(made), made.bind
        made.bind = lambda *fixed: around(bind(*fixed))
        return made

    return making


class StepCounter:
    """Counts the calls of every train step the learner makes (in the order made: token, then joint)."""

    def __enter__(self):
        self.made, self.original = [], steps.make_train_step

        def counting(made):
            entry = {"jitted": made, "calls": 0}
            self.made.append(entry)

            def around(step):
                def counted(state, masks):
                    entry["calls"] += 1
                    return step(state, masks)
                return counted
            return around

        steps.make_train_step = wrapping_steps(counting)
        return self

    def __exit__(self, *exc):
        steps.make_train_step = self.original

    def calls(self) -> list[int]:
        return [e["calls"] for e in self.made]


def rows_read_by_estep(monkeypatch) -> list:
    """The rows every E-step's attention pass reads, in order (the list fills as the learner runs)."""
    read_rows, make_maps = [], steps.make_concept_maps

    def maps_spy(*a, **k):
        fn = make_maps(*a, **k)

        def maps(rows, *args):
            read_rows.append(np.asarray(rows))
            return fn(rows, *args)
        return maps

    monkeypatch.setattr(steps, "make_concept_maps", maps_spy)
    return read_rows


def tamper_steps(monkeypatch, change):
    """Every train step the learner makes passes its result through change(state_before, state_after, metrics) ->
    (state, metrics). The programs stay those of an untampered run (a learning rate of 1e-12 or 1e38 would be a
    program of its own to compile: the optimizer is a static argument)."""
    def around(step):
        def tampered(state, masks):
            before = jax.tree.map(jax.numpy.copy, state)  # the step donates its input state
            return change(before, *step(state, masks))
        return tampered

    monkeypatch.setattr(steps, "make_train_step", wrapping_steps(lambda made: around))


@pytest.fixture(scope="module")
def em_run(scene_dir, tmp_path_factory):
    """One uninterrupted run; records the train steps it makes and calls."""
    out = tmp_path_factory.mktemp("em") / "run"
    with StepCounter() as counter:
        summary = _learn(_cfg(), [_spec(scene_dir)], str(out), progress=False)
    return out, summary, counter


def test_run_writes_every_output(em_run):
    out, summary, _ = em_run
    for name in ("config.json", "concepts.safetensors", "metrics.jsonl", "summary.json", "masks_evolution.png",
                 "overlays/image.png", "images/image.png", "unet/config.json"):
        assert (out / name).exists(), name
    for folder in ("round_00", "round_01", "round_02", "final"):
        for token in ("tri", "ring", "bg"):
            png = np.asarray(Image.open(out / "masks" / folder / f"image__{token}.png"))
            assert png.shape == (32, 32) and set(np.unique(png)) <= {0, 255}
    final = np.stack([np.asarray(Image.open(out / "masks" / "final" / f"image__{t}.png")) > 0
                      for t in ("tri", "ring", "bg")])
    assert (final.sum(0) <= 1).all(), "masks overlap"
    assert final[2].sum() > 0 and final[0].sum() > 0 and final[1].sum() > 0, "a mask is empty"
    rows = outputs.load_concepts(str(out / "concepts.safetensors"))
    assert sorted(rows) == ["<bg>", "<ring>", "<tri>"] and rows["<tri>"].shape == (32,)
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    rounds = [x for x in lines if "round" in x]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all("iou" in r and "crf_seconds" in r for r in rounds) and "mask_change" in rounds[1]
    assert any(x.get("stage") == "joint" for x in lines)
    assert summary["rounds"] == 2 and set(summary["iou_final"]) == {"<tri>", "<ring>", "<bg>"}


def test_token_step_compiles_once_across_steps_and_rounds(em_run):
    _, _, counter = em_run
    token_step, joint_step = counter.made  # 4 token steps over 2 rounds, then 2 joint steps
    assert counter.calls() == [4, 2]
    assert token_step["jitted"].jitted._cache_size() == 1
    assert joint_step["jitted"].jitted._cache_size() == 1


def test_another_run_of_the_same_model_reuses_the_traced_step(scene_dir, monkeypatch):
    """Runs in one process (a notebook, a benchmark, this suite) share programs: the step's statics compare
    by value, so a second model load with its own text encoder object does not trace the UNet again."""
    from jaxconcept import load_model

    traced = []
    real = steps.concept_loss
    monkeypatch.setattr(steps, "concept_loss", lambda *a, **k: traced.append(1) or real(*a, **k))
    mesh = sharding.make_mesh(jax.devices()[:1])

    def lower(bundle, cfg=steps.LossConfig()):
        st = prepare(_cfg(), [_spec(scene_dir)], bundle)
        frozen = {"text_encoder": st.bundle.params["text_encoder"], "unet": st.bundle.params["unet"]}
        opt = steps.make_optimizer(5e-4)
        state = steps.init_state({"rows": jax.numpy.asarray(st.concepts.init_rows)}, opt)
        masks = jax.numpy.ones((3,) + st.latent_hw, jax.numpy.float32)
        steps.make_train_step(st.bundle, st.concepts.ids, cfg, opt, mesh).lower(
            state, frozen, st.run_data, masks, jax.random.key(0))
        return st

    a = lower(load_model("tiny"))
    first = len(traced)
    b = lower(load_model("tiny", seed=1))  # other weights, a new text encoder object: the same program
    assert b.bundle.text_encoder is not a.bundle.text_encoder and first <= 1 and len(traced) == first
    assert steps.step_model(a.bundle) == steps.step_model(b.bundle)
    assert hash(steps.step_model(a.bundle)) == hash(steps.step_model(b.bundle))
    lower(load_model("tiny"), steps.LossConfig(attn_weight=0.123))  # another config: traced anew
    assert len(traced) == first + 1
    grown = a.bundle.replace(text_encoder=adapter.text_encoder_with_vocab(a.bundle.text_encoder, 300))
    assert steps.step_model(grown) != steps.step_model(a.bundle)  # another vocabulary: another program


def test_rows_moved_and_only_rows_in_token_stage(em_run, tiny):
    out, _, _ = em_run
    rows = outputs.load_concepts(str(out / "concepts.safetensors"))
    from jaxconcept.model import tokens

    table = np.asarray(tokens.embedding_table(tiny.params["text_encoder"]))
    red = tiny.tokenizer.convert_tokens_to_ids("red</w>")
    assert not np.allclose(rows["<tri>"], table[red])  # trained away from its init word
    assert np.abs(rows["<tri>"] - table[red]).max() < 0.1  # ... by a few AdamW steps


def _same_results(out_a, out_b):
    same_results(out_a, out_b)


def _interrupt_at(cfg, spec, out, when):
    interrupt_at(_learn, cfg, [spec], out, when)


def test_resume_after_interruption_skips_finished_rounds(em_run, scene_dir, tmp_path, capsys):
    out_a, _, _ = em_run
    out_b = tmp_path / "run"
    _interrupt_at(_cfg(), _spec(scene_dir), out_b, lambda meta: meta.get("round") == 1)
    capsys.readouterr()
    with StepCounter() as counter:
        _learn(_cfg(), [_spec(scene_dir)], str(out_b), progress=False)
    assert counter.calls() == [2, 2]  # round 2's token steps only, then the joint steps
    assert "from checkpoint 2 (token, round 1)" in capsys.readouterr().out
    _same_results(out_a, out_b)
    lines = [json.loads(x) for x in open(out_b / "metrics.jsonl")]
    logged = [x["step"] for x in lines if "step" in x]
    assert logged == [2, 4, 6] and [x["round"] for x in lines if "round" in x] == [0, 1, 2]  # none twice


def test_resume_inside_the_joint_stage_and_after_the_end(em_run, scene_dir, tmp_path, capsys):
    out_a, summary_a, _ = em_run
    out_b = tmp_path / "run"
    cfg = _cfg(**{"joint.checkpoint_every": 1})  # checkpoint spacing does not change the results
    _interrupt_at(cfg, _spec(scene_dir), out_b, lambda meta: meta["stage"] == "joint")
    assert checkpoints.latest_meta(checkpoints.manager(str(out_b)))["index"] == 5  # after joint step 1
    with StepCounter() as counter:
        _learn(cfg, [_spec(scene_dir)], str(out_b), progress=False)
    assert counter.calls() == [0, 1]
    _same_results(out_a, out_b)
    capsys.readouterr()
    with StepCounter() as counter:
        summary = _learn(cfg, [_spec(scene_dir)], str(out_b), progress=False)
    assert sum(counter.calls()) == 0
    printed = capsys.readouterr().out
    assert "is finished (checkpoint 7)" in printed and "resuming" not in printed
    assert summary["mask_area"] == summary_a["mask_area"] and summary["rounds"] == 2
    assert json.loads((out_b / "run.json").read_text())["finished"] is True
    _same_results(out_a, out_b)


def test_a_folder_of_another_run_is_refused_before_anything_is_written(em_run, scene_dir, tmp_path):
    out, _, _ = em_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    other = _spec(scene_dir)
    with pytest.raises(JaxconceptError, match=r"differs in concepts or their masks.*another --out"):
        _learn(_cfg(), [inputs.ImageSpec(other.path, other.concepts[:2])], str(out), progress=False)
    with pytest.raises(JaxconceptError, match=r"config tokens.steps \(4 then, 6 now\)"):
        _learn(_cfg(**{"tokens.steps": 6}), [other], str(out), progress=False)
    twin = tmp_path / "image.png"  # another picture under the same file name
    Image.fromarray(255 - np.asarray(Image.open(other.path))).save(twin)
    with pytest.raises(JaxconceptError, match="differs in image contents"):
        _learn(_cfg(), [inputs.ImageSpec(str(twin), other.concepts)], str(out), progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_second_run_on_a_folder_is_refused_and_a_stale_lock_taken(em_run, scene_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))
    with pytest.raises(JaxconceptError, match=f"in use by another run \\(process {os.getpid()}"):
        _learn(_cfg(), [_spec(scene_dir)], str(out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finished, _, _ = em_run
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (finished / ".lock").write_text(json.dumps({"pid": gone.pid, "host": __import__("socket").gethostname()}))
    _learn(_cfg(), [_spec(scene_dir)], str(finished), progress=False)  # its process is gone: taken
    assert not (finished / ".lock").exists()


def test_refit_is_the_token_stage_again_on_the_final_masks_and_resumes(scene_dir, tmp_path, capsys):
    """tokens.refit: after the EM rounds the rows start again from the token stage's start and take its steps on
    the final masks: the same as a user-mode run given those masks (same seed, same draws), then the same joint
    stage. Stopped inside the refit, a run started again ends as an uninterrupted one."""
    cfg = _cfg(**{"tokens.refit": True})
    out = tmp_path / "refit"
    with StepCounter() as counter:
        _learn(cfg, [_spec(scene_dir)], str(out), progress=False)
    assert counter.calls() == [4 + 4, 2]  # the token steps twice (one program), then the joint steps
    final = {t: str(out / "masks" / "final" / f"image__{t}.png") for t in ("tri", "ring", "bg")}
    given = inputs.ImageSpec(str(scene_dir / "image.png"), tuple(
        dataclasses.replace(c, mask=final[c.token[1:-1]]) for c in _spec(scene_dir).concepts))
    _learn(_cfg(mode="user"), [given], str(tmp_path / "user"), progress=False)
    _same_results(out, tmp_path / "user")
    stages = [json.loads(x).get("stage") for x in open(out / "metrics.jsonl")]
    assert stages.count("refit") == 2  # logged every 2 steps: refit steps 2 and 4
    resumed = tmp_path / "resumed"
    _interrupt_at(cfg, _spec(scene_dir), resumed, lambda meta: meta["stage"] == "refit")
    capsys.readouterr()
    with StepCounter() as counter:
        _learn(cfg, [_spec(scene_dir)], str(resumed), progress=False)
    assert counter.calls() == [2, 2] and "(refit, round 2)" in capsys.readouterr().out
    _same_results(out, resumed)


@pytest.mark.parametrize("mode", ["attention", "user"])
def test_modes_keep_their_masks(mode, scene_dir, tmp_path, capsys):
    out = tmp_path / mode
    _learn(_cfg(mode=mode, **{"joint.steps": 0}), [_spec(scene_dir)], str(out), progress=False)
    if mode == "attention":  # without joint steps too, the end is recorded: started again, nothing is redone
        capsys.readouterr()
        with StepCounter() as counter:
            _learn(_cfg(mode=mode, **{"joint.steps": 0}), [_spec(scene_dir)], str(out), progress=False)
        printed = capsys.readouterr().out
        assert sum(counter.calls()) == 0 and "is finished (checkpoint 5)" in printed and "resuming" not in printed
    rounds = [np.stack([np.asarray(Image.open(out / "masks" / f"round_{r:02d}" / f"image__{t}.png"))
                        for t in ("tri", "ring", "bg")]) for r in range(3)]
    assert np.array_equal(rounds[0], rounds[1]) and np.array_equal(rounds[1], rounds[2])
    if mode == "user":
        truth = np.stack([np.asarray(Image.open(scene_dir / f"mask_{n}.png")) for n in
                          ("red_triangle", "purple_dotted_ring", "background")])
        np.testing.assert_array_equal(rounds[2] > 0, truth > 0)
        assert not (out / "unet").exists()  # no joint steps asked for


def test_same_noise_e_steps_draw_one_key_and_move_only_with_the_rows(scene_dir, tmp_path, monkeypatch):
    """masks.same_noise (the default): every E-step draws the same timesteps and noise (one key), so with rows
    that do not move the masks do not move either; each round without it draws its own key."""
    keys, original = [], estep.estimate_masks

    def recording(maps, setup, key, *args, **kwargs):
        keys.append(np.asarray(jax.random.key_data(key)))
        return original(maps, setup, key, *args, **kwargs)

    monkeypatch.setattr(estep, "estimate_masks", recording)
    with monkeypatch.context() as m:  # the rows kept where they were after every step
        tamper_steps(m, lambda before, after, metrics: (dict(after, params=before["params"]), metrics))
        summary = _learn(_cfg(**{"masks.same_noise": True, "joint.steps": 0}), [_spec(scene_dir)],
                         str(tmp_path / "same"), progress=False)
    assert len(keys) == 3 and all(np.array_equal(k, keys[0]) for k in keys)
    assert summary["mask_change_by_round"] == [0.0, 0.0]
    keys.clear()
    _learn(_cfg(**{"masks.same_noise": False, "joint.steps": 0}), [_spec(scene_dir)], str(tmp_path / "fresh"),
           progress=False)
    assert len(keys) == 3 and not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[1], keys[2])


def test_user_mode_needs_every_mask(scene_dir, tmp_path):
    with pytest.raises(JaxconceptError, match="needs a mask file for every concept"):
        _learn(_cfg(mode="user"), [_spec(scene_dir, with_masks=False)], str(tmp_path / "r"), progress=False)


def _write_bad_inputs(tmp_path, scene_dir):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n not really")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty_mask.png")
    (tmp_path / "a_file").write_text("x")


BAD = {
    "missing image": (lambda d, s: [inputs.ImageSpec(str(d / "nope.png"), s.concepts)], {}, "does not exist"),
    "corrupt image": (lambda d, s: [inputs.ImageSpec(str(d / "corrupt.png"), s.concepts)], {}, "cannot be read"),
    "unknown init word": (lambda d, s: [inputs.ImageSpec(s.path, (inputs.ConceptSpec("<v>", "snow☃man"),))], {},
                          "unknown to this model"),
    "duplicate token": (lambda d, s: [inputs.ImageSpec(s.path, (inputs.ConceptSpec("<v>"),) * 2)], {}, "<v>"),
    "token in vocabulary": (lambda d, s: [inputs.ImageSpec(s.path, (inputs.ConceptSpec("dog"),))], {}, "dog"),
    "mask of wrong size": (lambda d, s: [inputs.ImageSpec(s.path, (inputs.ConceptSpec("<v>", mask=str(d / "small_mask.png")),))],
                           {}, "10"),
    "empty mask": (lambda d, s: [inputs.ImageSpec(s.path, (inputs.ConceptSpec("<v>", mask=str(d / "empty_mask.png")),))],
                   {}, "empty"),
    "no concepts": (lambda d, s: [inputs.ImageSpec(s.path, ())], {}, "no concepts"),
    "prompt too long": (lambda d, s: [s], {"template": "a " * 80 + "{}"}, "at most"),
    "unknown mode": (lambda d, s: [s], {"mode": "magic"}, "mode = 'magic' is not allowed: use one of 'em'"),
    "unknown CRF backend": (lambda d, s: [s], {"masks.crf_backend": "gpu"}, "one of 'host', 'device'"),
    "CRF size too large": (lambda d, s: [s], {"masks.crf_size": "4096"}, "up to the image size 32"),
    "CRF size not a size": (lambda d, s: [s], {"masks.crf_size": "half"}, "'image', 'latent' or a number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_clear_error(case, scene_dir, tmp_path):
    _write_bad_inputs(tmp_path, scene_dir)
    make_specs, changes, message = BAD[case]
    with pytest.raises(JaxconceptError, match=message.replace("?", r"\?")):
        _learn(_cfg(**changes), make_specs(tmp_path, _spec(scene_dir, with_masks=False)),
                      str(tmp_path / "run"), progress=False)


def test_unwritable_output_folder(scene_dir, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(JaxconceptError, match="cannot write to the output folder"):
        _learn(_cfg(), [_spec(scene_dir)], str(tmp_path / "a_file" / "run"), progress=False)
    with pytest.raises(JaxconceptError, match="mount the bucket"):  # not a local folder named "gs:"
        _learn(_cfg(), [_spec(scene_dir)], "gs://bucket/run", progress=False)
    assert not os.path.exists("gs:")


def test_nan_loss_stops_and_keeps_the_last_checkpoint(scene_dir, tmp_path, monkeypatch):
    """A diverged step (what an lr of 1e38 does: the rows and the loss not finite) stops the run at its next
    logging step, before any checkpoint of it."""
    nan = lambda tree: jax.tree.map(lambda x: x * np.nan, tree)  # noqa: E731
    tamper_steps(monkeypatch, lambda before, after, metrics: (dict(after, params=nan(after["params"])), nan(metrics)))
    out = tmp_path / "run"
    with pytest.raises(learner.TrainingError, match="last good checkpoint"):
        _learn(_cfg(**{"joint.steps": 0}), [_spec(scene_dir)], str(out), progress=False)
    assert (out / "checkpoints").exists() and (out / "masks" / "round_00" / "image__tri.png").exists()
    assert checkpoints.latest_meta(checkpoints.manager(str(out)))["index"] == 0


def test_command_line_error_exits_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxconcept.train", "--config.model=tiny", "--out", str(tmp_path / "r"),
         "--concepts", f"{tmp_path / 'missing.png'}:<v1>=dog"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def _two_discs():
    yy, xx = np.mgrid[:48, :48]
    a = (yy - 14) ** 2 + (xx - 14) ** 2 < 64
    b = (yy - 32) ** 2 + (xx - 32) ** 2 < 81
    image = np.zeros((48, 48, 3), np.uint8)
    image[:] = (40, 160, 60)
    image[a], image[b] = (220, 30, 30), (40, 40, 220)
    return image, a, b


def test_assign_masks_from_noisy_maps_crf_helps_and_background_takes_the_rest():
    image, a, b = _two_discs()
    rng = np.random.default_rng(0)
    from scipy import ndimage

    # blurred, shifted maps: what cross-attention looks like
    soft = np.stack([ndimage.gaussian_filter(np.roll(m.astype(np.float32), 2, axis=1), 3) for m in (a, b)])
    soft = np.clip(soft / soft.max(axis=(1, 2), keepdims=True) + 0.1 * rng.random(soft.shape), 0, 1)
    soft = np.concatenate([soft, np.zeros((1, 48, 48), np.float32)])  # background concept: no map of its own
    kinds = ["object", "object", "background"]
    got, raw, info = estep.assign_masks(soft, image, kinds, estep.MaskRules(0.45))
    from jaxconcept.masks import labels as masks

    for k, truth in enumerate((a, b)):
        assert masks.iou(got[k], truth) > masks.iou(raw[k], truth)
        assert masks.iou(got[k], truth) > 0.9
    assert (got.sum(0) == 1).all()  # a partition: objects plus the background's rest
    np.testing.assert_array_equal(got[2], ~(got[0] | got[1]))
    assert info["crf_seconds"] > 0 and info["fallbacks"] == []


def test_assign_masks_never_returns_an_empty_mask():
    image, a, _ = _two_discs()
    soft = np.stack([a.astype(np.float32), np.full((48, 48), 0.2, np.float32)])  # 2nd below the level
    soft[1, 40:, 40:] = 0.3
    got, _, info = estep.assign_masks(soft, image, ["object", "object"], estep.MaskRules(0.45))
    assert got[1].any() and info["fallbacks"] == [1]
    assert not (got[0] & got[1]).any()


def test_inversion_prior_preservation_and_text_encoder_tuning(scene_dir, tmp_path):
    prior = tmp_path / "class_images"  # tests/test_jobs.py's: its single run's inversion and token programs
    prior.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(prior / "c.png")
    cfg = _cfg(**{"init.method": "inversion", "init.inversion_steps": 2, "prior.folder": str(prior),
                  "joint.text_encoder": True, "joint.steps": 1, "joint.lr": 1e-3, "tokens.steps": 2})
    out = tmp_path / "run"
    _learn(cfg, [_spec(scene_dir)], str(out), progress=False)
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert any(x.get("stage") == "inversion" for x in lines)
    steps_logged = [x for x in lines if "step" in x and x["stage"] in ("token", "joint")]
    assert steps_logged and all("loss_prior" in x for x in steps_logged)
    assert [x["round"] for x in lines if "round" in x] == [0, 1]
    # the tuned text encoder is kept: a prompt without concept tokens is encoded differently from the base
    from jaxconcept import load_model
    from jaxconcept.model import tokens
    from jaxconcept.runio import runs

    base, run = load_model("tiny"), runs.load_run(str(out))
    ids = tokens.tokenize(base.tokenizer, ["a red dog"], base.max_length)
    tuned_h = np.asarray(run.hidden_states(ids))
    base_h = np.asarray(tokens.text_hidden_states(base.text_encoder, base.params["text_encoder"], ids))
    assert (out / "text_encoder").is_dir() and np.abs(tuned_h - base_h).max() > 1e-4


def test_cached_class_prompt_encoding_gives_the_same_loss(scene_dir, tmp_path):
    """Prior preservation: the class prompt's hidden states are cached while the text encoder is frozen; the
    loss must be what encoding it every step gives."""

    prior = tmp_path / "class_images"
    prior.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(prior / "c.png")
    st = prepare(_cfg(**{"prior.folder": str(prior)}), [_spec(scene_dir)])
    assert "prior_context" in st.run_data
    masks = jax.numpy.asarray(np.ones((3,) + st.latent_hw, np.float32))
    frozen = {"text_encoder": st.bundle.params["text_encoder"], "unet": st.bundle.params["unet"]}
    loss = lambda data: steps.concept_loss(  # noqa: E731
        {"rows": jax.numpy.asarray(st.concepts.init_rows)}, frozen, data, masks, jax.random.key(3),
        statics=steps.StepStatics(steps.step_model(st.bundle), steps.LossConfig()),
        concept_ids_N=jax.numpy.asarray(st.concepts.ids))
    uncached = {k: v for k, v in st.run_data.items() if k != "prior_context"}
    (a, ma), (b, _) = jax.jit(loss)(st.run_data), jax.jit(loss)(uncached)  # eager, the UNet costs 3x the compile
    assert float(a) == pytest.approx(float(b), rel=1e-6) and float(ma["loss_prior"]) > 0


def test_where_the_e_step_crf_runs():
    where = lambda **kw: crf_where(settings.resolve(_cfg(**{f"masks.{k}": v for k, v in kw.items()})),  # noqa: E731
                                         (64, 48), (8, 6))
    assert where() == ("host", None)
    assert where(crf_backend="device", crf_size="latent") == ("device", (8, 6))
    assert where(crf_backend="device", crf_size="32") == ("device", (32, 24))


def test_e_step_crf_on_the_device_at_latent_size(scene_dir, tmp_path, monkeypatch):
    from jaxconcept.masks import crf_exact

    seen = []
    real = crf_exact.inference

    def spy(unary_LxN, image_HxWx3, params, *args, **kwargs):
        seen.append(image_HxWx3.shape[:2])
        return real(unary_LxN, image_HxWx3, params, *args, **kwargs)

    monkeypatch.setattr(crf_exact, "inference", spy)
    read_rows = rows_read_by_estep(monkeypatch)
    out = tmp_path / "device_crf"
    summary = _learn(_cfg(**{"masks.crf_backend": "device", "masks.crf_size": "latent", "joint.steps": 0}),
                            [_spec(scene_dir)], str(out), progress=False)
    # each E-step reads the rows of its time: the last one the rows the run ends with (no joint steps)
    learned = outputs.load_concepts(str(out / "concepts.safetensors"))
    assert len(read_rows) == summary["rounds"] + 1  # one image: one maps call per E-step
    assert not np.array_equal(read_rows[1], read_rows[0]) and not np.array_equal(read_rows[2], read_rows[1])
    np.testing.assert_array_equal(read_rows[-1], np.stack([learned[t] for t in ("<tri>", "<ring>", "<bg>")]))
    assert seen and set(seen) == {(16, 16)}  # the tiny model's latent grid, for a 32 px image; every E-step
    assert len(seen) == summary["rounds"] + 1
    final = np.stack([np.asarray(Image.open(out / "masks" / "final" / f"image__{t}.png")) > 0
                      for t in ("tri", "ring", "bg")])
    assert final.shape == (3, 32, 32) and final.any(axis=(1, 2)).all()  # image-size masks, none empty
    assert (final.sum(axis=0) == 1).all()  # every pixel belongs to exactly one concept
    crf_times = [e["crf_seconds"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if "crf_seconds" in e]
    assert crf_times and all(t > 0 for t in crf_times)


@pytest.fixture(scope="module")
def prepared(scene_dir):
    return prepare(_cfg(), [_spec(scene_dir)])


_LOSS_AND_GRAD = {}


def loss_and_grad(setup, remat="none"):
    """The token stage's loss and its gradient in the rows, all masks 1, a fixed key: computed once per setup and
    remat (the plain one is what the remat and memory-option tests compare with)."""
    key = (id(setup), remat)  # the entry keeps its setup alive: its id is not reused while the entry exists
    if key not in _LOSS_AND_GRAD:
        frozen = {"text_encoder": setup.bundle.params["text_encoder"], "unet": setup.bundle.params["unet"]}
        masks = jax.numpy.asarray(np.ones((3,) + setup.latent_hw, np.float32))
        loss = lambda rows: steps.concept_loss(  # noqa: E731
            {"rows": rows}, frozen, setup.run_data, masks, jax.random.key(1),
            statics=steps.StepStatics(steps.step_model(setup.bundle), steps.LossConfig(remat=remat)),
            concept_ids_N=jax.numpy.asarray(setup.concepts.ids))[0]
        _LOSS_AND_GRAD[key] = setup, jax.jit(jax.value_and_grad(loss))(jax.numpy.asarray(setup.concepts.init_rows))
    return _LOSS_AND_GRAD[key][1]


def test_remat_dots_and_full_give_the_gradients_of_no_remat(prepared):
    # the rows' gradient comes back through every UNet block, so it reads every rematerialised activation; the
    # UNet's own weight gradients would add nothing to check and a third to each compile
    _, plain = loss_and_grad(prepared)
    assert float(np.abs(plain).max()) > 0
    for remat in ("full", "dots"):
        np.testing.assert_allclose(loss_and_grad(prepared, remat)[1], plain, rtol=1e-5, atol=1e-7)


def test_multi_vector_tokens_train_resume_and_load_back(em_run, scene_dir, tmp_path):
    """tokens.vectors=0: a concept with two init words gets two vectors, learned, checkpointed (a resumed run
    ends as an uninterrupted one), saved n x D and loaded back for generation."""
    from jaxconcept import generate, runs

    spec = _spec(scene_dir)
    spec = inputs.ImageSpec(spec.path, (spec.concepts[0], dataclasses.replace(spec.concepts[1], init_word="red+dotted"),
                                        spec.concepts[2]))
    cfg = _cfg(**{"tokens.vectors": 0, "joint.steps": 0})  # the rows are the subject: no joint step to compile
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _learn(cfg, [spec], str(out_a), progress=False)
    _interrupt_at(cfg, spec, out_b, lambda meta: meta.get("round") == 1)
    _learn(cfg, [spec], str(out_b), progress=False)
    _same_results(out_a, out_b)
    rows = outputs.load_concepts(str(out_a / "concepts.safetensors"))
    assert rows["<ring>"].shape == (2, 32) and rows["<tri>"].shape == (32,) and rows["<bg>"].shape == (32,)
    run = runs.load_run(str(out_a))
    assert run.counts == (1, 2, 1) and run.rows_NxD.shape == (4, 32)
    np.testing.assert_array_equal(np.asarray(run.rows_NxD[1:3]), rows["<ring>"])
    pics = generate.generate(run, ["a <ring> and a <tri>"], generate.Settings(num_images=1, steps=2), progress=False)
    assert pics.shape == (1, 1, 32, 32, 3)


def test_attention_loss_on_every_vector_reads_the_second_vectors_map(scene_dir, tmp_path):
    """tokens.attn_all_vectors: a two-vector concept's attention term is the mean over both vectors' maps, so the
    first step's attention loss differs from the first-vector-only loss; one-vector concepts are unchanged (unit
    figures: tests/test_losses.py)."""
    spec = _spec(scene_dir)
    spec = inputs.ImageSpec(spec.path, (spec.concepts[0], dataclasses.replace(spec.concepts[1], init_word="red+dotted"),
                                        spec.concepts[2]))
    first = {}
    for every in (False, True):
        out = tmp_path / str(every)
        _learn(_cfg(**{"tokens.vectors": 0, "tokens.attn_all_vectors": every, "tokens.steps": 2, "joint.steps": 0,
                       "log_every": 1}), [spec], str(out), progress=False)
        first[every] = next(json.loads(x) for x in open(out / "metrics.jsonl") if '"step"' in x)["loss_attn"]
    assert np.isfinite(first[True]) and abs(first[True] - first[False]) > 1e-6, first


def test_lora_joint_stage_tunes_adapters_only_resumes_loads_and_exports(scene_dir, tmp_path, tiny):
    """joint.lora_rank: the joint stage tunes low-rank adapters on the frozen UNet; the run writes
    lora.safetensors (no unet/), its checkpoints hold no UNet, a run resumed inside the joint stage ends as an
    uninterrupted one, load_run merges the adapters, and export writes them beside the embeddings."""
    from jaxconcept import export, generate, runs

    cfg = _cfg(**{"joint.lora_rank": 2, "joint.lora_alpha": 4.0, "joint.lr": 1e-2, "joint.checkpoint_every": 1})
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    _learn(cfg, [_spec(scene_dir)], str(out_a), progress=False)
    assert (out_a / outputs.LORA_FILE).is_file() and not (out_a / "unet").exists()
    _interrupt_at(cfg, _spec(scene_dir), out_b, lambda meta: meta["stage"] == "joint")
    _learn(cfg, [_spec(scene_dir)], str(out_b), progress=False)
    _same_results(out_a, out_b)
    ckpt_bytes = sum(f.stat().st_size for f in (out_b / "checkpoints").rglob("*") if f.is_file())
    unet_bytes = sum(x.nbytes for x in jax.tree.leaves(tiny.params["unet"]))
    assert ckpt_bytes < unet_bytes, (ckpt_bytes, unet_bytes)  # every checkpoint together: less than one UNet

    run = runs.load_run(str(out_a))
    assert run.adapted is not None and run.adapted.spec.rank == 2
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(run.bundle.params["unet"]), jax.tree.leaves(tiny.params["unet"])))
    assert moved > 0  # the adapters are merged into the sampling UNet
    pics = generate.generate(run, ["a <ring> and a <tri>"], generate.Settings(num_images=1, steps=2), progress=False)
    assert pics.shape == (1, 1, 32, 32, 3)

    summary = export.export_run(str(out_a), str(tmp_path / "export"), pipeline=False)
    assert summary["unet"] == "lora" and outputs.LORA_FILE in summary["written"]
    assert not (tmp_path / "export" / "unet").exists()
    assert "load_lora_weights" in export.load_snippet(summary)
    back, spec = outputs.load_lora(str(tmp_path / "export" / outputs.LORA_FILE), tiny.params["unet"])
    assert spec == run.adapted.spec


def test_memory_options_compute_what_the_plain_steps_compute(scene_dir, prepared, em_run):
    """The memory options change how, not what: the E-step's maps from timesteps in chunks (3 then 1, the 4 of
    the runs here: in one batch, the E-step program em_run compiled) equal the maps of one batch, and
    memory-efficient attention gives the token step's loss and gradient of plain attention."""
    from jaxconcept.model import capture

    st = prepared
    mesh = sharding.make_mesh(jax.devices()[:1])
    frozen = {"text_encoder": st.bundle.params["text_encoder"], "unet": st.bundle.params["unet"]}
    args = (jax.numpy.asarray(st.concepts.init_rows), frozen, st.run_data["latents"][0, 0],
            jax.numpy.asarray(st.image_ids_IxT[0]), jax.numpy.asarray(st.image_positions_IxC[0]), jax.random.key(3))
    sel = capture.LayerSelector(resolutions=(16, 8))
    maps = [steps.make_concept_maps(st.bundle, st.concepts.ids, sel, 4, st.latent_hw, mesh, chunk=c)(*args)
            for c in (0, 3)]
    np.testing.assert_allclose(np.asarray(maps[1]), np.asarray(maps[0]), rtol=1e-5, atol=1e-6)
    assert float(np.asarray(maps[0]).max()) == pytest.approx(1.0)

    efficient = prepare(_cfg(memory_efficient_attention=True), [_spec(scene_dir)])
    (l0, g0), (l1, g1) = loss_and_grad(st), loss_and_grad(efficient)
    assert efficient.bundle.unet.use_memory_efficient_attention and not st.bundle.unet.use_memory_efficient_attention
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-4, atol=1e-7)


def test_joint_stage_without_background_prompts_draws_none(scene_dir):
    """joint.background_prompts=False: the joint step reads draw weights that give every prompt naming <bg> zero
    (the token stage's table is unchanged)."""
    from jaxconcept.em import stages

    s = settings.resolve(_cfg(**{"joint.background_prompts": False}))
    st = prepare(_cfg(**{"joint.background_prompts": False}), [_spec(scene_dir)])
    assert stages.joint_loss_config(s).background_prompts is False and stages.loss_config(s).background_prompts
    table, joint_w = st.run_data["table"], np.exp(np.asarray(st.run_data["joint_logw_P"]))
    names_bg = np.asarray(table["positions_PxC"])[:, 2] >= 0
    assert names_bg.any() and (joint_w[names_bg] == 0).all() and joint_w.sum() == pytest.approx(1.0, rel=1e-5)
    assert (np.exp(np.asarray(table["logw_P"]))[names_bg] > 0).all()


def test_background_swap_reaches_the_step_with_a_bank_and_which_concepts_are_backgrounds(scene_dir, monkeypatch):
    """background_swap > 0: the run's data holds a bank of plain backgrounds' latents (8 and their flips) and the
    concepts' background flags, and the step's loss passes them and the probability to data.swap_background
    (traced, not compiled: the swap's arithmetic is tested in test_data)."""
    from jaxconcept.em import data, stages

    cfg = _cfg(background_swap=0.5)
    st = prepare(cfg, [_spec(scene_dir)])
    bank = st.run_data["backgrounds"]
    assert bank.shape == (16,) + st.run_data["latents"].shape[2:]
    assert np.asarray(st.run_data["background_C"]).tolist() == [False, False, True]
    assert stages.loss_config(settings.resolve(cfg)).background_swap == 0.5
    seen = []
    real = data.swap_background
    monkeypatch.setattr(data, "swap_background", lambda *a: seen.append(a) or real(*a))
    frozen = {"text_encoder": st.bundle.params["text_encoder"], "unet": st.bundle.params["unet"]}
    masks = jax.numpy.asarray(np.ones((3,) + st.latent_hw, np.float32))
    jax.eval_shape(lambda rows: steps.concept_loss(
        {"rows": rows}, frozen, st.run_data, masks, jax.random.key(1),
        statics=steps.StepStatics(steps.step_model(st.bundle), steps.LossConfig(background_swap=0.5)),
        concept_ids_N=jax.numpy.asarray(st.concepts.ids))[0], jax.numpy.asarray(st.concepts.init_rows))
    assert len(seen) == 1 and seen[0][-1] == 0.5 and seen[0][-2].shape == bank.shape


def test_background_swap_in_the_joint_stage_only(scene_dir):
    """background_swap_stages="joint": the bank is prepared, the token stage's loss swaps nothing and the joint
    stage's swaps with the probability; "tokens" the other way round; "both" (the default) both."""
    from jaxconcept.em import stages

    for where, token_p, joint_p in (("joint", 0.0, 0.5), ("tokens", 0.5, 0.0), ("both", 0.5, 0.5)):
        cfg = _cfg(background_swap=0.5, background_swap_stages=where)
        s = settings.resolve(cfg)
        assert (stages.loss_config(s).background_swap, stages.joint_loss_config(s).background_swap) == \
            (token_p, joint_p)
    assert "backgrounds" in prepare(_cfg(background_swap=0.5, background_swap_stages="joint"),
                                    [_spec(scene_dir)]).run_data


def test_min_snr_weights_reach_both_stages_and_weight_the_masked_loss(scene_dir, monkeypatch):
    """min_snr_gamma > 0: both stages' loss configs carry it, and the step weights each sample's masked error by
    `diffusion.min_snr_weights(prediction type, schedule, its timestep, gamma)` (here stubbed to 0.5: the masked
    loss halves, the attention loss is unchanged)."""
    from jaxconcept.em import stages
    from jaxconcept.model import diffusion

    s = settings.resolve(_cfg(min_snr_gamma=5.0))
    assert stages.loss_config(s).min_snr_gamma == stages.joint_loss_config(s).min_snr_gamma == 5.0
    st = prepare(_cfg(), [_spec(scene_dir)])
    seen = []
    monkeypatch.setattr(diffusion, "min_snr_weights", lambda kind, a, t, g: seen.append((kind, g)) or
                        jax.numpy.full(t.shape, 0.5))
    frozen = {"text_encoder": st.bundle.params["text_encoder"], "unet": st.bundle.params["unet"]}
    masks = jax.numpy.asarray(np.ones((3,) + st.latent_hw, np.float32))

    def metrics(gamma):
        return steps.concept_loss(
            {"rows": jax.numpy.asarray(st.concepts.init_rows)}, frozen, st.run_data, masks, jax.random.key(1),
            statics=steps.StepStatics(steps.step_model(st.bundle), steps.LossConfig(min_snr_gamma=gamma)),
            concept_ids_N=jax.numpy.asarray(st.concepts.ids))[1]

    plain, weighted = metrics(0.0), metrics(5.0)
    assert seen == [("epsilon", 5.0)]
    assert float(weighted["loss_mask"]) == pytest.approx(0.5 * float(plain["loss_mask"]), rel=1e-5)
    assert float(weighted["loss_attn"]) == pytest.approx(float(plain["loss_attn"]), rel=1e-5)


def test_zoom_views_are_encoded_once_and_their_masks_cut_alike(scene_dir):
    """zoom_views > 0: the run's data holds each image's latents and its zoomed views' (the VAE's latents of the
    cropped-and-resized picture, with flips; view 0 the image's own), `place_masks` cuts each round's masks by the
    same windows (V x C x h x w, view 0 the plain latent masks), and the setting enters the run's fingerprint only
    when set. (Whole runs with views, alone and as batched jobs: test_jobs.)"""
    from jaxconcept.em import data, stages
    from jaxconcept.model import diffusion

    cfg = _cfg(zoom_views=2)
    st = prepare(cfg, [_spec(scene_dir)])
    lat, views = np.asarray(st.run_data["latents"]), np.asarray(st.run_data["view_latents"])
    assert views.shape == (1, 3, 2) + lat.shape[2:] and st.zoom_windows.shape == (3, 3)
    np.testing.assert_array_equal(views[:, 0], lat)
    zoomed = data.zoom(np.asarray(st.inputs.images_IxHxWx3), st.zoom_windows[2])
    own = np.asarray(diffusion.encode_images(st.bundle.vae, st.bundle.params["vae"], zoomed)[0]) * st.bundle.latent_scale
    np.testing.assert_allclose(views[:, 2, 0], own, atol=1e-4)
    mesh = sharding.make_mesh(jax.devices()[:1])
    run_stages, _ = stages.single_run_stages(settings.resolve(cfg), st, mesh)
    masks_CxHxW = np.asarray(st.inputs.user_masks, bool)
    placed = np.asarray(run_stages.place_masks([masks_CxHxW]))
    assert placed.shape == (3, 3) + st.latent_hw
    np.testing.assert_array_equal(placed[0], np.asarray(stages.latent_masks(masks_CxHxW, st.latent_hw, mesh)))
    np.testing.assert_array_equal(placed[2], np.asarray(data.nearest_resize(
        data.zoomed_masks(masks_CxHxW, st.zoom_windows[2:])[0], st.latent_hw)))
    assert "zoom_views" not in settings.resolve(_cfg()).result_fields()
    assert settings.resolve(cfg).result_fields()["zoom_views"] == 2


def test_context_regulariser_holds_the_other_words_states_where_the_starting_rows_put_them(scene_dir):
    """tokens.context_weight > 0: the run's data holds the context prompts (each object alone and both, after each
    phrase; none names the background), the text states the starting rows give them, and the positions read (all
    but the concepts' vectors). The loss is 0 at the starting rows and grows as they move; the background's row,
    in no context prompt, gets no gradient; the step adds it to its loss and metrics (traced, not compiled)."""
    from jaxconcept.em import losses, stages
    from jaxconcept.model import conditioning

    cfg = _cfg(**{"tokens.context_weight": 2.0, "tokens.context_phrases": "on the beach| in the snow |"})
    st = prepare(cfg, [_spec(scene_dir)])
    rd, ids_N = st.run_data, np.asarray(st.concepts.ids_array)
    ids_KxT = np.asarray(rd["context_ids"])
    assert ids_KxT.shape[0] == 3 * 2  # <tri>, <ring>, both; two phrases (the empty one dropped)
    assert not np.isin(ids_KxT, ids_N[-1:]).any() and np.isin(ids_KxT, ids_N[:2]).any(axis=1).all()
    np.testing.assert_array_equal(np.asarray(rd["context_weight"]) == 0, np.isin(ids_KxT, ids_N))
    text = conditioning.text_model(st.bundle)

    def l_ctx(rows):
        cond = conditioning.encode(text, st.bundle.params, rd["context_ids"], st.concepts.ids_array, rows)
        return losses.context_loss(conditioning.unet_inputs(cond)[0], rd["context_target"], rd["context_weight"])

    rows0 = jax.numpy.asarray(st.concepts.init_rows)
    assert float(l_ctx(rows0)) < 1e-10
    value, grad = jax.value_and_grad(l_ctx)(rows0 + 0.5 * jax.random.normal(jax.random.key(0), rows0.shape))
    grad = np.asarray(grad)
    assert float(value) > 1e-3 and (np.abs(grad[:2]).max(axis=1) > 0).all() and not grad[2].any()
    assert stages.loss_config(settings.resolve(cfg)).context_weight == 2.0
    frozen = {"text_encoder": st.bundle.params["text_encoder"], "unet": st.bundle.params["unet"]}
    masks = jax.numpy.asarray(np.ones((3,) + st.latent_hw, np.float32))
    for weight, reported in ((2.0, True), (0.0, False)):
        metrics = jax.eval_shape(lambda rows: steps.concept_loss(
            {"rows": rows}, frozen, rd, masks, jax.random.key(1),
            statics=steps.StepStatics(steps.step_model(st.bundle), steps.LossConfig(context_weight=weight)),
            concept_ids_N=jax.numpy.asarray(st.concepts.ids))[1], rows0)
        assert ("loss_ctx" in metrics) == reported


def test_outside_loss_holds_the_prediction_outside_the_masks_to_the_words(scene_dir):
    """tokens.outside_weight > 0: the run's data holds the starting rows and both stages' loss configs the weight;
    the step's outside loss is the squared difference, outside the prompt's concept masks only, between the UNet's
    prediction with the current rows and with the starting rows: 0 at the start, > 0 once the rows move, 0 again
    when the masks cover the whole picture; it reaches the rows' gradient; the fingerprint holds it only when set."""
    from jaxconcept.em import stages

    cfg = _cfg(**{"tokens.outside_weight": 3.0})
    s = settings.resolve(cfg)
    assert stages.loss_config(s).outside_weight == stages.joint_loss_config(s).outside_weight == 3.0
    assert "outside_weight" not in settings.resolve(_cfg(**{"tokens.outside_weight": 0.0})).result_fields()["tokens"]
    assert s.result_fields()["tokens"]["outside_weight"] == 3.0
    st = prepare(cfg, [_spec(scene_dir)])
    rows0 = jax.numpy.asarray(st.concepts.init_rows)
    np.testing.assert_array_equal(np.asarray(st.run_data["start_rows"]), np.asarray(rows0))
    assert "start_rows" not in prepare(_cfg(**{"tokens.outside_weight": 0.0}), [_spec(scene_dir)]).run_data
    frozen = {"text_encoder": st.bundle.params["text_encoder"], "unet": st.bundle.params["unet"]}
    half = np.zeros((3,) + st.latent_hw, np.float32)
    half[:, :, : st.latent_hw[1] // 2] = 1.0  # every concept on the left half: the right half is outside

    def loss(rows, masks, weight):
        return steps.concept_loss(
            {"rows": rows}, frozen, st.run_data, jax.numpy.asarray(masks), jax.random.key(1),
            statics=steps.StepStatics(steps.step_model(st.bundle), steps.LossConfig(outside_weight=weight)),
            concept_ids_N=jax.numpy.asarray(st.concepts.ids))

    moved = rows0 + 0.5 * jax.random.normal(jax.random.key(0), rows0.shape)
    assert float(loss(rows0, half, 3.0)[1]["loss_outside"]) < 1e-12
    total, m = loss(moved, half, 3.0)
    assert float(m["loss_outside"]) > 1e-6
    assert float(total) == pytest.approx(float(loss(moved, half, 0.0)[0]) + 3.0 * float(m["loss_outside"]), rel=1e-5)
    assert float(loss(moved, np.ones_like(half), 3.0)[1]["loss_outside"]) == 0.0
    assert "loss_outside" not in loss(moved, half, 0.0)[1]
    g3, g0 = (jax.grad(lambda r, w=w: loss(r, half, w)[0])(moved) for w in (3.0, 0.0))
    assert np.abs(np.asarray(g3) - np.asarray(g0)).max() > 0


def test_area_downsampled_masks_reach_the_steps_as_each_cells_object_share(prepared):
    """tokens.mask_downsample="area": the masks the token and joint steps read are each latent cell's share of the
    object (fractions on its edge), where "nearest" keeps 0 / 1 (both placements of a run: one, or jobs)."""
    from jaxconcept.em import jobs, stages

    masks_CxHxW = np.zeros((3,) + tuple(4 * d for d in prepared.latent_hw), np.float32)
    masks_CxHxW[0, 2:9, 2:9] = 1.0  # 7 x 7 pixels over 4 x 4 cells: edge cells partly covered
    masks_CxHxW[2] = 1.0 - masks_CxHxW[0]
    mesh = sharding.make_mesh(jax.devices()[:1])
    for how in ("nearest", "area"):
        s = settings.resolve(_cfg(**{"tokens.mask_downsample": how}))
        one = np.asarray(stages.OneRun(s, prepared, mesh).place_masks([masks_CxHxW]))
        both = np.asarray(jobs.JobsPlacement(s, [prepared], prepared.bundle, mesh).place_masks([masks_CxHxW]))[0]
        np.testing.assert_array_equal(one, both)
        fractional = (one > 0) & (one < 1)
        assert fractional.any() == (how == "area")
        assert one[0].sum() == pytest.approx(49 / 16 if how == "area" else 4.0)  # nearest: rows, columns 4 and 8


@pytest.mark.parametrize("joint_steps", [2, 0])
def test_token_stage_hands_on_the_moving_average_of_its_rows(scene_dir, tmp_path, monkeypatch, joint_steps):
    """tokens.ema = d: every token step updates the rows' average, ema <- d ema + (1 - d) rows (from the rows the
    stage starts with); the joint stage starts from that average, or, without one, it is the run's result, while
    the E-steps read the rows as they are. The setting enters the fingerprint only when set."""
    seen = []

    def record(before, after, metrics):
        seen.append((set(before["params"]), np.asarray(before["params"]["rows"]), np.asarray(after["params"]["rows"]),
                     np.asarray(after["ema_rows"]) if "ema_rows" in after else None))
        return after, metrics

    tamper_steps(monkeypatch, record)
    read_rows = rows_read_by_estep(monkeypatch)
    d, out = 0.5, tmp_path / "ema"
    cfg = _cfg(**{"tokens.ema": d, "joint.steps": joint_steps})
    _learn(cfg, [_spec(scene_dir)], str(out), progress=False)
    token = [x for x in seen if x[0] == {"rows"}]
    joint = [x for x in seen if x[0] != {"rows"}]
    assert len(token) == 4 and len(joint) == joint_steps and all(x[3] is None for x in joint)
    ema = token[0][1]
    for _, _, after, got in token:
        ema = d * ema + (1 - d) * after
        np.testing.assert_allclose(got, ema, rtol=1e-6, atol=1e-7)
    assert np.abs(ema - token[-1][2]).max() > 1e-4  # the average is not the last rows
    np.testing.assert_array_equal(read_rows[-1], token[-1][2])  # the last E-step: the rows as they are
    if joint_steps:
        np.testing.assert_array_equal(joint[0][1], ema)
    else:
        learned = outputs.load_concepts(str(out / "concepts.safetensors"))
        np.testing.assert_allclose(np.stack([learned[t] for t in ("<tri>", "<ring>", "<bg>")]), ema, rtol=1e-6)
    assert settings.resolve(cfg).result_fields()["tokens"]["ema"] == d
    assert "ema" not in settings.resolve(_cfg()).result_fields()["tokens"]
