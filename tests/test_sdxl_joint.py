"""SDXL end to end on the tiny SDXL-shaped model: learner runs through the token stage, the E-steps and the joint stage
(the whole UNet; LoRA adapters with both text encoders tuned), a run resumed inside the joint stage, the `generate`
and `evaluate` commands on the runs, and their exports loaded in PyTorch diffusers' StableDiffusionXLPipeline
(tuned UNet, LoRA file, both tuned encoders), computing what ours compute."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import interrupt_at, same_results, set_fields  # noqa: E402
from jaxconcept import config, export, load_model  # noqa: E402
from jaxconcept.em import learner  # noqa: E402
from jaxconcept.model import capture, conditioning, tokens  # noqa: E402
from jaxconcept.parallel import sharding  # noqa: E402
from jaxconcept.runio import inputs, outputs, runs  # noqa: E402
from jaxconcept.toy import scene  # noqa: E402
from torch_reference import rel_err  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    scene.write_scene(scene.make_scene(340, 32, 2), str(folder))  # a red triangle and a purple dotted ring
    return inputs.ImageSpec(str(folder / "image.png"), (
        inputs.ConceptSpec("<tri>", "red", "object", None), inputs.ConceptSpec("<ring>", None, "object", None),
        inputs.ConceptSpec("<bg>", "background", "background", None)))


def _cfg(**changes):
    cfg = config.get_config()
    cfg.model = "tiny-sdxl"
    cfg.tokens.steps, cfg.tokens.estep_every, cfg.joint.steps, cfg.joint.checkpoint_every = 2, 1, 2, 1
    cfg.tokens.attn_resolution, cfg.masks.resolutions = 8, (8,)  # tiny-sdxl's cross-attention grid (none at 16x16)
    cfg.masks.num_timesteps, cfg.log_every = 2, 1
    return set_fields(cfg, changes)


LORA_TE = {"joint.lora_rank": 4, "joint.lora_alpha": 8.0, "joint.text_encoder": True, "joint.lr": 1e-2}


def _learn(cfg, specs, out, **kwargs):
    # one device: the 4-device programs take twice as long to compile; sharding is tested on SD
    return learner.learn(cfg, specs, out, mesh=sharding.make_mesh(jax.devices()[:1]), **kwargs)


@pytest.fixture(scope="module")
def full_run(spec, tmp_path_factory):
    """Token stage with its E-steps, then 2 joint steps tuning the whole UNet."""
    out = tmp_path_factory.mktemp("full") / "run"
    _learn(_cfg(), [spec], str(out), progress=False)
    return out


@pytest.fixture(scope="module")
def lora_run(spec, tmp_path_factory):
    """The same, the joint stage tuning rank-4 LoRA adapters and both text encoders."""
    out = tmp_path_factory.mktemp("lora") / "run"
    _learn(_cfg(**LORA_TE), [spec], str(out), progress=False)
    return out


@pytest.fixture
def one_device(monkeypatch):
    """The commands' default mesh on one device (their programs compile twice as fast as on the 4 simulated)."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    monkeypatch.setattr(sharding, "make_mesh", lambda *a, **k: mesh)


