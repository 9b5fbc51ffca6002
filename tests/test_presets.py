"""Presets for real Stable Diffusion models: found by name from any working folder, at the stated resolution,
reading the stated cross-attention layers of SD's architecture."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxconcept import presets
from jaxconcept.model import adapter, capture, conditioning
from jaxconcept.bench.workload import SD15_UNET, SD21_UNET, SDXL_UNET  # the models' unet/config.json, shaping keys
from jaxconcept.errors import JaxconceptError

STATED = {  # name: (hub id, image px, E-step grids, loss grid, architecture)
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, (16, 32), 16, SD15_UNET),
    "sd21_base": ("stabilityai/stable-diffusion-2-1-base", 512, (16, 32), 16, SD21_UNET),
    "sd21": ("stabilityai/stable-diffusion-2-1", 768, (24, 48), 24, dict(SD21_UNET, sample_size=96)),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 1024, (32, 64), 32, SDXL_UNET),
}


def _load(path):
    spec = importlib.util.spec_from_file_location("preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", presets.NAMES)
def test_preset_states_its_model_resolution_and_grids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    model, px, estep, loss, _ = STATED[name]
    module = _load(presets.resolve_config_arg(["train", "--config", name])[2])
    c = module.get_config()
    assert (c.model, c.resolution, tuple(c.masks.resolutions), c.tokens.attn_resolution) == (model, px, estep, loss)
    assert f"{px} px" in module.__doc__ and f"{estep[0]}x{estep[0]}" in module.__doc__
    assert ("v-prediction" in module.__doc__) == (name == "sd21")
    assert c.joint.lora_rank == 4 and c.joint.lr == 1e-4  # SD presets tune LoRA adapters in the joint stage
    assert c.memory_efficient_attention and c.masks.timestep_chunk == 10  # and hold no attention matrix whole


def _maps_at(name: str, selector):
    """The cross-attention maps (shapes) a selector captures on the preset's own UNet architecture."""
    _, px, _, _, arch = STATED[name]
    unet = adapter.unet_from_config(arch)
    latent = px // 8
    x = jax.ShapeDtypeStruct((1, 4, latent, latent), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 77, arch["cross_attention_dim"]), jnp.float32)
    if arch.get("addition_embed_type") == "text_time":  # SDXL: pooled text (1280) and six time ids
        pooled = (arch["projection_class_embeddings_input_dim"] - 6 * arch["addition_time_embed_dim"])
        ctx = conditioning.SDXLCondition(ctx, jax.ShapeDtypeStruct((1, pooled), jnp.float32),
                                         jax.ShapeDtypeStruct((1, 6), jnp.float32))
    _, maps = jax.eval_shape(lambda p, a, b, c: capture.unet_with_attention(unet, p, a, b, c, selector),
                             adapter.param_shapes(unet), x, t, ctx)
    return maps


def _blocks_by_grid(maps, grids) -> dict:
    return {grid: sorted({path.split("/")[0] for path in maps if maps[path].shape[2] == grid * grid})
            for grid in grids}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_preset_grids_are_the_stated_layers_of_sds_unet(name):
    """Which layers the grids select, on SD's own UNet architecture (shapes only: nothing is computed)."""
    _, px, estep, loss, _ = STATED[name]
    maps = _maps_at(name, capture.LayerSelector(resolutions=estep))
    latent = px // 8
    stated = {latent // f: sorted(b) for f, b in presets.SD_LAYERS_AT.items()}
    assert _blocks_by_grid(maps, estep) == stated and len(maps) == 10  # 2 + 3 layers at each of the two grids
    assert loss == latent // 4 and set(stated[loss]) == {"down_blocks_2", "up_blocks_1"}


def test_sdxl_preset_grids_are_the_stated_layers_of_sdxls_unet():
    """SDXL's UNet: no cross-attention at the finest level (128x128); the E-step's grids take all 70 layers (2 x 2
    + 3 x 2 at 64x64; 2 x 10 + 10 in the middle block + 3 x 10 at 32x32), the loss's the 60 of the 10-block level."""
    _, px, estep, loss, _ = STATED["sdxl"]
    latent = px // 8
    every = _maps_at("sdxl", capture.ALL_LAYERS)
    assert {m.shape[2] for m in every.values()} == {32 * 32, 64 * 64} and len(every) == 70
    # the preset's selection applied to those (capture applies `keeps` itself: tests/test_capture.py); tracing
    # SDXL's UNet a second time would cost ~10 s
    selector = capture.LayerSelector(resolutions=estep)
    maps = {p: m for p, m in every.items() if selector.keeps(p, capture.grid_of(m.shape[2], (latent, latent)))}
    stated = {latent // f: sorted(b) for f, b in presets.SDXL_LAYERS_AT.items()}
    assert _blocks_by_grid(maps, estep) == stated and len(maps) == 70
    assert loss == latent // 4 and sum(m.shape[2] == loss * loss for m in maps.values()) == 60
    assert sum(p.startswith("down_blocks_2/attentions_0/") for p in maps) == 10  # 10 transformer blocks


def test_config_argument_forms(tmp_path):
    own = tmp_path / "mine.py"
    own.write_text("")
    sd15 = os.path.join(os.path.dirname(presets.__file__), "sd15.py")
    assert presets.resolve_config_arg(["t", "--config=sd15", "--out", "x"]) == ["t", f"--config={sd15}", "--out", "x"]
    assert presets.resolve_config_arg(["t", "--config", "sd15.py"]) == ["t", "--config", sd15]
    assert presets.resolve_config_arg(["t", "--config", str(own)]) == ["t", "--config", str(own)]
    with pytest.raises(JaxconceptError, match="'sd3' is neither a config file nor a preset; presets: sd15, sd21_base"):
        presets.resolve_config_arg(["t", "--config", "sd3"])


def test_train_finds_a_preset_outside_the_repository(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(presets.__file__))))  # this checkout
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxconcept.train", *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    proc = run("--config", "sd21", "--out", "o", "--concepts", "dog.jpg:<dog>=dog")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: image 'dog.jpg' does not exist"), proc.stderr
    proc = run("--config", "sd3", "--out", "o")
    assert proc.returncode == 2 and "error: --config 'sd3' is neither a config file nor a preset" in proc.stderr
