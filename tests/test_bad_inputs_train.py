"""Issue 31, the training side: bad inputs and interruptions end with a clear message (exit 2 on the command
line) or recover by themselves and say so. One tiny run (stopped by a real SIGINT, then resumed) serves every
test that needs a trained folder; the rest need no training."""

import errno
import json
import os
import re
import shutil
import signal
import stat

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import set_fields
from jaxconcept import config, settings
from jaxconcept.em import data, jobs, learner
from jaxconcept.em.prepare import check_inputs
from jaxconcept.errors import JaxconceptError
from jaxconcept.parallel import sharding
from jaxconcept.runio import checkpoints, inputs, outputs, runfolder
from jaxconcept.toy import scene


def _cfg(**changes):
    c = config.get_config()
    c.model = "tiny"
    c.tokens.steps, c.tokens.estep_every, c.joint.steps = 4, 2, 0
    c.masks.num_timesteps, c.log_every = 2, 2
    return set_fields(c, changes)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    scene.write_scene(scene.make_scene(340, 32, 2), str(folder))
    return folder


def _spec(folder, masks=True):
    m = (lambda name: str(folder / f"mask_{name}.png")) if masks else (lambda name: None)
    return inputs.ImageSpec(str(folder / "image.png"), (
        inputs.ConceptSpec("<tri>", "red", "object", m("red_triangle")),
        inputs.ConceptSpec("<ring>", None, "object", m("purple_dotted_ring")),
        inputs.ConceptSpec("<bg>", "background", "background", m("background")),
    ))


def _learn(*args, **kwargs):
    return learner.learn(*args, mesh=sharding.make_mesh(jax.devices()[:1]), progress=False, **kwargs)


def _tree(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def run(scene_dir, tmp_path_factory):
    """A finished tiny run (mode em, masks given with '@'), first stopped by a real SIGINT after stage 1."""
    out = tmp_path_factory.mktemp("train") / "run"
    got = {}

    def ctrl_c(meta):
        if meta["index"] == 0:
            os.kill(os.getpid(), signal.SIGINT)  # only sets the flag: the step boundary right after stops the run
            got["went_on"] = True  # not interrupted here, inside a callback (where it could be swallowed)

    got["handler_before"] = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background
    with pytest.raises(KeyboardInterrupt):
        _learn(_cfg(), [_spec(scene_dir)], str(out), on_checkpoint=ctrl_c)
    got["after_sigint"] = checkpoints.manager(str(out)).all_steps()
    got["handler_after"] = signal.getsignal(signal.SIGINT)
    got["summary"] = _learn(_cfg(), [_spec(scene_dir)], str(out))
    return out, got


def test_sigint_stops_at_the_next_step_and_the_run_resumes(run):
    out, got = run
    assert got["went_on"] and got["after_sigint"] == [0]  # stopped before token step 1: no later checkpoint
    assert got["handler_after"] is got["handler_before"]  # the handler is only there while training
    assert got["summary"]["rounds"] == 2 and (out / "concepts.safetensors").exists()


# ------------------------------------------------------------------------------------------ recoveries


def _results(out):
    return ((out / "concepts.safetensors").read_bytes(),
            {p.name: p.read_bytes() for p in sorted((out / "masks" / "final").iterdir())},
            (out / "summary.json").read_text().replace(str(out), "RUN"))


def test_damaged_newest_checkpoint_deleted_round_masks_and_cut_metrics_recover(run, scene_dir, tmp_path, capsys):
    src, _ = run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = _results(out)
    for f in (out / "checkpoints" / "5" / "state").rglob("*"):  # the final checkpoint, cut short
        if f.is_file():
            f.write_bytes(f.read_bytes()[:10])
    shutil.rmtree(out / "masks" / "round_01")
    text = (out / "metrics.jsonl").read_text()
    assert '"round": 2' in text.splitlines()[-1]
    (out / "metrics.jsonl").write_text(text[:-40])  # round 2's entry cut off: what a crash (or power loss) leaves
    capsys.readouterr()
    summary = _learn(_cfg(), [_spec(scene_dir)], str(out))
    printed = capsys.readouterr().out
    assert "checkpoint 5 cannot be read" in printed and "checkpoints_damaged" in printed
    assert "resuming" in printed and "from checkpoint 4" in printed
    assert "round(s) 01 were missing or unreadable; written again from the checkpoints" in printed
    assert "dropped its last line" in printed and "round(s) 2 were missing; rebuilt from the round masks" in printed
    assert (out / "masks" / "round_01" / "image__tri.png").exists()
    assert (out / "checkpoints_damaged" / "5").is_dir() and (out / "checkpoints" / "5").is_dir()
    after = _results(out)
    assert after[0] == before[0] and after[1] == before[1]
    old = json.loads(before[2])
    assert summary["final_round"] == old["final_round"] and summary["rounds"] == 2
    assert summary["mask_change_by_round"] == old["mask_change_by_round"]
    assert summary["iou_by_round"] == old["iou_by_round"]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["round"] for x in lines if "round" in x] == [0, 1, 2] and lines[-1].get("rebuilt")


