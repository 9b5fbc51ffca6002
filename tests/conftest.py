"""Test set-up: 4 simulated CPU devices for the multi-device tests (must be set before jax starts)."""

import os

# The tests' programs are tiny: compiling them costs far more than running them, so LLVM's expensive passes are
# skipped (results are the same: no fast-math, so no reassociation; a tiny learner test ~17-33% faster), and
# fusions take XLA's older emitters, which compile faster (a tiny training command: compile 21 s -> 17 s, wall
# -13%, the same rows and masks bit for bit). Commands the tests start in subprocesses get the same flags.
# Each of the two pytest-xdist workers has one core: XLA's Eigen ops (and PyTorch's OpenMP) on one thread each, not
# two threads per worker contending for both cores (tests/test_learner.py + test_jobs.py + test_capture.py in two
# workers: 241 s -> 224 s wall, 439 -> 405 CPU s). For the same reason the generated code is compiled as one LLVM
# module, not split for parallel codegen threads (the tiny UNet's gradient step, 8 processes each on one core:
# median compile 3.7 s -> 3.3 s; code splitting does not change the code).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false --xla_cpu_multi_thread_eigen=false "
                      "--xla_cpu_parallel_codegen_split_count=1")
for _flag in ("--xla_force_host_platform_device_count=4", *FAST_COMPILE_FLAGS.split()):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Identical programs compiled by several tests (or by a resumed run) come from this session's cache. It is
# set in the environment before jax starts, so pytest-xdist workers (started by this process) and the
# commands tests run in subprocesses read and fill the same cache; the process that made it removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxconcept-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402, F401
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from jaxconcept import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_with_concepts(tiny):
    from jaxconcept.model import tokens

    return tokens.add_concept_tokens(tiny, ["<v1>", "<v2>"], ["dog", None], seed=0)



def set_fields(cfg, changes: dict):
    """cfg with dotted config fields set ("tokens.steps": 4), as --config.FIELD=VALUE would; returns cfg."""
    for k, v in changes.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def same_results(out_a, out_b):
    """Two run folders (pathlib) hold the same results: rows, final masks, and the tuned UNet, LoRA adapters and
    text encoders where the runs have them."""
    import numpy as np
    from PIL import Image

    from jaxconcept.runio import outputs

    a = outputs.load_concepts(str(out_a / "concepts.safetensors"))
    b = outputs.load_concepts(str(out_b / "concepts.safetensors"))
    for token in a:
        np.testing.assert_array_equal(a[token], b[token])
    for name in os.listdir(out_a / "masks" / "final"):
        np.testing.assert_array_equal(np.asarray(Image.open(out_a / "masks" / "final" / name)),
                                      np.asarray(Image.open(out_b / "masks" / "final" / name)))
    for name in ("unet/diffusion_flax_model.msgpack", "text_encoder/flax_params.msgpack",
                 "text_encoder_2/flax_params.msgpack"):
        assert (out_a / name).exists() == (out_b / name).exists(), name
        if (out_a / name).exists():
            assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    if (out_a / outputs.LORA_FILE).exists():  # safetensors orders the metadata at random: compare the contents
        from safetensors import safe_open

        files = [safe_open(str(o / outputs.LORA_FILE), "np") for o in (out_a, out_b)]
        assert files[0].metadata() == files[1].metadata() and set(files[0].keys()) == set(files[1].keys())
        for key in files[0].keys():
            np.testing.assert_array_equal(files[0].get_tensor(key), files[1].get_tensor(key))


def interrupt_at(learn, cfg, specs, out, when):
    """`learn(cfg, specs, out, ...)` stopped by a Ctrl-C at the first checkpoint whose meta satisfies `when`; nothing
    of the results written, the folder's lock released."""
    def stop(meta):
        if when(meta):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn(cfg, specs, str(out), on_checkpoint=stop, progress=False)
    assert not (out / "concepts.safetensors").exists() and not (out / ".lock").exists()


# The modules that take longest start first, so that the two workers end together (greedy longest-first
# scheduling): pytest-xdist (--dist loadscope) hands a free worker the next module in queue order. Its default
# queue orders the modules by their *number of tests* (a module of many quick parametrised tests went first and
# test_multihost.py, two minutes of both cores, started at 741 s of 979); `pytest_configure` below turns that off,
# so the queue is the collection order this sort makes. Seconds of each module in a suite run on the 2-core CPU
# (stop 38, profiled), longest first; modules not named keep their order after these.
LONGEST_FIRST = ("test_learner.py", "test_jobs.py", "test_sdxl_joint.py", "test_multihost.py", "test_concepts_back.py",
                 "test_bench_speed.py", "test_sharding.py", "test_em_toy.py", "test_sdxl.py", "test_toy_train.py",
                 "test_lora.py", "test_launch.py", "test_capture.py", "test_presets.py", "test_bench_memory.py",
                 "test_bench_fidelity.py", "test_model_configs.py", "test_toy_sd.py", "test_generate.py",
                 "test_export.py", "test_evaluate.py", "test_toy_evaluate.py", "test_metrics.py", "test_images.py",
                 "test_parity_torch.py", "test_bad_inputs_train.py", "test_crf_exact.py", "test_package.py",
                 "test_settings.py", "test_show_attention.py", "test_bad_inputs_sampling.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a module
