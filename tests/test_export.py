"""Export of a run to PyTorch diffusers: written torch-free, read back by PyTorch diffusers/transformers.

A finished run folder is written directly (config, concepts, a perturbed tuned UNet), exported once in a
subprocess where torch cannot be imported, and the result is loaded as a StableDiffusionPipeline whose
outputs must match ours.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors import safe_open  # noqa: E402

from jaxconcept import config, export
from jaxconcept.model import adapter, capture, diffusion, tokens
from jaxconcept.runio import outputs, runs  # noqa: E402
from torch_reference import rel_err  # noqa: E402

TOKENS = ("<v1>", "<v2>")
PROMPTS = ["a photo of <v1> and <v2>", "a <v2> dog on the beach"]


def write_run(folder, tiny, *, tuned: bool, seed: int = 0) -> str:
    """A finished run folder as the learner leaves it (config.json, concepts.safetensors, unet/ if tuned)."""
    os.makedirs(folder, exist_ok=True)
    cfg = config.get_config()
    cfg.model = "tiny"
    if not tuned:
        cfg.joint.steps = 0
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(cfg.to_json())
    rng = np.random.default_rng(seed)
    outputs.save_concepts(os.path.join(folder, "concepts.safetensors"), TOKENS,
                          rng.standard_normal((len(TOKENS), 32)).astype(np.float32), ["dog", None])
    if tuned:  # differs from the base UNet everywhere, norms and biases included
        leaves, treedef = jax.tree.flatten(tiny.params["unet"])
        noisy = [x + 0.02 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
        adapter.save_flax_unet(os.path.join(folder, "unet"), tiny.unet, jax.tree.unflatten(treedef, noisy))
    return str(folder)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny):
    return write_run(tmp_path_factory.mktemp("run"), tiny, tuned=True)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The export, made with torch unimportable (diffusers then sees no torch): (out folder, summary)."""
    out = str(tmp_path_factory.mktemp("export") / "sd")
    code = (
        "import json, sys; sys.modules['torch'] = None\n"
        "from jaxconcept import export\n"
        f"s = export.export_run({run_dir!r}, {out!r})\n"
        "assert sys.modules.get('torch') is None, 'torch was imported'\n"
        "print('SUMMARY', json.dumps(s))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY "))
    return out, json.loads(line[len("SUMMARY "):])


@pytest.fixture(scope="module")
def run(run_dir, tiny):
    return runs.load_run(run_dir, bundle=tiny)


@pytest.fixture(scope="module")
def pipe(exported):
    """The pipeline as a user gets it: by running the snippet the CLI prints (from_pretrained +
    load_textual_inversion for every token file)."""
    _, summary = exported
    namespace: dict = {}
    exec(export.load_snippet(summary), namespace)
    return namespace["pipe"]


def _keys(path) -> set[str]:
    with safe_open(path, "np") as f:
        return set(f.keys())


def test_export_is_torch_free_and_complete(exported):
    out, summary = exported
    assert summary["unet"] == "tuned" and summary["pipeline"] and summary["tokens"] == list(TOKENS)
    for path in summary["written"]:
        assert os.path.exists(os.path.join(out, path)), path
    for path in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(out, path)), path


def test_embedding_files_are_textual_inversion_files(exported, run):
    out, summary = exported
    assert set(summary["files"]) == set(TOKENS)
    with open(os.path.join(out, "tokens.json")) as f:
        assert json.load(f)["files"] == summary["files"]
    for token, row_D in zip(run.tokens, np.asarray(run.rows_NxD)):
        file = summary["files"][token]
        assert file == f"embeddings/{outputs.safe_name(token)}.safetensors"  # "<v1>" -> v1: file-system safe
        with safe_open(os.path.join(out, file), "np") as f:
            assert list(f.keys()) == [token]  # diffusers takes the token name from the single key
            stored = f.get_tensor(token)
        assert stored.dtype == np.float32 and stored.shape == row_D.shape
        np.testing.assert_array_equal(stored, row_D)
    with open(os.path.join(out, "README.md")) as f:
        assert "load_textual_inversion" in f.read()