def _moved(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _layers(bundle, name):
    """A text encoder's transformer layers (its token table is a run's plus the concept rows)."""
    return bundle.params[name]["text_model"]["encoder"]


def test_the_joint_stage_tunes_the_whole_unet(full_run):
    base = load_model("tiny-sdxl")
    lines = [json.loads(x) for x in open(full_run / "metrics.jsonl")]
    logged = [x for x in lines if "loss" in x]
    assert [x["stage"] for x in logged] == ["token", "token", "joint", "joint"]
    assert all(np.isfinite(x["loss"]) and x["loss_attn"] > 0 for x in logged)  # the loss reads the 8x8 layers
    assert [x["round"] for x in lines if "round" in x] == [0, 1, 2] and (full_run / "masks" / "final").is_dir()
    rows = outputs.load_concepts(str(full_run / "concepts.safetensors"))
    assert sorted(rows) == ["<bg>", "<ring>", "<tri>"] and rows["<tri>"].shape == (96,)
    red = base.tokenizer("red", add_special_tokens=False).input_ids[0]
    for half, name in ((rows["<tri>"][:32], "text_encoder"), (rows["<tri>"][32:], "text_encoder_2")):
        # each half of the row started at "red" in its own table, and moved
        assert np.abs(half - np.asarray(tokens.embedding_table(base.params[name]))[red]).max() > 1e-4, name
    run = runs.load_run(str(full_run))
    assert (full_run / "unet").is_dir() and not (full_run / "text_encoder").exists()
    assert _moved(run.bundle.params["unet"], base.params["unet"]) > 0
    assert _moved(_layers(run.bundle, "text_encoder_2"), _layers(base, "text_encoder_2")) == 0


def test_lora_with_both_text_encoders_tuned_writes_both_and_resumes(lora_run, spec, tmp_path):
    """LoRA adapters on the frozen UNet and both text encoders in the joint state: the run writes lora.safetensors,
    text_encoder/ and text_encoder_2/; stopped inside the joint stage and started again, it ends as the run that
    was never stopped."""
    assert (lora_run / outputs.LORA_FILE).is_file() and not (lora_run / "unet").exists()
    base, run = load_model("tiny-sdxl"), runs.load_run(str(lora_run))
    assert run.adapted is not None and run.adapted.spec.rank == 4
    for name in conditioning.TEXT_ENCODERS:  # tuned, saved with the base vocabulary, loaded back
        assert (lora_run / name).is_dir()
        table = tokens.embedding_table(run.bundle.params[name])
        assert table.shape[0] == tokens.embedding_table(base.params[name]).shape[0] + 3  # + the concept rows
        assert _moved(_layers(run.bundle, name), _layers(base, name)) > 1e-4, name
    out = tmp_path / "resumed"
    interrupt_at(_learn, _cfg(**LORA_TE), [spec], out, lambda meta: meta["stage"] == "joint")
    _learn(_cfg(**LORA_TE), [spec], str(out), progress=False)
    same_results(lora_run, out)


def test_a_run_missing_a_tuned_text_encoder_is_said_incomplete(lora_run, tmp_path):
    import shutil

    from jaxconcept.errors import JaxconceptError

    damaged = tmp_path / "run"
    shutil.copytree(lora_run, damaged)
    shutil.rmtree(damaged / "text_encoder_2")
    with pytest.raises(JaxconceptError, match="incomplete.*text_encoder_2/ is missing"):
        runs.load_run(str(damaged))


def test_what_the_joint_step_tunes_and_reads_frozen():
    """The text encoders are trainables with joint.text_encoder (both of SDXL's), frozen otherwise; the UNet is
    frozen under LoRA adapters and a trainable without (the frozen weights of single runs and batched jobs)."""
    from jaxconcept import settings
    from jaxconcept.em import stages

    frozen = {"text_encoder": 1, "text_encoder_2": 2, "unet": 3}

    def split(**changes):
        s = settings.resolve(_cfg(**changes))
        return sorted(stages.joint_frozen(s, frozen)), sorted(stages.tuned_text_encoders(s, frozen))

    assert split() == (["text_encoder", "text_encoder_2"], [])
    assert split(**{"joint.lora_rank": 4}) == (["text_encoder", "text_encoder_2", "unet"], [])
    assert split(**LORA_TE) == (["unet"], ["text_encoder", "text_encoder_2"])
    assert split(**{"joint.text_encoder": True}) == ([], ["text_encoder", "text_encoder_2"])


def test_generate_command_on_a_tuned_sdxl_run(full_run, tmp_path, one_device, capsys):
    from jaxconcept import generate

    out = tmp_path / "samples"
    assert generate.main(["--run", str(full_run), "--prompt", "a photo of <tri> and <ring>", "--num-images", "1",
                          "--steps", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "generation.json").read_text())
    pic = np.asarray(Image.open(out / record["files"][0][0]))
    assert record["model"] == "tiny-sdxl" and pic.shape == (32, 32, 3) and pic.std() > 0


def test_evaluate_command_on_an_sdxl_lora_run(lora_run, tmp_path, one_device, capsys):
    from jaxconcept import evaluate

    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(lora_run), "--clip", "tiny-clip", "--template", "a photo of {all}",
                          "--num-images", "1", "--steps", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    assert result["overall"]["images"] == 1 and result["runs"][str(lora_run)]["model"] == "tiny-sdxl"
    for key in ("clip_i", "clip_t", "presence_clip_multi"):
        assert result["overall"][key] is not None, key
    assert not result["runs"][str(lora_run)]["toy_analysis"]  # tiny-sdxl's words are not the toy world's
    assert (out / result["prompts"][0]["files"][0]).is_file() and (out / "index.html").is_file()


# ------------------------------------------------------------------------------------------ export


UNET_EPS = jax.jit(capture.unet_eps, static_argnums=0)  # one program for every run of the model


def _pytorch_agrees(run, pipe, prompts) -> tuple[float, float, float]:
    """Relative errors of PyTorch's pipeline against ours on the run: the text condition of the prompts (tokens
    in them), the pooled embedding and the UNet's eps on the same inputs."""
    ids = jnp.asarray(tokens.tokenize(run.bundle.tokenizer, prompts, run.bundle.max_length))
    cond = run.hidden_states(ids)
    with torch.no_grad():
        ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    rng = np.random.default_rng(1)
    latents, t = rng.standard_normal((len(prompts), 4, 16, 16)).astype(np.float32), np.array([5, 700])
    eps = UNET_EPS(run.bundle.unet, run.bundle.params["unet"], latents, jnp.asarray(t, jnp.int32), cond)
    with torch.no_grad():
        added = {"text_embeds": torch.from_numpy(np.array(cond.text_embeds_BxP)),
                 "time_ids": torch.from_numpy(np.array(cond.time_ids_BxK))}
        ref_eps = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), torch.from_numpy(
            np.array(cond.context_BxTxD)), added_cond_kwargs=added).sample.numpy()
    return (rel_err(cond.context_BxTxD, ref_ctx.numpy()), rel_err(cond.text_embeds_BxP, ref_pooled.numpy()),
            rel_err(eps, ref_eps))


