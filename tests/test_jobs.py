"""K concept sets in one program: batched jobs equal separate runs, write the same run folders, resume,
and refuse jobs that cannot stack."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import set_fields
from jaxconcept import config, settings
from jaxconcept.em import jobs, learner, stages
from jaxconcept.parallel import sharding
from jaxconcept.runio import inputs, runs
from jaxconcept.errors import JaxconceptError
from jaxconcept.toy import scene


def _cfg():
    c = config.get_config()
    c.model = "tiny"
    c.tokens.steps, c.tokens.estep_every, c.joint.steps = 4, 2, 2
    c.joint.lr = 2e-6  # float-noise equality: the toy default 1e-4 magnifies reduction-order differences 50x
    c.masks.num_timesteps, c.log_every = 4, 2
    return c


def _spec(folder, names):
    # the same token names in every job: each job is its own run
    return inputs.ImageSpec(str(folder / "image.png"), (
        inputs.ConceptSpec("<a>", "red", "object", None), inputs.ConceptSpec("<b>", None, "object", None),
        inputs.ConceptSpec("<bg>", "background", "background", None)))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = []
    for seed in (340, 341):
        folder = tmp_path_factory.mktemp(f"scene{seed}")
        s = scene.make_scene(seed, 32, 2)
        scene.write_scene(s, str(folder))
        out.append((folder, s))
    return out


def _one_device():
    """A single job, or a run of its own, on one device: on four its batch of one would run replicated (four
    times the work for the same result)."""
    return sharding.make_mesh(jax.devices()[:1])


def _unet_input(bundle):
    """A fixed noisy latent, timestep and condition for the tiny UNet."""
    k1, k2 = jax.random.split(jax.random.key(0))
    return (jax.random.normal(k1, (1, 4, 16, 16)), jax.numpy.asarray([500]),
            jax.random.normal(k2, (1, bundle.max_length, bundle.unet.config.cross_attention_dim)))


@pytest.fixture(scope="module")
def batched(scenes, tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("many")
    specs = [(_spec(f, s),) for f, s in scenes]
    return out, jobs.learn_many(_cfg(), specs, str(out), bundle=tiny, progress=False)


def test_batched_jobs_equal_separate_runs(scenes, batched, tmp_path, tiny):
    out, summaries = batched
    assert [s["tokens"] for s in summaries] == [["<a>", "<b>", "<bg>"]] * 2
    # the second job against a run of its own scene (one device, as a run of its own would be): equal, so the
    # jobs kept their own scenes in order (job_00 differs from job_01: test_batched_jobs_tune_their_own_lora...)
    for j, (folder, _) in list(enumerate(scenes))[1:]:
        alone_dir = tmp_path / f"alone{j}"
        learner.learn(_cfg(), [_spec(folder, None)], str(alone_dir), bundle=tiny, progress=False, mesh=_one_device())
        alone, many = runs.load_run(str(alone_dir), bundle=tiny), runs.load_run(str(out / f"job_{j:02d}"), bundle=tiny)
        np.testing.assert_allclose(many.rows_NxD, alone.rows_NxD, rtol=1e-4, atol=1e-5)
        # the tuned UNets compute the same noise prediction. Not leaf by leaf: Adam moves a weight whose gradient
        # is at float-noise level (~1e-8, its eps) by up to the lr whatever the gradient's sign, so a few biases
        # end 1e-6 apart in two runs that agree everywhere else (and each moved ~7e-7)
        eps = jax.jit(lambda p: tiny.unet.apply({"params": p}, *_unet_input(tiny)).sample)
        tuned, untuned = eps(many.bundle.params["unet"]), eps(tiny.params["unet"])
        np.testing.assert_allclose(tuned, eps(alone.bundle.params["unet"]), rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(tuned) - np.asarray(untuned)).max() > 1e-4  # and the joint stage moved it
        for r in range(3):  # the masks of every round
            for name in ("image__a.png", "image__b.png", "image__bg.png"):
                got = (out / f"job_{j:02d}" / "masks" / f"round_{r:02d}" / name).read_bytes()
                assert got == (alone_dir / "masks" / f"round_{r:02d}" / name).read_bytes()
        mine = [json.loads(x) for x in open(out / f"job_{j:02d}" / "metrics.jsonl") if '"loss"' in x]
        theirs = [json.loads(x) for x in open(alone_dir / "metrics.jsonl") if '"loss"' in x]
        assert [round(m["loss"], 5) for m in mine] == [round(m["loss"], 5) for m in theirs]


@pytest.mark.parametrize("option", [{"zoom_views": 1}, {"tokens.ema": 0.5}, {"tokens.outside_weight": 1.0}],
                         ids=["zoom_views", "tokens_ema", "outside_weight"])
def test_batched_jobs_with_options_equal_a_run_of_their_own(scenes, tmp_path, tiny, option):
    """zoom_views > 0 (each job trains on its own scene's views and their masks), tokens.ema (each job hands on
    its own rows' average) and tokens.outside_weight (each job's reference from its own starting rows) on the
    simulated devices: a job's rows equal those of its scene's run alone, with the
    option, on one device."""
    cfg = set_fields(_cfg(), {**option, "joint.steps": 0})
    summaries = jobs.learn_many(cfg, [(_spec(f, s),) for f, s in scenes], str(tmp_path / "many"), bundle=tiny,
                                progress=False)
    assert all(s["rounds"] == 2 for s in summaries)
    folder = scenes[1][0]
    learner.learn(cfg, [_spec(folder, None)], str(tmp_path / "alone"), bundle=tiny, progress=False, mesh=_one_device())
    alone, many = (runs.load_run(str(tmp_path / d), bundle=tiny) for d in ("alone", "many/job_01"))
    np.testing.assert_allclose(many.rows_NxD, alone.rows_NxD, rtol=1e-4, atol=1e-5)


def test_a_finished_set_resumes_without_training(batched, scenes, tiny):
    out, summaries = batched
    again = jobs.learn_many(_cfg(), [(_spec(f, s),) for f, s in scenes], str(out), bundle=tiny, progress=False)
    for a, b in zip(again, summaries):
        assert a["tokens"] == b["tokens"] and a["mask_area"] == b["mask_area"]


def test_jobs_of_different_structure_are_refused(scenes, tmp_path, tiny):
    (f0, _), (f1, _) = scenes
    two = _spec(f0, None)
    one = inputs.ImageSpec(str(f1 / "image.png"), (inputs.ConceptSpec("<a>", "red", "object", None),))
    with pytest.raises(JaxconceptError, match="differ in structure"):
        jobs.learn_many(_cfg(), [(two,), (one,)], str(tmp_path / "x"), bundle=tiny, progress=False)


def test_batched_jobs_offer_inversion_and_prior_preservation_as_single_runs(scenes, tmp_path, tiny):
    """The features of a single run: a job with an unmasked inversion first and prior preservation learns
    what a run of its own learns."""
    from PIL import Image

    prior = tmp_path / "class_images"
    prior.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(prior / "c.png")
    cfg = _cfg()
    cfg.init.method, cfg.init.inversion_steps, cfg.prior.folder = "inversion", 2, str(prior)
    cfg.tokens.steps, cfg.joint.steps = 2, 0
    folder, s = scenes[0]
    many = jobs.learn_many(cfg, [(_spec(folder, s),)], str(tmp_path / "many"), bundle=tiny, mesh=_one_device(),
                           progress=False)
    alone = learner.learn(cfg, [_spec(folder, s)], str(tmp_path / "alone"), bundle=tiny, progress=False,
                          mesh=_one_device())
    assert many[0]["mask_area"] == alone["mask_area"]
    a = runs.load_run(str(tmp_path / "alone"), bundle=tiny).rows_NxD
    m = runs.load_run(str(tmp_path / "many" / "job_00"), bundle=tiny).rows_NxD
    np.testing.assert_allclose(m, a, rtol=1e-4, atol=1e-5)
    logged = [json.loads(x) for x in open(tmp_path / "many" / "job_00" / "metrics.jsonl") if '"loss"' in x]
    assert [x["stage"] for x in logged] == ["inversion", "token"] and all("loss_prior" in x for x in logged)


def test_text_encoder_tuning_is_refused_for_batched_jobs_before_any_work(scenes, tmp_path, tiny):
    cfg = _cfg()
    cfg.joint.text_encoder = True
    with pytest.raises(JaxconceptError, match=r"batched jobs do not tune the text encoder \(joint.text_encoder=True\)"):
        jobs.learn_many(cfg, [(_spec(f, s),) for f, s in scenes], str(tmp_path / "x"), bundle=tiny, progress=False)
    assert not (tmp_path / "x").exists()


def test_scaling_benchmark_reports_every_k(tmp_path, capsys):
    from jaxconcept.bench import jobs as bench_jobs

    # one K besides the separate step it is compared with: each K is one more program to compile
    assert bench_jobs.main(["--model", "tiny", "--k", "2", "--iters", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "jobs.json").read_text())
    assert [r["k"] for r in result["rows"]] == [2]
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["speedup_vs_separate"] == pytest.approx(r["separate_ms"] / r["step_ms"])
    assert "job-steps/s" in capsys.readouterr().out
    assert bench_jobs.main(["--k", "0,x"]) == 2


def test_job_arguments_of_the_command_line(scenes, tmp_path):
    from jaxconcept import train

    a, b = (str(folder / "image.png") for folder, _ in scenes[:2])
    got = train.resolve_jobs([f"{a}:<tri>=red,<bg>/background", f"{a}:<x> ; {b}:<y>,<z>/background"])
    assert [len(j) for j in got] == [1, 2] and got[1][1].concepts[1].kind == "background"
    with pytest.raises(inputs.InputError, match="--job number 1 is empty"):
        train.resolve_jobs([" ; "])
    proc = subprocess.run([sys.executable, "-m", "jaxconcept.train", "--config.model=tiny", "--out",
                           str(tmp_path / "r"), "--job", f"{a}:<x>", "--concepts", f"{b}:<y>"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and "not both" in proc.stderr and "Traceback" not in proc.stderr


def test_batched_jobs_tune_their_own_lora_adapters_on_the_shared_unet(scenes, tmp_path, tiny):
    """joint.lora_rank in batched jobs: one frozen UNet for all, each job its own adapters, equal to the adapters
    of the job run alone."""
    from jaxconcept.runio import outputs

    cfg = _cfg()
    cfg.joint.lora_rank, cfg.joint.lr = 2, 1e-4
    out = tmp_path / "many"
    jobs.learn_many(cfg, [(_spec(f, s),) for f, s in scenes], str(out), bundle=tiny, progress=False)
    alone_dir = tmp_path / "alone"
    learner.learn(cfg, [_spec(scenes[1][0], None)], str(alone_dir), bundle=tiny, progress=False, mesh=_one_device())
    adapters = [outputs.load_lora(str(d / outputs.LORA_FILE), tiny.params["unet"])[0]
                for d in (out / "job_00", out / "job_01", alone_dir)]
    assert not (out / "job_01" / "unet").exists()
    b_leaves = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]) for a in adapters]
    assert np.abs(b_leaves[1] - b_leaves[0]).max() > 1e-6  # each job learned its own
    np.testing.assert_allclose(b_leaves[1], b_leaves[2], rtol=1e-3, atol=1e-6)


def test_one_run_and_batched_jobs_read_every_frozen_weight_the_joint_stage_does_not_tune():
    """One rule for both (`stages.joint_frozen`, used by `stages.build_stages`): SDXL's second text encoder stays
    among the weights the joint step reads (batched SDXL jobs tuning the whole UNet once left it out: KeyError)."""
    frozen = {"text_encoder": None, "text_encoder_2": None, "unet": None}

    def names(**changes):
        return stages.joint_frozen(settings.resolve(set_fields(_cfg(), changes)), frozen)

    assert names() == ["text_encoder", "text_encoder_2"]
    assert names(**{"joint.text_encoder": True}) == []  # both encoders tuned (SDXL's two: test_sdxl_joint)
    assert names(**{"joint.lora_rank": 4}) == ["text_encoder", "text_encoder_2", "unet"]