def test_disk_full_is_one_message_and_the_run_resumes(run, scene_dir, tmp_path, monkeypatch):
    src, _ = run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = _results(out)
    (out / "concepts.safetensors").unlink()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_concepts", full)
    with pytest.raises(checkpoints.DiskFullError,
                       match=r"is full .*last checkpoint is 5\. Free some space and start the same command again"):
        _learn(_cfg(), [_spec(scene_dir)], str(out))
    monkeypatch.undo()
    _learn(_cfg(), [_spec(scene_dir)], str(out))
    assert _results(out)[:2] == before[:2]


def test_a_checkpoint_is_not_started_without_the_disk_space_for_it(tmp_path, monkeypatch):
    mngr = checkpoints.manager(str(tmp_path / "r"))
    monkeypatch.setattr(checkpoints, "free_bytes", lambda path: 1000)
    with pytest.raises(checkpoints.DiskFullError, match="not enough disk space for checkpoint 3"):
        checkpoints.save(mngr, 3, {"stage": "token"}, {"params": {"rows": np.zeros((4, 8))}}, np.zeros((1, 2, 4, 4)))
    assert mngr.all_steps() == []


def test_when_no_checkpoint_can_be_read_none_is_moved(tmp_path):
    mngr = checkpoints.manager(str(tmp_path / "r"))
    for i in (0, 2):
        checkpoints.save(mngr, i, {"stage": "token", "round": i}, {"rows": np.full((2, 4), i, np.float32)},
                         np.zeros((1, 2, 4, 4)))
    for f in (tmp_path / "r" / "checkpoints").rglob("metadata"):
        f.write_text("{")
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint in .* can be read \(checkpoint 2: "
                                                          r"JSONDecodeError.*nothing was changed"):
        checkpoints.restore_newest(mngr, lambda meta: None)
    assert mngr.all_steps() == [0, 2] and not (tmp_path / "r" / checkpoints.DAMAGED).exists()


def test_finished_run_without_checkpoints_is_not_retrained_silently(run, scene_dir, tmp_path, capsys):
    src, _ = run
    out = tmp_path / "run"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("checkpoints"))
    before = _tree(out)
    with pytest.raises(runfolder.RunFolderError, match=r"finished run whose checkpoints/ are gone.*--retrain"):
        _learn(_cfg(), [_spec(scene_dir)], str(out))
    assert _tree(out) == before
    s = settings.resolve(_cfg())
    learner.start_folder(s, [_spec(scene_dir)], str(out), retrain=True)  # confirmed: it goes on, and says so
    assert "training it again from scratch (--retrain)" in capsys.readouterr().out


def test_damaged_run_json_is_named(run, scene_dir, tmp_path):
    src, _ = run
    out = tmp_path / "run"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("checkpoints"))
    (out / "run.json").write_text('{"fingerprint": {"ima')
    with pytest.raises(runfolder.RunFolderError, match=r"run.json' is damaged \(JSONDecodeError.*Restore the file"):
        _learn(_cfg(), [_spec(scene_dir)], str(out))