def test_names_and_configs_are_exactly_pytorchs(exported, pipe):
    """Same parameter names as PyTorch's modules (no missing, no extra) and no config key PyTorch ignores."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out, _ = exported
    for sub, weights, module in (("unet", "diffusion_pytorch_model", pipe.unet),
                                 ("vae", "diffusion_pytorch_model", pipe.vae),
                                 ("text_encoder", "model", pipe.text_encoder)):
        assert _keys(os.path.join(out, sub, f"{weights}.safetensors")) == set(module.state_dict()), sub
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with open(os.path.join(out, sub, "config.json")) as f:
            _, unused = cls.extract_init_dict(json.load(f))[:2]
        assert not unused, f"{sub}/config.json keys PyTorch ignores: {unused}"
    # the base vocabulary plus the two loaded tokens
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer) == 217 + len(TOKENS)


def test_unet_eps_matches_pytorch(run, pipe, tiny):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([17, 803], np.int32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    eps = jax.jit(lambda p, x, t, c: capture.unet_eps(run.bundle.unet, p, x, t, c))(  # eager: op by op, slower
        run.bundle.params["unet"], jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context))
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t.astype(np.int64)),
                        torch.from_numpy(context)).sample
    err = rel_err(eps, ref.numpy())
    print(f"UNet eps relative error {err:.2e}")
    assert err < 2e-5, f"UNet eps relative error {err:.2e}"
    # it is the run's tuned UNet that was exported, not the base one
    base_in = np.asarray(tiny.params["unet"]["conv_in"]["kernel"]).transpose(3, 2, 0, 1)
    assert not np.allclose(pipe.unet.conv_in.weight.detach().numpy(), base_in, atol=1e-3)


def test_text_hidden_states_with_tokens_match_pytorch(run, pipe):
    # each side tokenizes with its own tokenizer (the concept ids could differ)
    ours_ids = tokens.tokenize(run.bundle.tokenizer, PROMPTS, run.bundle.max_length)
    pt_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    for token in TOKENS:  # one piece each, present in the prompts
        assert (pt_ids == pipe.tokenizer.convert_tokens_to_ids(token)).sum() >= 1
    ours = run.hidden_states(jnp.asarray(ours_ids))
    with torch.no_grad():
        ref = pipe.text_encoder(pt_ids).last_hidden_state.numpy()
    err = rel_err(ours, ref)
    print(f"text hidden states relative error {err:.2e}")
    assert err < 1e-5, f"hidden states relative error {err:.2e}"


def test_vae_decode_matches_pytorch(pipe, tiny):
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
    ours = diffusion.decode_latents(tiny.vae, tiny.params["vae"], jnp.asarray(latents))
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(latents)).sample.numpy()
    err = rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref)
    print(f"VAE decode relative error {err:.2e}")
    assert err < 1e-4, f"VAE decode relative error {err:.2e}"


def _no_conv_transpose(key, value):  # HWIO.T = OIHW's shape for square kernels, but H and W are swapped
    name, pt = adapter.flax_to_pt_key(key, value)
    return name, (value.T if value.ndim == 4 else pt)


def _q_k_swapped(key, value):
    name, pt = adapter.flax_to_pt_key(key, value)
    return name.replace(".to_q.", ".to_TMP.").replace(".to_k.", ".to_q.").replace(".to_TMP.", ".to_k."), pt


def _flax_leaf_names(key, value):  # forgets scale -> weight: the forward rule would pass it through as is
    name, pt = adapter.flax_to_pt_key(key, value)
    return (name[: -len("weight")] + "scale", value) if key[-1] == "scale" else (name, pt)


@pytest.mark.parametrize("component", ["unet", "vae"])
@pytest.mark.parametrize("bogus", [_no_conv_transpose, _q_k_swapped, _flax_leaf_names])
def test_a_wrong_inverse_rule_is_caught(tiny, component, bogus):
    params = tiny.params[component]  # a params tree is its own shape tree
    with pytest.raises(export.ExportError, match="Flax -> PyTorch naming"):
        export.flax_to_pt_state(params, params, bogus, what=component)
    assert export.flax_to_pt_state(params, params, what=component)  # the real rule passes


def test_run_without_unet_exports_the_base_unet(tiny, tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", tiny, tuned=False)
    out = tmp_path / "out"
    assert export.main(["--run", run_dir, "--out", str(out), "--no-pipeline"]) == 0
    printed = capsys.readouterr().out
    assert "base UNet" in printed and "no unet/" in printed and "load_textual_inversion" in printed
    assert not (out / "model_index.json").exists() and not (out / "vae").exists()
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        conv_in = f.get_tensor("conv_in.weight")
    np.testing.assert_array_equal(conv_in, np.asarray(tiny.params["unet"]["conv_in"]["kernel"]).transpose(3, 2, 0, 1))
    assert json.loads((out / "tokens.json").read_text())["unet"] == "base"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_concepts", "concepts.safetensors is missing"),
    ("out_is_run", "is the run folder itself"),
    ("unwritable", "cannot write"),
    ("not_empty", "is not empty (1 entry: 'old.txt'); nothing was written. Choose a new folder, or pass "
                  "--overwrite"),
    ("holds_run", "holds the run folder"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, case, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.get_config().to_json())
    if case != "no_concepts":
        outputs.save_concepts(str(run_dir / "concepts.safetensors"), TOKENS, np.zeros((2, 32), np.float32))
    run = tmp_path / "nope" if case == "missing" else run_dir
    out = {"out_is_run": run_dir, "unwritable": run_dir / "config.json" / "sub",
           "holds_run": tmp_path}.get(case, tmp_path / "out")
    if case == "not_empty":
        out.mkdir()
        (out / "old.txt").write_text("another run's export")
    assert export.main(["--run", str(run), "--out", str(out)] + (["--overwrite"] if case == "holds_run" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_overwrite_replaces_and_a_failed_export_leaves_the_folder_as_it_was(tiny, tmp_path, monkeypatch, capsys):
    run_dir = write_run(tmp_path / "run", tiny, tuned=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "embeddings").mkdir()
    (out / "embeddings" / "old_token.safetensors").write_text("from another run")
    (out / "old.txt").write_text("from another run")
    argv = ["--run", run_dir, "--out", str(out), "--no-pipeline"]
    assert export.main(argv) == 2 and "is not empty" in capsys.readouterr().err
    assert (out / "old.txt").exists()  # refused: untouched

    def interrupted(cfg, run_dir, folder, out_dir, pipeline):
        (tmp_path / "staged_at").write_text(folder)
        with open(os.path.join(folder, "tokens.json"), "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(export, "_write_export", interrupted)
        assert export.main(argv + ["--overwrite"]) == 130  # Ctrl-C: a clean message, exit 130 (issue 31)
    assert "interrupted: nothing was exported" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "old.txt"]  # as it was
    assert not os.path.exists((tmp_path / "staged_at").read_text())  # the staging folder is gone
    (tmp_path / "staged_at").unlink()

    assert export.main(argv + ["--overwrite"]) == 0
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert "old.txt" not in got and "embeddings/old_token.safetensors" not in got  # replaced, not mixed
    assert {"tokens.json", "README.md", "unet/config.json", "embeddings/v1.safetensors"} <= set(got)
    assert json.loads((out / "tokens.json").read_text())["out"] == str(out)  # names where it ended up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging or old folders left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the usual permissions, not mkdtemp's private ones


def test_pytorch_pipeline_generates_our_images(run, pipe):
    """The whole path a user takes: the same prompt and starting noise through our generator and through
    PyTorch's StableDiffusionPipeline (DDIM, guidance) with the exported model and embeddings."""
    import diffusers

    from jaxconcept import generate

    settings = generate.Settings(num_images=2, steps=4, guidance=7.5, seed=1)
    ours = generate.generate(run, PROMPTS[:1], settings, progress=False)[0]
    noise = generate.initial_noise(settings.seed, 1, 2, (4, 16, 16))[0]
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(PROMPTS[0], num_images_per_prompt=2, latents=torch.tensor(noise), num_inference_steps=4,
                  guidance_scale=7.5, height=32, width=32, output_type="np").images
    diff = np.abs(np.round(theirs * 255).astype(int) - ours.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_a_multi_vector_token_loads_in_pytorch_as_its_vectors(exported, tiny, tmp_path):
    """A token of 2 vectors (tokens.vectors) is one n x D textual-inversion file; diffusers adds `<m>`, `<m>_1`
    and writes the token out in prompts itself: its text encoding equals ours."""
    from diffusers import StableDiffusionPipeline

    out, _ = exported
    rows = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    files = export.save_textual_inversion(str(tmp_path), ["<m>", "<s>"], rows, counts=[2, 1])
    with safe_open(os.path.join(tmp_path, files["<m>"]), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("<m>"), rows[:2])
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None)
    for token, file in files.items():
        pipe.load_textual_inversion(os.path.join(tmp_path, file), token=token)
    bundle, concepts = tokens.add_concept_tokens(tiny, ["<m>", "<s>"], None, vectors=[2, 1])
    prompt = ["a photo of <m> and <s> on the beach"]
    ours_ids = tokens.tokenize(bundle.tokenizer, prompt, bundle.max_length)
    assert bundle.tokenizer.convert_ids_to_tokens(ours_ids[0][4:6].tolist()) == ["<m>", "<m>_1"]
    ours = tokens.text_hidden_states(bundle.text_encoder, bundle.params["text_encoder"], jnp.asarray(ours_ids),
                                     concepts.ids_array, jnp.asarray(rows))
    pt_ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt[0], pipe.tokenizer), padding="max_length",
                            max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(pt_ids).last_hidden_state.numpy()
    assert rel_err(ours, ref) < 1e-5