PROMPTS = ["a photo of <tri> and <ring>", "<bg> on the beach"]


def test_a_tuned_sdxl_run_exports_to_a_pytorch_sdxl_pipeline_with_both_tables(full_run, tmp_path, capsys):
    """The export is a StableDiffusionXLPipeline folder with the tuned UNet; each token's file holds its clip_l and
    clip_g rows, which the two load_textual_inversion calls the export prints put into both encoders; PyTorch's
    encoders (the tokens in prompts) and UNet then compute what ours do."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    out = tmp_path / "export"
    assert export.main(["--run", str(full_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as a StableDiffusionXLPipeline folder" in printed and "text_encoder=pipe.text_encoder_2" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    summary = json.loads((out / "tokens.json").read_text())
    assert summary["unet"] == "tuned" and summary["text_encoder"] == "base"
    run = runs.load_run(str(full_run))
    tri = load_file(str(out / summary["files"]["<tri>"]))
    assert sorted(tri) == ["clip_g", "clip_l"] and tri["clip_l"].shape == (1, 32) and tri["clip_g"].shape == (1, 64)
    np.testing.assert_array_equal(np.concatenate([tri["clip_l"], tri["clip_g"]], 1)[0], np.asarray(run.rows_NxD[0]))
    assert "load_textual_inversion" in (out / "README.md").read_text()
    scope = {}
    exec(export.load_snippet(summary), scope)  # the lines the export prints: the pipeline and both tables' rows
    pipe = scope["pipe"]
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.config.force_zeros_for_empty_prompt
    errs = _pytorch_agrees(run, pipe, PROMPTS)
    print("exported tuned SDXL run in PyTorch: relative errors context %.2e, pooled %.2e, UNet eps %.2e" % errs)
    assert max(errs) <= TOL, errs


def test_a_lora_run_with_tuned_encoders_exports_what_the_xl_pipeline_loads(lora_run, tmp_path):
    """lora.safetensors beside the base UNet, text_encoder/ and text_encoder_2/ the tuned ones: the printed lines
    load the pipeline, the LoRA file (`load_lora_weights`) and both tables' rows, and PyTorch then computes what
    ours computes with the adapters merged, where the base model computes something else."""
    pytest.importorskip("peft")
    summary = export.export_run(str(lora_run), str(tmp_path / "export"))
    assert summary["unet"] == "lora" and summary["text_encoder"] == "tuned" and summary["sdxl"]
    assert {"lora.safetensors", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"} <= set(
        summary["written"])
    scope = {}
    exec(export.load_snippet(summary), scope)  # pipeline, LoRA file, both tables' rows
    errs = _pytorch_agrees(runs.load_run(str(lora_run)), scope["pipe"], PROMPTS)
    moved = _pytorch_agrees(_untuned(lora_run, tmp_path), scope["pipe"], PROMPTS)
    print("exported SDXL LoRA run in PyTorch: relative errors context %.2e, pooled %.2e, UNet eps %.2e; without the "
          "tuned encoders and adapters: %.2e, %.2e, %.2e" % (errs + moved))
    assert max(errs) <= TOL and min(moved) > 10 * TOL, (errs, moved)


def _untuned(run_dir, tmp_path):
    """The run's learned rows on the base model: its LoRA file and tuned text encoders left out."""
    import shutil

    folder = tmp_path / "untuned"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("text_encoder*", outputs.LORA_FILE, "checkpoints"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["joint"]["steps"] = 0  # no joint stage: the base UNet and encoders
    (folder / "config.json").write_text(json.dumps(cfg))
    return runs.load_run(str(folder))