def test_cut_metrics_line_is_dropped_and_said(tmp_path):
    good = [{"stage": "token", "step": 2, "loss": 1.0}, {"round": 0, "index": 0}, {"stage": "token", "step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in good) + '{"stage": "jo')
    m = runfolder.Metrics(str(tmp_path), through=4)
    m.close()
    assert "dropped its last line (4), cut off" in m.note and len(m.rounds) == 1
    assert [json.loads(x) for x in open(tmp_path / "metrics.jsonl")] == good


# ------------------------------------------------------------------------------------------ refused up front


@pytest.mark.parametrize("tokens, shared", [(("<k+1>", "<k_1>", "<k_1_2>"), "k_1"), (("<Dog>", "<dog>"), "Dog")])
def test_tokens_sharing_a_file_name_are_refused(tokens, shared, tmp_path):
    spec = inputs.ImageSpec("a.png", tuple(inputs.ConceptSpec(t) for t in tokens))
    with pytest.raises(inputs.InputError, match=re.escape(f"{tokens[0]!r} and {tokens[1]!r} would share the file "
                                                          f"name {shared!r}")):
        inputs.validate([spec])
    from jaxconcept import train

    with pytest.raises(inputs.InputError, match=r"--job number 2 .*'<k\+1>' and '<k_1>' would share"):
        train.resolve_jobs(["a.png:<a>", "a.png:<k+1>;b.png:<k_1>"])  # across images of one job: named as written


def test_a_folder_that_is_not_a_run_is_refused_before_writing(scene_dir, tmp_path):
    out = tmp_path / "export"
    (out / "unet").mkdir(parents=True)
    (out / "model_index.json").write_text("{}")
    (out / "unet" / "config.json").write_text("{}")
    before = _tree(out)
    for call in (lambda: _learn(_cfg(), [_spec(scene_dir)], str(out)),
                 lambda: jobs.learn_many(_cfg(), [[_spec(scene_dir)]], str(out))):
        with pytest.raises(runfolder.RunFolderError, match=r"is not a run folder \(it has no run.json\).*"
                                                           r"model_index.json, unet/: a diffusers pipeline folder"):
            call()
    assert _tree(out) == before


def test_too_many_concepts_in_one_image_are_refused_at_once(scene_dir):
    spec = inputs.ImageSpec(str(scene_dir / "image.png"), tuple(inputs.ConceptSpec(f"<c{i}>") for i in range(20)))
    with pytest.raises(inputs.JaxconceptError, match=r"has 20 concepts; at most 10 per image.*1,048,575 prompts"):
        check_inputs([spec])
    assert data.num_prompts([data.MAX_CONCEPTS_PER_IMAGE]) == 1023


def test_a_folder_given_as_the_image_is_named_as_a_folder(scene_dir):
    spec = inputs.ImageSpec(str(scene_dir), (inputs.ConceptSpec("<v>"),))
    with pytest.raises(inputs.InputError, match="is a folder, not an image file"):
        check_inputs([spec])


def test_seed_beyond_64_bits_is_a_config_error():
    with pytest.raises(settings.ConfigError, match=r"seed = 18446744073709551616 is not allowed: use an integer in"):
        settings.resolve(_cfg(seed=2 ** 64))
    settings.resolve(_cfg(seed=2 ** 63 - 1))


def test_config_file_with_a_syntax_error_is_one_line(tmp_path, capsys):
    from absl import flags

    from jaxconcept import train

    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    try:
        with pytest.raises(SystemExit) as exit_:
            train.parse_flags(["train", "--config", str(bad)])
    finally:
        flags.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"syntax error ({bad}, line 1: def get_config(:): invalid syntax" in err


def test_prior_images_are_in_the_fingerprint(scene_dir, tmp_path):
    prior = tmp_path / "prior"
    prior.mkdir()
    shutil.copy(scene_dir / "image.png", prior / "a.png")
    s = settings.resolve(_cfg(**{"prior.folder": str(prior)}))
    fp = runfolder.fingerprint(s, [_spec(scene_dir)])
    assert "prior" not in runfolder.fingerprint(settings.resolve(_cfg()), [_spec(scene_dir)])  # older runs resume
    (tmp_path / "run").mkdir()
    outputs.write_json(str(tmp_path / "run" / "run.json"), {"fingerprint": fp, "finished": False})
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(prior / "a.png")
    with pytest.raises(runfolder.RunFolderError, match="prior-preservation images"):
        runfolder.check_fingerprint(str(tmp_path / "run"), runfolder.fingerprint(s, [_spec(scene_dir)]))


# ------------------------------------------------------------------------------------------ notes and files


def test_masks_in_mode_em_get_a_note(scene_dir, tmp_path, capsys):
    learner.start_folder(settings.resolve(_cfg()), [_spec(scene_dir)], str(tmp_path / "r"))
    assert "only measure the learned masks (IoU) in mode 'em'" in capsys.readouterr().out
    learner.start_folder(settings.resolve(_cfg(mode="user")), [_spec(scene_dir)], str(tmp_path / "r"))
    assert "IoU" not in capsys.readouterr().out


def test_an_out_folder_made_for_a_run_that_failed_early_is_removed(scene_dir, tmp_path, tiny):
    out = tmp_path / "new" / "run"
    spec = inputs.ImageSpec(str(scene_dir / "image.png"), (inputs.ConceptSpec("dog"),))  # in the vocabulary
    with pytest.raises(JaxconceptError, match="dog"):
        _learn(_cfg(), [spec], str(out), bundle=tiny)
    assert not (tmp_path / "new").exists()


def test_concepts_file_is_0644_and_the_same_bytes_every_time(tmp_path):
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    blobs = []
    for k in range(4):
        outputs.save_concepts(str(tmp_path / f"c{k}.safetensors"), ["<a>", "<b>", "<c>"], rows, ["x", None, "y"])
        blobs.append((tmp_path / f"c{k}.safetensors").read_bytes())
    assert all(b == blobs[0] for b in blobs)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "c0.safetensors").st_mode) == 0o666 & ~umask
    back = outputs.load_concepts(str(tmp_path / "c0.safetensors"))
    np.testing.assert_array_equal(back["<b>"], rows[1])


def test_next_commands_quote_paths_with_spaces():
    from jaxconcept import train

    text = train.summary_text({"seconds": 1, "tokens": ["<a>"], "images": ["x"], "mode": "em", "rounds": 2,
                               "mask_area": {"<a>": 0.5}, "run": "/tmp/my runs/a"})
    assert "--run '/tmp/my runs/a'" in text and "--out '/tmp/my runs/a_pytorch'" in text
