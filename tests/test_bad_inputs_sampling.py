"""Issue 31, the sampling side: bad inputs and interruptions of generate, evaluate and export end with a clear
message and the right exit code (2: fix the command; 1: writing failed; 130: Ctrl-C), nothing half-written and
nothing mixed. Cheap: the tiny model, run folders written directly (no training), most cases refused before
any model loads."""

import errno
import json
import os

import numpy as np
import pytest

from jaxconcept import config, evaluate, export, generate
from jaxconcept.model import loading, sampling
from jaxconcept.runio import outputs

TOKENS = ["<v1>", "<v2>"]


def write_run(folder, *, summary: bool = True) -> str:
    """A finished run folder on the tiny model as the learner leaves it, without a tuned UNet."""
    os.makedirs(folder, exist_ok=True)
    cfg = config.get_config()
    cfg.model, cfg.joint.steps = "tiny", 0
    (folder / "config.json").write_text(cfg.to_json())
    rows = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    outputs.save_concepts(str(folder / "concepts.safetensors"), TOKENS, rows, ["dog", None])
    if summary:
        (folder / "summary.json").write_text(json.dumps({
            "tokens": TOKENS, "template": "a photo of {}", "joiner": " and ",
            "concepts": [{"token": "<v1>", "kind": "object"}, {"token": "<v2>", "kind": "background"}]}))
    return str(folder)


def listing(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, ds, fs in os.walk(folder) for f in ds + fs)


def pictures(num_prompts: int, num_images: int, value: int) -> np.ndarray:
    return np.full((num_prompts, num_images, 8, 8, 3), value, np.uint8)


@pytest.fixture
def fake_sampling(monkeypatch, tiny):
    """main() without the slow part: the tiny model as loaded once, images of a constant colour."""
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny)
    monkeypatch.setattr(generate, "generate",
                        lambda source, prompts, s, **k: pictures(len(prompts), s.num_images, s.seed % 256))


@pytest.fixture
def fake_program(monkeypatch):
    """generate() as it is, but the compiled sampler replaced by one returning grey images at once."""
    import jax.numpy as jnp

    def make(bundle, *a, **k):
        size = bundle.resolution
        return lambda params, rows, noise, cond, uncond, g: jnp.zeros((noise.shape[0], size, size, 3))

    monkeypatch.setattr(sampling, "make_batch_sampler", make)


# ------------------------------------------------------------------------------ refused before any work


