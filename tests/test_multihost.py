"""Multi-host: two processes (one CPU device each, joined with jax.distributed over localhost) run the
training command together and end where one process with two devices ends; process 0 writes the files."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxconcept.toy import scene


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _args(image: str, out: str) -> list:
    return [sys.executable, "-m", "jaxconcept.train", "--out", out, "--config.model=tiny",
            "--config.tokens.steps=4", "--config.tokens.estep_every=2", "--config.joint.steps=2",
            "--config.masks.num_timesteps=4", "--config.log_every=2", "--config.tokens.batch_size=2",
            "--concepts", f"{image}:<tri>=red,<ring>,<bg>=background/background"]


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
    folder = tmp_path / "scene"
    scene.write_scene(scene.make_scene(340, 32, 2), str(folder))
    image = str(folder / "image.png")
    one = subprocess.run(_args(image, str(tmp_path / "one")), env=_env(2), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(_args(image, str(tmp_path / "multi")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 processes, 2 devices" in outs[0][0] and "done in" not in outs[1][0]  # process 0 reports
    a, b = load_file(str(tmp_path / "one" / "concepts.safetensors")), load_file(
        str(tmp_path / "multi" / "concepts.safetensors"))
    for token in ("<tri>", "<ring>", "<bg>"):
        np.testing.assert_allclose(b[token], a[token], rtol=1e-4, atol=1e-5)
    for name in ("image__tri.png", "image__ring.png", "image__bg.png"):
        assert (tmp_path / "multi" / "masks" / "final" / name).read_bytes() == \
            (tmp_path / "one" / "masks" / "final" / name).read_bytes()
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())  # written once


def test_distributed_mode_is_checked():
    from jaxconcept import distributed

    with pytest.raises(ValueError, match="auto, on, off"):
        distributed.initialize("sometimes")
    assert distributed.initialize("off") is False
