"""The package's start (jaxconcept/__init__.py): the commands started with `python -m` skip PyTorch, which
diffusers would import whenever it is installed; anything else imports as usual."""

import os
import subprocess
import sys

import pytest
from PIL import Image

import jaxconcept


def test_which_starts_skip_torch():
    skip = jaxconcept._started_as_a_torch_free_command
    assert skip(["python", "-m", "jaxconcept.train", "--out", "run"])
    assert skip(["python3", "-X", "importtime", "-m", "jaxconcept.generate"])
    assert not skip(["python", "-m", "jaxconcept.bench.speed", "--config", "tiny"])  # its PyTorch reference
    assert not skip(["python", "notebook.py"]) and not skip(["python", "-m"]) and not skip([])


def test_a_command_starts_without_importing_torch(tmp_path):
    pytest.importorskip("torch")  # installed here: diffusers would import it
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "jaxconcept.train", "--config.model=tiny",
                           "--out", "run", "--concepts", "dot.png:<a>=dog"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and "error: image 'dot.png' is 1x1 pixels" in proc.stderr  # diffusers was imported
    # {module: cumulative import time in microseconds}; a refused `import torch` is listed, taking microseconds
    imported = {line.split("|")[-1].strip(): int(line.split("|")[1]) for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line and line.split("|")[1].strip().isdigit()}
    torch_us = max(us for name, us in imported.items() if name == "torch" or name.startswith("torch."))
    assert "diffusers" in imported and torch_us < 1000, torch_us  # importing torch takes seconds