@pytest.mark.parametrize("extra,message", [
    (["--num-images", "1000000000"], "at most 10000 per command"),
    (["--seed", str(2 ** 64)], "out of range"),
    (["--seed", str(2 ** 200)], "out of range"),
    (["--guidance", "nan"], "--guidance nan is not a finite number"),
    (["--guidance", "inf"], "--guidance inf is not a finite number"),
    (["--batch-size", "-3"], "--batch-size -3"),
    (["--num-images", "0"], "at least 1 image"),
])
def test_bad_numbers_are_refused_before_loading(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "out"
    assert generate.main(["--model", "tiny", "--prompt", "a dog", "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()  # no empty folder left


def test_the_api_refuses_them_too(tiny):
    for bad in (dict(seed=2 ** 64), dict(guidance=float("nan")), dict(batch_size=-3), dict(num_images=20_000)):
        with pytest.raises(generate.JaxconceptError):
            generate.generate(tiny, ["a dog"], generate.Settings(**{"steps": 1, **bad}), progress=False)


def test_unfinished_run_says_so_and_how_to_finish(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.get_config().to_json())
    assert generate.main(["--run", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not finished" in err and "train command again" in err and "no prompt" not in err


@pytest.mark.parametrize("command", ["generate", "evaluate", "export"])
@pytest.mark.parametrize("damage", [b"", b"garbage" * 20, None])
def test_damaged_concepts_file_is_named_with_what_to_do(command, damage, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    run = write_run(tmp_path / "run")
    path = os.path.join(run, "concepts.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2] if damage is None else damage)  # None: cut off half way
    out = str(tmp_path / "out")
    argv = {"generate": ["--run", run, "--prompt", "a <v1>", "--out", out],
            "evaluate": ["--run", run, "--num-images", "1", "--out", out],
            "export": ["--run", run, "--out", out]}[command]
    assert getattr({"generate": generate, "evaluate": evaluate, "export": export}[command], "main")(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot read the learned concepts {path!r}" in err and "damaged" in err and "train command" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ --out: replaced, never mixed


def test_repeated_generate_replaces_its_previous_output_as_a_whole(tmp_path):
    out = tmp_path / "samples"
    generate.save_generation(str(out), ["a dog", "a cat"], pictures(2, 3, 10), generate.Settings(seed=1), {})
    first = listing(out)
    assert len(first) == 2 + 2 * 3 + 2  # 2 folders, 6 PNGs, grid, record
    generate.save_generation(str(out), ["a red dog"], pictures(1, 1, 20), generate.Settings(seed=2), {})
    record = json.loads((out / "generation.json").read_text())
    assert listing(out) == ["00_a_red_dog", "00_a_red_dog/sample_00.png", "generation.json", "grid.png"]
    assert record["files"] == [["00_a_red_dog/sample_00.png"]] and record["settings"]["seed"] == 2
    assert sorted(os.listdir(tmp_path)) == ["samples"]  # no staging or old folder left beside it


def test_a_folder_with_other_files_is_refused_unless_overwrite(tmp_path, capsys, fake_sampling):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.jpg").write_text("a user's photo")
    argv = ["--model", "tiny", "--prompt", "a dog", "--num-images", "2", "--out", str(out)]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert "'holiday.jpg'" in err and "--overwrite" in err and listing(out) == ["holiday.jpg"]
    assert generate.main(argv + ["--overwrite"]) == 0
    assert "holiday.jpg" not in listing(out) and (out / "generation.json").is_file()
    # a previous output with a file added (or one an older version mixed) is not replaced silently either
    (out / "00_a_dog" / "sample_07.png").write_bytes(b"old")
    assert generate.main(argv) == 2 and "'00_a_dog/sample_07.png'" in capsys.readouterr().err
    run = write_run(tmp_path / "run")
    for bad in (run, str(tmp_path)):  # the run itself, or a folder holding it: never, even with --overwrite
        assert generate.main(["--run", run, "--prompt", "a <v1>", "--out", bad, "--overwrite"]) == 2
        assert "would delete the run" in capsys.readouterr().err
    # the default RUN/samples, twice: the second replaces the first and says so
    assert generate.main(["--run", run, "--num-images", "3", "--seed", "5"]) == 0
    assert generate.main(["--run", run, "--num-images", "1", "--seed", "6"]) == 0
    assert "previous images there were replaced" in capsys.readouterr().out
    assert listing(os.path.join(run, "samples")) == ["00_a_photo_of_v1", "00_a_photo_of_v1/sample_00.png",
                                                     "generation.json", "grid.png"]


# ------------------------------------------------------------------------------ interruptions and a full disk


def test_ctrl_c_while_generating_or_writing_leaves_the_previous_output(tmp_path, capsys, monkeypatch, fake_sampling):
    out = tmp_path / "samples"
    argv = ["--model", "tiny", "--prompt", "a dog", "--num-images", "3", "--out", str(out)]
    assert generate.main(argv) == 0
    before = {p: (out / p).read_bytes() for p in listing(out) if (out / p).is_file()}

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(generate, "generate", ctrl_c)
        assert generate.main(argv + ["--seed", "9"]) == 130
    saves = []

    def second_png_interrupted(pic, path):
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(pic, path)

    real_save = generate._save_png
    monkeypatch.setattr(generate, "_save_png", second_png_interrupted)
    assert generate.main(argv + ["--seed", "9"]) == 130
    assert capsys.readouterr().err.count("interrupted: no image was written") == 2
    assert {p: (out / p).read_bytes() for p in listing(out) if (out / p).is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["samples"]


def test_a_full_disk_leaves_no_partial_file_and_says_so(tmp_path, capsys, monkeypatch, fake_sampling):
    from PIL import Image

    out = tmp_path / "samples"
    argv = ["--model", "tiny", "--prompt", "a dog", "--num-images", "3", "--out", str(out)]
    real_save, calls = Image.Image.save, []

    def disk_full(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 2:
            open(fp, "wb").close()  # what a full disk leaves: a 0-byte file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fp)
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert generate.main(argv) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Nothing was written" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # neither a 0-byte PNG nor a generation.json, nor the staging folder


# ------------------------------------------------------------------------------ the noise is made per batch


def test_noise_is_made_per_batch_and_equals_the_whole(tiny, monkeypatch, fake_program):
    whole = generate.initial_noise(3, 2, 3, (4, 4, 4))
    part = sampling.initial_noise_for(3, [1, 0], [2, 1], (4, 4, 4))
    np.testing.assert_array_equal(np.asarray(part), whole[[1, 0], [2, 1]])
    sizes, real = [], sampling.initial_noise_for

    def spy(seed, p_B, k_B, shape):
        sizes.append(len(p_B))
        return real(seed, p_B, k_B, shape)

    monkeypatch.setattr(sampling, "initial_noise_for", spy)
    generate.generate(tiny, ["a dog"], generate.Settings(num_images=5, steps=1, batch_size=4), progress=False)
    assert sizes == [4, 4]  # one batch at a time, none for all images up front
    assert generate.batch_plan(5, 10 ** 9, 4) == 8  # a huge --batch-size: no huge batch of padding


# ------------------------------------------------------------------------------ export and evaluate


def test_export_overwrite_through_a_link_keeps_the_link(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    target = tmp_path / "disk" / "export"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("a previous export")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "sd"
    link.symlink_to(target)
    assert export.main(["--run", run, "--out", str(link), "--no-pipeline", "--overwrite"]) == 0
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert (target / "tokens.json").is_file() and not (target / "old.txt").exists()
    assert os.listdir(tmp_path / "links") == ["sd"] and os.listdir(tmp_path / "disk") == ["export"]  # nothing stray
    capsys.readouterr()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    export._write_export, saved = ctrl_c, export._write_export
    try:
        assert export.main(["--run", run, "--out", str(link), "--no-pipeline", "--overwrite"]) == 130
    finally:
        export._write_export = saved
    assert "interrupted: nothing was exported" in capsys.readouterr().err
    assert (target / "tokens.json").is_file() and os.listdir(tmp_path / "disk") == ["export"]


def test_evaluate_without_clip_names_what_needs_it_and_counts_every_image(tmp_path, capsys, fake_program):
    run = write_run(tmp_path / "run")
    argv = ["--run", run, "--template", "a photo of {}", "--template", "a photo of {}", "--num-images", "2",
            "--steps", "1", "--out", str(tmp_path / "eval")]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("4 images, 2 prompts")  # two identical prompts: 4 images made, not 2
    assert "not measured: clip_i, clip_t, diversity, presence_clip_multi" in printed and "--clip " in printed
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["overall"]["images"] == 4 and "--clip" in result["not_measured"]["clip_i"]


# ------------------------------------------------------------------------------ diffusers' own Flax pipeline


def test_diffusers_flax_pipeline_loads_a_written_model_folder_without_extra_arguments(tiny, tmp_path):
    from diffusers import FlaxStableDiffusionPipeline

    loading.save_flax(tiny, str(tmp_path / "m"))
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["safety_checker"][1] is None and index["feature_extractor"][1] is None
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert pipe.safety_checker is None and pipe.feature_extractor is None and "unet" in params
    shipped = json.loads(open(os.path.join(loading._NAMED_FOLDERS["toy"], "model_index.json")).read())
    assert {k: shipped[k] for k in ("safety_checker", "feature_extractor")} == \
        {k: index[k] for k in ("safety_checker", "feature_extractor")}


def test_damaged_summary_is_named_with_what_to_do(tmp_path):
    from jaxconcept.errors import JaxconceptError
    from jaxconcept.runio import runs

    (tmp_path / "summary.json").write_text('{"tokens": ["<a>"')  # cut off
    with pytest.raises(JaxconceptError, match=r"summary\.json.*damaged.*train command again"):
        runs.read_summary(str(tmp_path))
