"""The fidelity benchmark end to end on the tiny model (a few steps): its figures are well-formed and
the modes behave as defined (user masks are the truth; attention masks never change); the hard scenes are
what they claim to be."""

import numpy as np
import pytest

from jaxconcept.bench import fidelity
from jaxconcept.toy import scene


def test_fidelity_benchmark_on_tiny(tmp_path, capsys):
    # no joint stage, as the benchmark's default (the learner's joint stage is tested in test_learner); two inits,
    # the second one without its user mode (once per scene)
    settings = fidelity.Settings(model="tiny", token_steps=2, estep_every=1, joint_steps=0, num_timesteps=4,
                                 num_samples=2, sample_steps=2, bare=True)
    result = fidelity.run_benchmark([1], str(tmp_path), settings=settings, sets=("hard",), inits=("color", "shape"))
    table = result["table"]
    assert set(table) == {f"hard/{it}/{m}" for it in ("color", "shape") for m in ("attention", "em")} | {
        "hard/color/user"}  # user once per scene
    for row in table.values():
        assert len(row["iou_by_round"]) == 3 and row["scenes"] == 1  # stage 1 + 2 rounds, (mean, SE)
        assert 0.0 <= row["iou_final"][0] <= 1.0 and row["iou_final"][1] >= 0
        f = row["samples"]  # what the samples show, tokens beside the words oracle
        assert f["scenes"] == 1 and 0.0 <= f["kept"] <= 1.0
        for key in ("found_mean", "together", "leakage"):
            assert 0.0 <= f[f"{key}_tokens"][0] <= 1.0 and 0.0 <= f[f"{key}_words"][0] <= 1.0
        b = row["samples_bare"]  # the same in bare prompts ("a <tok>"), where no background is asked to leak
        assert b["scenes"] == 1 and 0.0 <= b["found_mean_tokens"][0] <= 1.0
    bare_run = next(r for r in result["runs"] if r.get("samples_bare"))["samples_bare"]
    assert bare_run["prompts"][0]["tokens"].count(" on a ") == 0 and bare_run["tokens"]["leaks"]["background"] == 0
    # the words oracle is one per scene: every mode and init compares against the same figures
    assert len({(r["samples"]["found_mean_words"], r["samples"]["together_words"]) for r in table.values()}) == 1
    np.testing.assert_allclose([m for m, _ in table["hard/color/user"]["iou_by_round"]], 1.0)  # the true masks
    assert len({round(m, 6) for m, _ in table["hard/shape/attention"]["iou_by_round"]}) == 1  # kept
    assert set(result["gains"]) == {"hard/color", "hard/shape"}
    assert fidelity.mean_se([0.2, 0.4, 0.6]) == pytest.approx((0.4, 0.2 / np.sqrt(3)))
    assert (tmp_path / "runs" / "hard" / "1" / "shape" / "em" / "samples.png").exists()
    fidelity.write_outputs(result, str(tmp_path))
    # IoU, then samples on a new background, then in bare prompts
    assert (tmp_path / "table.md").read_text().count("\n") == 3 * (len(table) + 3) + 2
    assert (tmp_path / "iou_by_round.png").exists() and (tmp_path / "samples.png").exists()
    assert "em − attention" in capsys.readouterr().out


def test_user_mode_alone_gets_its_table_and_plot(tmp_path):
    # `--modes user` (e.g. the upper bound of random starts, run on its own): its samples panel is drawn
    settings = fidelity.Settings(model="tiny", token_steps=1, estep_every=1, joint_steps=0, num_timesteps=2,
                                 num_samples=1, sample_steps=2)
    result = fidelity.run_benchmark([1], str(tmp_path), modes=("user",), settings=settings, sets=("hard",),
                                    inits=("random",))
    fidelity.write_outputs(result, str(tmp_path))
    assert (tmp_path / "samples.png").exists() and "| hard | random | user | 1 |" in (tmp_path / "table.md").read_text()


