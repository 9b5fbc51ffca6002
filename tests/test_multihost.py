"""Multi-host: two processes (one CPU device each, joined with jax.distributed over localhost) run the
commands together and end where one process ends; process 0 writes the files.

Trained once for the module by two processes: two concept sets batched in one program (`train --job`; the job
axis split over the hosts, so each job runs whole on one host's device, and process 1's job is gathered to
process 0 to be written). The reference is a run of its own, in this process on one device: a job of a batch
learns what a run of its own learns (tests/test_jobs.py), so job_01, trained by process 1, must equal it; the
comparison checks the gathering too. (The same settings and scene as tests/test_jobs.py's reference run, so its
compiled programs come from the test session's cache.) A single run split over the hosts (its drawn batch
data-parallel) runs the same loop and steps as one process's run over two devices (tests/test_sharding.py); it is
not started again here, as each two-process command costs both cores for a minute.
Evaluation and generation run with two processes on the batch's runs; their one-process reference is this test
process (its images, metrics and files), so each multi-process command is started once."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conftest import FAST_COMPILE_FLAGS, set_fields
from jaxconcept.toy import scene

TOKENS = ("<a>", "<b>", "<bg>")  # tests/test_jobs.py's names and settings (its programs are in the cache)
MASK_FILES = ("image__a.png", "image__b.png", "image__bg.png")
# The token stage and its E-steps only: the joint stage's state (a UNet per job) leaves the hosts through the same
# gathering as the rows (`distributed.to_host`), and its program is one more two-process compile (~30 s of both
# cores); batched joint stages are tests/test_jobs.py's.
SETTINGS = {"model": "tiny", "tokens.steps": 4, "tokens.estep_every": 2, "joint.steps": 0,
            "masks.num_timesteps": 4, "log_every": 2}
TRAIN = [f"--config.{k}={v}" for k, v in SETTINGS.items()]
SAMPLE = ["--num-images", "2", "--steps", "3", "--seed", "5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    cache = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")  # the test session's compilation cache is shared
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_")) or k in cache}
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags, TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _start(args, processes: int) -> list:
    """`processes` == 1: one process with two devices; 2: two processes with one device each, joined."""
    cmd = [sys.executable, "-m", *args]
    if processes == 1:
        return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2))]
    port = _free_port()
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i))) for i in range(2)]


# each command: a hung collective (a process waiting for its peer) fails in minutes, not at CI's limit
DEADLINE_S = 300


def _communicate(proc, deadline: float, every: list):
    try:
        return proc.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for p in every:
            p.kill()
        _, err = proc.communicate()
        pytest.fail(f"multi-process command still running after {DEADLINE_S} s (a hung collective?); killed. "
                    f"stderr: {err[-2000:]}")


def _run(*commands) -> list[str]:
    """Run (args, processes) pairs one after another (the processes of one command together: more at once
    only oversubscribe 2 cores); the stdout of each one's process 0."""
    stdouts = []
    for args, n in commands:
        t0 = time.time()
        procs = _start(args, n)
        outs = [_communicate(p, t0 + DEADLINE_S, procs) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        if len(procs) > 1:
            quiet = [line for line in outs[1][0].splitlines() if line.strip() and not line.startswith("[Gloo]")]
            assert quiet == [], quiet  # process 1 prints nothing: process 0 reports
        stdouts.append(outs[0][0])
        print(f"{args[0]} ({n} process{'es' * (n > 1)}): {time.time() - t0:.0f} s")
    return stdouts


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


def _job(image) -> str:
    return f"{image}:<a>=red,<b>,<bg>=background/background"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import jax

    from jaxconcept import config, learner
    from jaxconcept.parallel import sharding
    from jaxconcept.runio import inputs

    root = tmp_path_factory.mktemp("multihost")
    images = []
    for seed in (340, 341):
        folder = root / f"scene_{seed}"
        scene.write_scene(scene.make_scene(seed, 32, 2), str(folder))
        images.append(str(folder / "image.png"))
    jobs = [a for image in images for a in ("--job", _job(image))]
    outs = _run((["jaxconcept.train", "--out", str(root / "multi" / "runs"), *TRAIN, *jobs], 2))
    spec = inputs.ImageSpec(images[1], (inputs.ConceptSpec("<a>", "red", "object", None),
                                        inputs.ConceptSpec("<b>", None, "object", None),
                                        inputs.ConceptSpec("<bg>", "background", "background", None)))
    learner.learn(set_fields(config.get_config(), SETTINGS), [spec], str(root / "single"), progress=False,
                  mesh=sharding.make_mesh(jax.devices()[:1]))
    return root, outs


def _same_run(a, b) -> None:
    x, y = load_file(str(a / "concepts.safetensors")), load_file(str(b / "concepts.safetensors"))
    for token in TOKENS:
        np.testing.assert_allclose(y[token], x[token], rtol=1e-4, atol=1e-5)
    for name in MASK_FILES:
        assert (b / "masks" / "final" / name).read_bytes() == (a / "masks" / "final" / name).read_bytes()
    lines = lambda run: (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert len(lines(b)) == len(lines(a))  # written once


def test_two_processes_train_a_run_like_one_process(trained):
    root, _ = trained
    _same_run(root / "multi" / "runs" / "job_01", root / "single")  # process 1's job = a run of its own


def test_two_processes_train_batched_jobs_each_written_once(trained):
    root, outs = trained
    assert "2 processes, 2 devices" in outs[0] and outs[0].count("done in") == 2
    runs = [root / "multi" / "runs" / job for job in ("job_00", "job_01")]
    rows = [load_file(str(run / "concepts.safetensors")) for run in runs]
    assert sorted(rows[0]) == sorted(rows[1]) == sorted(TOKENS)
    for token in TOKENS:  # two scenes: each job its own result, not one host's result twice
        assert np.abs(rows[0][token] - rows[1][token]).max() > 1e-6, token
    for run in runs:
        for name in MASK_FILES:
            assert _pixels(run / "masks" / "final" / name).any(), (run, name)
        logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in logged if "round" in x] == [0, 1, 2]  # written once, by process 0


def test_two_processes_evaluate_and_generate_like_one_process(trained, monkeypatch):
    import jax

    from jaxconcept import evaluate
    from jaxconcept.parallel import sharding

    root, _ = trained
    multi = root / "multi"
    run_dirs = [str(multi / "runs" / job) for job in ("job_00", "job_01")]
    two = multi / "eval"
    _run((["jaxconcept.evaluate", *(a for r in run_dirs for a in ("--run", r)), "--clip", "tiny-clip", "--template",
           "a photo of {}", "--out", str(two), *SAMPLE], 2),
         (["jaxconcept.generate", "--run", run_dirs[1], "--prompt", "a photo of <a>", "--prompt", "a photo of <b>",
           "--out", str(multi / "gen"), *SAMPLE], 2))
    one = root / "eval_one"  # the reference: one process (this one) on one device (a sharded batch computes what
    mesh = sharding.make_mesh(jax.devices()[:1])  # one device does: tests/test_generate.py), compiled 2x faster
    monkeypatch.setattr(sharding, "make_mesh", lambda *a, **k: mesh)
    assert evaluate.main([*(a for r in run_dirs for a in ("--run", r)), "--clip", "tiny-clip", "--template",
                          "a photo of {}", "--out", str(one), *SAMPLE]) == 0
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert r2["devices"] == 2 and r2["overall"]["images"] == r1["overall"]["images"] == 2 * 2 * 2
    for key, value in r1["overall"].items():
        if isinstance(value, float):
            assert abs(r2["overall"][key] - value) < 2e-3, key
    for f in (f for p in r1["prompts"] for f in p["files"]):  # gathered from both hosts, written by process 0
        assert np.abs(_pixels(two / f) - _pixels(one / f)).max() <= 1, f

    gen = json.loads((multi / "gen" / "generation.json").read_text())
    assert gen["devices"] == 2
    evaluated = [p for p in r2["prompts"] if p["run"].endswith("job_01")]
    assert [p["prompt"] for p in evaluated] == gen["prompts"]
    for made, p in zip(gen["files"], evaluated):  # same prompts, seed and settings: the images evaluation made
        for f, g in zip(made, p["files"]):
            assert np.abs(_pixels(multi / "gen" / f) - _pixels(two / g)).max() <= 1


def test_distributed_mode_is_checked():
    from jaxconcept.parallel import distributed

    with pytest.raises(ValueError, match="auto, on, off"):
        distributed.initialize("sometimes")
    assert distributed.initialize("off") is False
