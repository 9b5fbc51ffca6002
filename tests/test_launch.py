"""launch/: the TPU VM and GPU box scripts and the Colab notebook.

No cloud here: a fake `gcloud` (a Python script on PATH) logs its arguments and, for the end-to-end test, plays a
one-worker TPU VM in a temporary home folder (ssh --command runs in bash there, scp copies files), with a fake
venv whose `python` stands in for pip and the learner. The notebook's toy cells run for real on the tiny model.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap

from conftest import FAST_COMPILE_FLAGS


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(ROOT, "launch", "tpu_vm.sh")
GPU_SH = os.path.join(ROOT, "launch", "gpu_box.sh")
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu.ipynb")
BASH = shutil.which("bash") or "/bin/bash"
SCRIPT_VARS = ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "SPOT", "QUEUED", "REPO_URL",
               "REPO_REF", "SRC_DIR", "DATA", "REMOTE_DIR", "VENV", "PYTHON_VERSION", "JAX_PIP", "RUN_ARGS", "OUT",
               "LOCAL_DIR", "FETCH_CHECKPOINTS", "WORKER", "DRY_RUN", "GCLOUD", "PYTHON", "LOG")
RUN_ARGS = '--config configs/em_sd.py --concepts "dog.jpg:<dog>=dog,<room>=room/background"'
TRAIN_ARGV = ["--config", "configs/em_sd.py", "--concepts", "dog.jpg:<dog>=dog,<room>=room/background",
              "--out", "runs/dog"]

FAKE_GCLOUD = '''#!{python}
"""Fake gcloud: logs argv (one JSON list a line); with FAKE_TPU_HOME set, plays a one-worker TPU VM there."""
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
home = os.environ.get("FAKE_TPU_HOME")
if not home or args[:3] != ["compute", "tpus", "tpu-vm"]:
    sys.exit(0)
name = os.environ["FAKE_TPU_NAME"]
if args[3] == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    env = dict(os.environ, HOME=home, PATH=os.environ["FAKE_TPU_PATH"])
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
if args[3] == "scp":
    *sources, dest = [a for a in args[4:] if not a.startswith("--")]
    where = lambda p: os.path.join(home, p[len(name) + 1:]) if p.startswith(name + ":") else p
    for src in map(where, sources):
        target = where(dest)
        if os.path.isdir(target) or dest.endswith("/"):
            target = os.path.join(target, os.path.basename(src.rstrip("/")))
        if os.path.isdir(src):
            assert "--recurse" in args, "scp of a folder without --recurse"
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
'''

FAKE_PYTHON = '''#!/bin/bash
# the venv's python on the fake worker: pip and imports do nothing; jaxconcept.train writes a small run folder
if [ "$1" = -c ]; then echo "imports ok"; exit 0; fi
if [ "$1 $2" = "-m pip" ]; then echo "pip $*" >> "$HOME/pip.log"; exit 0; fi
if [ "$1 $2" = "-m jaxconcept.train" ]; then
  shift 2
  printf '%s\\n' "$@" > "$HOME/train_argv"
  pwd > "$HOME/train_cwd"
  while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
  mkdir -p "$out/checkpoints/0" "$out/overlays"
  echo '{{"tokens": ["<dog>", "<room>"]}}' > "$out/summary.json"
  echo ckpt > "$out/checkpoints/0/state"
  echo "learning done"
  exit ${{FAKE_TRAIN_RC:-0}}
fi
echo "unexpected python call: $*" >&2; exit 9
'''


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update({k: str(v) for k, v in changes.items()})
    return env


def _sh(script, *args, env, cwd=None, timeout=120):
    return subprocess.run([BASH, script, *args], env=env, cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    return bin_dir


def _fake_src(tmp_path):
    """A stand-in for the repository (install copies it to the workers)."""
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'jaxconcept'\n")
    (src / "configs" / "em_sd.py").write_text("# config\n")
    (src / "runs").mkdir()
    (src / "runs" / "old.txt").write_text("not copied")
    return src


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _commands(calls, verb):
    return [c for c in calls if c[:4] == ["compute", "tpus", "tpu-vm", verb]]


def _script_of(call):
    return next(a.split("=", 1)[1] for a in call if a.startswith("--command="))


# ------------------------------------------------------------------------------------------ scripts


def test_scripts_are_valid_bash():
    for script in (TPU_SH, GPU_SH):
        result = subprocess.run([BASH, "-n", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_tpu_help_lists_the_environment():
    result = _sh(TPU_SH, "--help", env=_env(GCLOUD="/nonexistent/gcloud"))  # help needs no gcloud
    assert result.returncode == 0, result.stderr
    for var in ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "REPO_URL", "SRC_DIR",
                "RUN_ARGS", "OUT", "DRY_RUN"):
        assert var in result.stdout, var
    for command in ("create", "install", "run", "fetch", "ssh", "delete", "all"):
        assert f"\n  {command} " in result.stdout, command
    assert "(v4-8)" in result.stdout and "(auto: tpu-ubuntu2204-base)" in result.stdout  # the defaults


def test_tpu_clear_error_without_gcloud(tmp_path):
    result = _sh(TPU_SH, "create", env=_env(PATH=str(tmp_path)))  # an empty PATH folder: no gcloud
    assert result.returncode == 2
    assert "gcloud" in result.stderr and "not on PATH" in result.stderr and "DRY_RUN=1" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_tpu_bad_input_is_refused_before_gcloud(tmp_path):
    bad_name = _sh(TPU_SH, "create", env=_env(TPU_NAME="My_TPU", DRY_RUN=1))
    assert bad_name.returncode == 2 and "TPU_NAME" in bad_name.stderr
    unknown = _sh(TPU_SH, "create", env=_env(ACCELERATOR_TYPE="v9-8", DRY_RUN=1))
    assert unknown.returncode == 2 and "RUNTIME_VERSION" in unknown.stderr
    verb = _sh(TPU_SH, "launch", env=_env(DRY_RUN=1))
    assert verb.returncode == 2 and "unknown command 'launch'" in verb.stderr


def test_tpu_dry_run_prints_a_script_of_every_command(tmp_path):
    """DRY_RUN=1 runs no gcloud; its output is a shell script whose gcloud calls are the ones of a real run."""
    bin_dir = _fake_gcloud(tmp_path)
    log = tmp_path / "gcloud.log"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=log, DRY_RUN=1,
               TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32", PROJECT="my-proj",
               RUN_ARGS=RUN_ARGS, OUT="runs/dog", LOCAL_DIR=tmp_path / "back", TMPDIR=tmp_path,
               SRC_DIR=_fake_src(tmp_path))
    result = _sh(TPU_SH, "all", env=env)
    assert result.returncode == 0, result.stderr
    assert not log.exists(), "DRY_RUN ran gcloud"
    assert not (tmp_path / "back").exists() and not (tmp_path / "jaxconcept-src-pod.tar.gz").exists()
    plan = tmp_path / "plan.sh"
    plan.write_text(result.stdout)
    replay = subprocess.run([BASH, str(plan)], env=_env(PATH=env["PATH"], FAKE_GCLOUD_LOG=log), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    calls = _calls(log)

    create, = [c for c in calls if c[3] == "create"]
    assert create == ["compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b", "--project=my-proj",
                      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
    ssh = _commands(calls, "ssh")
    install = [c for c in ssh if "pip install" in _script_of(c)]
    assert len(install) == 1 and "--worker=all" in install[0]
    script = _script_of(install[0])
    assert script.index("jax\\[tpu\\]") < script.index("pip install -q -e jaxconcept")  # JAX for TPU first
    run = [c for c in ssh if "jaxconcept.train" in _script_of(c) and "nohup" in _script_of(c)]
    assert len(run) == 1 and "--worker=all" in run[0]
    assert f"python -m jaxconcept.train {RUN_ARGS} --out runs/dog" in _script_of(run[0])
    copy_source = [c for c in _commands(calls, "scp") if "pod:jaxconcept-src.tar.gz" in c]
    assert len(copy_source) == 1 and "--worker=all" in copy_source[0]
    fetch = [c for c in _commands(calls, "scp") if "--recurse" in c]
    assert fetch == [["compute", "tpus", "tpu-vm", "scp", "--recurse", "pod:jaxconcept/.jaxconcept-fetch/dog",
                      f"{tmp_path / 'back'}/", "--zone=us-central2-b", "--project=my-proj", "--worker=0"]]
    steps = [calls.index(c) for c in (create, copy_source[0], install[0], run[0], fetch[0])]
    assert steps == sorted(steps)


def test_tpu_runtime_versions_queued_resources_and_delete(tmp_path):
    def plan(*commands, **env):
        result = _sh(TPU_SH, *commands, env=_env(DRY_RUN=1, TPU_NAME="t", ZONE="z", **env))
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "--version=v2-alpha-tpuv5-lite" in plan("create", ACCELERATOR_TYPE="v5litepod-8")
    assert "--version=v2-alpha-tpuv6e" in plan("create", ACCELERATOR_TYPE="v6e-8")
    assert "--version=mine --spot" in plan("create", RUNTIME_VERSION="mine", SPOT=1)
    queued = plan("create", "delete", QUEUED=1, ACCELERATOR_TYPE="v5p-8")
    assert ("gcloud compute tpus queued-resources create t-qr --node-id=t --zone=z --accelerator-type=v5p-8 "
            "--runtime-version=v2-alpha-tpuv5") in queued
    assert "gcloud compute tpus queued-resources delete t-qr --zone=z --force --quiet" in queued
    assert "gcloud compute tpus tpu-vm delete t --zone=z --quiet" in plan("delete")
    cloned = plan("install", REPO_URL="https://example.com/x/jaxconcept.git", REPO_REF="v1")
    assert "git clone --depth 1 --branch v1 https://example.com/x/jaxconcept.git jaxconcept" in cloned
    assert "tar -C" not in cloned  # nothing local is copied when the workers clone
    other = plan("run", RUN_CMD="python -m jaxconcept.generate", RUN_ARGS="--run runs/dog --num-images 8",
                 OUT="runs/dog/samples")
    assert "\npython -m jaxconcept.generate --run runs/dog --num-images 8 --out runs/dog/samples\n" in other
    assert "gcloud compute tpus tpu-vm ssh t --zone=z --worker=3 '--command=nvidia-smi; ls'" in plan(
        "ssh", "--", "nvidia-smi;", "ls", WORKER=3)


def test_tpu_all_on_a_simulated_worker(tmp_path):
    """create, install, run, fetch against the fake one-worker TPU VM: the remote scripts really run."""
    bin_dir = _fake_gcloud(tmp_path)
    log = tmp_path / "gcloud.log"
    home = tmp_path / "worker_home"
    (home / "jaxconcept-venv" / "bin").mkdir(parents=True)
    python = home / "jaxconcept-venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON.format())
    python.chmod(0o755)
    (home / "jaxconcept-venv" / "bin" / "activate").write_text(f'export PATH="{python.parent}:$PATH"\n')
    stub_bin = tmp_path / "worker_bin"  # the metadata server's worker number
    stub_bin.mkdir()
    (stub_bin / "curl").write_text("#!/bin/sh\necho 0\n")
    (stub_bin / "curl").chmod(0o755)
    src = _fake_src(tmp_path)
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"jpeg")
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=log, FAKE_TPU_HOME=home,
               FAKE_TPU_NAME="tpu1", FAKE_TPU_PATH=f"{stub_bin}{os.pathsep}{os.environ['PATH']}",
               TPU_NAME="tpu1", ZONE="europe-west4-b", ACCELERATOR_TYPE="v5litepod-8", SRC_DIR=src, DATA=image,
               RUN_ARGS=RUN_ARGS, OUT="runs/dog", LOCAL_DIR=tmp_path / "back", TMPDIR=tmp_path)
    result = _sh(TPU_SH, "all", env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    # install: the source (without runs/) and the image on the worker; JAX for TPU, then the package
    assert (home / "jaxconcept" / "configs" / "em_sd.py").is_file()
    assert (home / "jaxconcept" / "dog.jpg").read_bytes() == b"jpeg"
    assert not (home / "jaxconcept" / "runs" / "old.txt").exists()
    assert not (tmp_path / "jaxconcept-src-tpu1.tar.gz").exists()  # the local tarball is cleaned up
    pip = (home / "pip.log").read_text().splitlines()
    assert pip[1].endswith("jax[tpu]") and pip[2].endswith("-e jaxconcept")
    # run: in the source folder, RUN_ARGS' quoting intact, a log per worker, exit status recorded
    assert (home / "train_argv").read_text().splitlines() == TRAIN_ARGV
    assert (home / "train_cwd").read_text().strip() == str(home / "jaxconcept")
    assert "learning done" in (home / "jaxconcept" / "logs" / "train-w0.log").read_text()
    assert (home / "jaxconcept" / "logs" / "train.rc").read_text().strip() == "0"
    assert "learning done" in result.stdout  # worker 0's log streamed while waiting
    # fetch: the run folder from worker 0, without its checkpoints (still on the worker), with the log
    back = tmp_path / "back" / "dog"
    assert json.loads((back / "summary.json").read_text())["tokens"] == ["<dog>", "<room>"]
    assert (back / "overlays").is_dir() and "learning done" in (back / "train-worker0.log").read_text()
    assert not (back / "checkpoints").exists()
    assert (home / "jaxconcept" / "runs" / "dog" / "checkpoints" / "0" / "state").is_file()

    # the same calls as the dry run prints (the dry run's output replayed)
    dry = _sh(TPU_SH, "all", env=dict(env, DRY_RUN="1"))
    plan = tmp_path / "plan.sh"
    plan.write_text(dry.stdout)
    real_calls = _calls(log)
    log.unlink()
    replay_env = {k: v for k, v in env.items() if k != "FAKE_TPU_HOME"}
    assert subprocess.run([BASH, str(plan)], env=replay_env, cwd=ROOT, capture_output=True).returncode == 0
    assert _calls(log) == real_calls

    # a failing run is reported as a failure, with the worker's log
    failed = _sh(TPU_SH, "run", env=dict(env, FAKE_TRAIN_RC="3"), timeout=60)
    assert failed.returncode == 2
    assert "exit status 3" in failed.stdout and "the run failed" in failed.stderr


def test_gpu_box_dry_run(tmp_path):
    env = _env(DRY_RUN=1, VENV=tmp_path / "venv", RUN_ARGS=RUN_ARGS, OUT="runs/dog")
    result = _sh(GPU_SH, "all", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    venv_python = str(tmp_path / "venv" / "bin" / "python")
    assert "python3 -m venv " + str(tmp_path / "venv") in lines
    assert f"{venv_python} -m pip install -q -U 'jax[cuda12]'" in lines
    assert f"{venv_python} -m pip install -q -e {ROOT}" in lines
    assert lines.index(f"{venv_python} -m pip install -q -U 'jax[cuda12]'") < lines.index(
        f"{venv_python} -m pip install -q -e {ROOT}")
    assert (f"{venv_python} -m jaxconcept.train --config configs/em_sd.py --concepts "
            "'dog.jpg:<dog>=dog,<room>=room/background' --out runs/dog") in lines
    plan = tmp_path / "plan.sh"
    plan.write_text(result.stdout)
    assert subprocess.run([BASH, "-n", str(plan)]).returncode == 0
    help_ = _sh(GPU_SH, "--help", env=_env())
    assert help_.returncode == 0 and all(v in help_.stdout for v in ("VENV", "JAX_PIP", "RUN_ARGS", "OUT"))
    assert _sh(GPU_SH, "deploy", env=_env()).returncode == 2


# ------------------------------------------------------------------------------------------ notebook


def _notebook():
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _python_of(cell) -> str:
    """The cell without its shell (!) and magic (%) lines."""
    return "\n".join(line for line in _source(cell).splitlines() if not line.lstrip().startswith(("!", "%")))


def test_notebook_is_valid_nbformat4_with_empty_outputs():
    nb = _notebook()
    assert nb["nbformat"] == 4
    try:
        import nbformat
    except ImportError:
        nbformat = None
    if nbformat is not None:
        nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and any(c["cell_type"] == "markdown" for c in nb["cells"])
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None
        ast.parse(_python_of(cell))  # every code cell is Python once its ! and % lines are set aside
    text = "\n".join(_source(c) for c in nb["cells"])
    for needle in ('pip install -q -U "{JAX_PIP}"', '"jax[tpu]"', "jax.devices()", "train.resolve_specs(cfg, [])",
                   "learner.learn(cfg, specs, \"runs/toy\")", "masks_evolution.png", "overlays", "generate.Settings(",
                   "generate.save_generation(", "grid.png", '"stabilityai/stable-diffusion-2-1-base"',
                   "configs\", \"em_sd.py", "files.upload()", "inputs.parse_concepts_arg(",
                   "<dog>=dog,<room>=room/background", "evaluate.evaluate(", "export.export_run(",
                   "load_textual_inversion"):
        assert needle in text, needle


def test_every_jaxconcept_import_of_the_notebook_resolves():
    """Every `from jaxconcept... import name` of every code cell (the toy cells, and those that need an upload or a
    real model, which no test runs) names something that imports: a moved module cannot break the notebook unseen."""
    import importlib

    wanted = []
    for cell in _notebook()["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse(_python_of(cell))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jaxconcept":
                wanted += [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                wanted += [(a.name, None) for a in node.names if a.name.split(".")[0] == "jaxconcept"]
    assert {name for _, name in wanted} >= {"config", "learner", "train", "generate", "runs", "inputs", "evaluate",
                                             "metrics", "export"}
    for module, name in wanted:  # as `from module import name` does: an attribute, else a submodule
        got = importlib.import_module(module)
        if name is not None and getattr(got, name, None) is None:
            importlib.import_module(f"{module}.{name}")


NOTEBOOK_PREAMBLE = '''
import dataclasses, os, sys, types

# a quick version of the notebook's run: the tiny model, a handful of steps
from jaxconcept import config, generate

_default = config.get_config
def _quick():
    c = _default()
    c.model = "tiny"
    # no joint stage: the cells read a run's folder the same way with or without a tuned UNet (test_learner and
    # test_export cover the tuned one), and its step would be this test's longest compile
    c.tokens.steps, c.tokens.estep_every, c.joint.steps, c.masks.num_timesteps = 2, 1, 0, 2
    return c
config.get_config = _quick
_Settings = generate.Settings
generate.Settings = lambda *a, **k: dataclasses.replace(_Settings(*a, **k), steps=2, num_images=1)

# IPython.display: record what the notebook shows
shown = []
class Image:
    def __init__(self, path, **kw):
        assert os.path.isfile(path), path
        self.path = path
display_mod = types.ModuleType("IPython.display")
display_mod.Image = Image
display_mod.display = lambda obj: shown.append(obj.path)
sys.modules["IPython"] = types.ModuleType("IPython")
sys.modules["IPython.display"] = display_mod
'''


def test_notebook_toy_cells_run(tmp_path):
    """The cells tagged "toy" (devices, learn, masks, samples, evaluate, export), executed in order in one
    namespace, on the tiny model with a handful of steps."""
    cells = [c for c in _notebook()["cells"] if "toy" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) >= 5
    sources = [_source(c) for c in cells]
    assert not any(line.lstrip().startswith(("!", "%")) for s in sources for line in s.splitlines())
    program = NOTEBOOK_PREAMBLE + "\nns = {}\n" + "".join(
        f"exec(compile({s!r}, 'cell_{i}', 'exec'), ns)\n" for i, s in enumerate(sources)) + textwrap.dedent('''
        import json
        print("SHOWN", json.dumps(shown))
        print("PICTURES", list(ns["pictures"].shape))
    ''')
    env = _env(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # one CPU device, as in a plain notebook
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = json.loads(result.stdout.split("SHOWN ", 1)[1].splitlines()[0])
    assert shown[0] == "runs/toy/masks_evolution.png"
    assert any(p.startswith("runs/toy/overlays/") for p in shown) and "runs/toy/samples/grid.png" in shown
    assert json.loads(result.stdout.split("PICTURES ", 1)[1].splitlines()[0])[:2] == [3, 1]
    run = tmp_path / "runs" / "toy"
    assert (run / "concepts.safetensors").is_file() and (run / "samples" / "generation.json").is_file()
    assert (tmp_path / "runs" / "eval" / "results.json").is_file()
    assert (tmp_path / "runs" / "toy_pytorch" / "tokens.json").is_file()
    assert "<red_triangle>" in result.stdout  # the printed summary