def test_hard_scenes_have_close_colours_on_textured_backgrounds():
    pairs = {frozenset(p) for p in fidelity.HARD_PAIRS}
    for seed in range(20):
        s = fidelity.hard_scene(seed, 64)
        assert frozenset(o.color for o in s.objects) in pairs
        assert s.background.texture != scene.DEFAULT_TEXTURE and s.background.color in fidelity.HARD_BACKGROUNDS
        assert sum(m.sum() for m in s.masks.values()) == 64 * 64  # masks partition the image
        np.testing.assert_array_equal(s.image, fidelity.hard_scene(seed, 64).image)  # deterministic


def test_without_samples_attention_is_read_off_em_and_equals_a_real_attention_run(tiny, tmp_path):
    settings = fidelity.Settings(model="tiny", token_steps=2, estep_every=1, num_timesteps=4, num_samples=0)
    result = fidelity.run_benchmark([2], str(tmp_path / "bench"), modes=("attention", "em"), settings=settings,
                                    sets=("natural",), inits=("random",))
    derived = next(r for r in result["runs"] if r["mode"] == "attention")
    assert derived["read_off"] == "em round 0" and not (tmp_path / "bench" / "runs" / "natural" / "2" / "random"
                                                         / "attention").exists()  # no run made
    s = fidelity.natural_scene(2, 32)
    bs = fidelity.BenchScene(s, str(tmp_path / "bench" / "scenes" / "natural" / "2"), "natural")
    real = fidelity.bench_run(tiny, None, bs, "random", "attention", settings, str(tmp_path / "real"))
    np.testing.assert_allclose(derived["iou_by_round"], real["iou_by_round"], atol=1e-9)
    np.testing.assert_allclose(derived["iou_no_crf_by_round"], real["iou_no_crf_by_round"], atol=1e-9)
    assert derived["iou_final"] == pytest.approx(real["iou_final"], abs=1e-9)
    assert result["gains"]["natural/random"]["scenes"] == 1


def test_tied_tokens_samples_are_judged_against_the_object_their_masks_matched(tmp_path, monkeypatch):
    # random starts: which token takes which object is arbitrary; the IoU matches them to the truth, and the samples
    # must follow the same matching (a token that learned the triangle is asked for the triangle, not its name's)
    from jaxconcept.em import learner
    from jaxconcept.model.loading import load_model

    real_learn, seen = learner.learn, {}

    def learn_and_swap(*args, **kwargs):
        summary = real_learn(*args, **kwargs)
        objects = [c["token"] for c in summary["concepts"] if c["kind"] == "object"]
        summary["matched_to"] = {objects[0]: objects[1], objects[1]: objects[0]}  # as if the masks came out swapped
        return summary

    def judged(run, base, s, token_of, settings, words_cache, background=None):
        seen[background] = dict(token_of)
        record = {"tokens": {}, "words": {}, "prompts": [{"tokens": "a"}], "report": {}}
        return record, np.zeros((1, 1, 8, 8, 3), np.uint8)

    monkeypatch.setattr(fidelity.learner, "learn", learn_and_swap)
    monkeypatch.setattr(fidelity, "sample_fidelity", judged)
    s = fidelity.make_bench_scene("hard", 1, 32)
    folder = str(tmp_path / "scene")
    scene.write_scene(s, folder)
    settings = fidelity.Settings(model="tiny", token_steps=1, estep_every=1, num_timesteps=2, num_samples=1)
    row = fidelity.bench_run(load_model("tiny"), {}, fidelity.BenchScene(s, folder, "hard"), "random", "em", settings,
                             str(tmp_path / "run"))
    a, b = (o.name for o in s.objects)
    assert seen[None][a] == f"<{b}>" and seen[None][b] == f"<{a}>"  # each judged as the object it learned
    assert row["matched_to"] == {f"<{a}>": f"<{b}>", f"<{b}>": f"<{a}>"}
