"""Real model configurations: PyTorch settings diffusers' Flax classes lack are refused when they change the
computation and load quietly otherwise; v-prediction models train on the v target and sample with it
(each sampler against PyTorch diffusers with v-prediction: tests/test_generate.py)."""

import dataclasses
import inspect
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxconcept import config, generate, load_model
from jaxconcept.em import steps
from jaxconcept.em.prepare import prepare
from jaxconcept.model import adapter, capture, diffusion, loading as model  # noqa: E402
from jaxconcept.errors import ModelSourceError  # noqa: E402
from jaxconcept.runio.inputs import ConceptSpec, ImageSpec  # noqa: E402
from torch_reference import build_folder  # noqa: E402


@pytest.fixture(scope="module")
def pt_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pt_sd"))
    build_folder(folder)
    return folder


def _edited(pt_folder, tmp_path, component, **changes) -> str:
    """A copy of the PyTorch folder with `changes` written into one component's config.json."""
    folder = str(tmp_path / "edited")
    shutil.copytree(pt_folder, folder)
    name = "scheduler/scheduler_config.json" if component == "scheduler" else f"{component}/config.json"
    path = os.path.join(folder, name)
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return folder


# ------------------------------------------------------------------------------------------ the lists


@pytest.mark.parametrize("kind, pt_cls, flax_cls", [
    ("UNet", "UNet2DConditionModel", "FlaxUNet2DConditionModel"), ("VAE", "AutoencoderKL", "FlaxAutoencoderKL")])
def test_every_pytorch_only_setting_is_listed_with_pytorchs_default(kind, pt_cls, flax_cls):
    """The lists are derived from diffusers' signatures: every PyTorch __init__ argument the Flax class lacks is
    either checked against PyTorch's default or listed as neutral, and nothing else is."""
    import diffusers

    fixed, neutral, _ = adapter.compat._CHECKS[kind]
    pt = {k: p.default for k, p in inspect.signature(getattr(diffusers, pt_cls).__init__).parameters.items()
          if k != "self"}
    flax = {f.name for f in dataclasses.fields(getattr(diffusers, flax_cls))}
    assert set(pt) - flax == set(fixed) | set(neutral)
    assert not set(fixed) & set(neutral)
    for name, (default, _) in fixed.items():
        assert pt[name] == default, name


def test_a_pytorch_unet_with_16_groups_is_refused_by_name(pt_folder, tmp_path, capsys):
    """The issue's case: loaded before, it computed another model (eps relative error 0.56)."""
    from diffusers import UNet2DConditionModel

    folder = str(tmp_path / "g16")
    shutil.copytree(pt_folder, folder)
    shutil.rmtree(os.path.join(folder, "unet"))
    UNet2DConditionModel(**dict(model.TINY_UNET, norm_num_groups=16)).save_pretrained(os.path.join(folder, "unet"))
    with pytest.raises(ModelSourceError) as e:
        load_model(folder)
    msg = str(e.value)
    assert msg.startswith(os.path.join(folder, "unet", "config.json"))
    assert "norm_num_groups=16 (PyTorch's default is 32): the Flax UNet's GroupNorms always use 32 groups" in msg
    assert generate.main(["--model", folder, "--prompt", "a dog", "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "norm_num_groups=16" in err and "Traceback" not in err


@pytest.mark.parametrize("component, changes, fragment", [
    ("unet", {"resnet_time_scale_shift": "scale_shift"},
     "resnet_time_scale_shift='scale_shift' (PyTorch's default is 'default'): the Flax ResNet blocks always add"),
    ("unet", {"class_embed_type": "timestep"}, "class_embed_type='timestep' (PyTorch's default is None)"),
    ("unet", {"time_cond_proj_dim": 256}, "time_cond_proj_dim=256 (PyTorch's default is None): a timestep-condition"),
    ("unet", {"conv_in_kernel": 7}, "conv_in_kernel=7 (PyTorch's default is 3): the Flax UNet's input convolution"),
    ("unet", {"conv_out_kernel": 1}, "conv_out_kernel=1"),
    ("unet", {"resnet_skip_time_act": True}, "resnet_skip_time_act=True"),
    ("unet", {"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ("unet", {"act_fn": "gelu"}, "act_fn='gelu' (PyTorch's default is 'silu')"),
    ("unet", {"norm_eps": 1e-6}, "norm_eps=1e-06"),
    ("unet", {"center_input_sample": True}, "center_input_sample=True"),
    ("unet", {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
     "mid_block_type holds 'UNetMidBlock2DSimpleCrossAttn', but only 'UNetMidBlock2DCrossAttn', None can be used"),
    ("unet", {"down_block_types": ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
     "down_block_types holds 'SimpleCrossAttnDownBlock2D', but only 'CrossAttnDownBlock2D', 'DownBlock2D' can be used: "
     "the Flax UNet builds any other as a DownBlock2D"),
    ("unet", {"addition_embed_type": "text_time"}, "an SDXL UNet (addition_embed_type='text_time') needs both text "
                                                   "encoders, but the folder lacks text_encoder_2/, tokenizer_2/"),
    ("unet", {"addition_embed_type": "text"}, "addition_embed_type holds 'text', but only None, 'text_time' can be "
                                              "used: the Flax UNet has no other added conditioning than SDXL's"),
    ("vae", {"use_quant_conv": False}, "use_quant_conv=False (PyTorch's default is True): the Flax VAE always has"),
    ("vae", {"shift_factor": 0.1159}, "shift_factor=0.1159 (PyTorch's default is None): latent shifting"),
    ("vae", {"mid_block_add_attention": False}, "mid_block_add_attention=False"),
    ("vae", {"act_fn": "relu"}, "act_fn holds 'relu', but only 'silu' can be used: the Flax VAE always uses SiLU"),
    ("text_encoder", {"hidden_act": "relu6"}, "hidden_act='relu6': the Flax CLIP has only"),
    ("text_encoder", {"model_type": "t5"}, "model_type='t5': only CLIP text encoders"),
    ("scheduler", {"prediction_type": "sample"}, "prediction_type='sample' is not supported"),
])
def test_settings_that_change_the_computation_are_refused(pt_folder, tmp_path, component, changes, fragment):
    folder = _edited(pt_folder, tmp_path, component, **changes)
    with pytest.raises(ModelSourceError) as e:
        load_model(folder)
    assert fragment in str(e.value) and str(e.value).startswith(os.path.join(folder, component))


def test_a_flax_folder_with_pytorch_settings_is_checked_too(tiny, tmp_path):
    model.save_flax(tiny, str(tmp_path))
    path = tmp_path / "unet" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), norm_num_groups=8)))
    with pytest.raises(ModelSourceError, match="norm_num_groups=8"):
        load_model(str(tmp_path))


def test_pytorch_folders_load_without_noise(pt_folder, tmp_path, capfd):
    """All of PyTorch's settings at their defaults, neutral ones changed, and a key neither class knows: quiet."""
    folder = _edited(pt_folder, tmp_path, "unet", upcast_attention=True, mid_block_only_cross_attention=True,
                     some_future_setting=1)
    capfd.readouterr()
    bundle = load_model(folder)
    out, err = capfd.readouterr()
    assert "not expected" not in out + err and "will be ignored" not in out + err, out + err
    assert bundle.unet.config.block_out_channels == tuple(model.TINY_UNET["block_out_channels"])


# ------------------------------------------------------------------------------------------ v-prediction


def test_v_target_is_pytorchs_get_velocity():
    from diffusers import DDPMScheduler

    pt = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type="v_prediction")
    _, state = adapter.ddpm_scheduler(dict(model.SD_SCHEDULER, prediction_type="v_prediction"))
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
    t = np.array([3, 977], np.int64)
    ours = diffusion.training_target("v_prediction", state.common.alphas_cumprod, jnp.asarray(x0), jnp.asarray(noise),
                                     jnp.asarray(t))
    ref = pt.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(diffusion.training_target("epsilon", state.common.alphas_cumprod, x0, noise, t), noise)


def _with_prediction(bundle, prediction_type):
    cfg = dict(bundle.scheduler_config, prediction_type=prediction_type)
    sched, state = adapter.ddpm_scheduler(cfg)
    return bundle.replace(scheduler=sched, scheduler_state=state, scheduler_config=cfg)


def test_v_prediction_models_train_on_v(tiny, tmp_path, monkeypatch):
    """All latents at one constant x0: the exact v (resp. eps) predictor has zero loss exactly when the model is
    trained on v (resp. eps); the other predictor does not."""
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    spec = ImageSpec(str(tmp_path / "a.png"), (ConceptSpec("<v1>", "dog"),))
    cfg = config.get_config()
    cfg.model = "tiny"
    x0 = 0.7
    real = capture.unet_with_attention
    oracle = {}

    def exact(unet, params, noisy, t, context, selector, lora=None):
        _, maps = real(unet, params, noisy, t, context, selector, lora)
        a = oracle["ac"][t][:, None, None, None]
        eps = (noisy - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return (eps if oracle["kind"] == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0), maps

    monkeypatch.setattr(capture, "unet_with_attention", exact)
    losses = {}
    for trained in ("epsilon", "v_prediction"):
        setup = prepare(cfg, [spec], _with_prediction(tiny, trained))
        b = setup.bundle
        assert b.prediction_type == trained
        run_data = dict(setup.run_data, latents=jnp.full_like(setup.run_data["latents"], x0))
        masks = jnp.ones((1,) + setup.latent_hw, jnp.float32)
        oracle["ac"] = b.scheduler_state.common.alphas_cumprod
        for kind in ("epsilon", "v_prediction"):
            oracle["kind"] = kind
            _, metrics = steps.concept_loss({"rows": jnp.asarray(setup.concepts.init_rows)}, b.params, run_data, masks,
                                            jax.random.key(0), steps.StepStatics(steps.step_model(b), steps.LossConfig()),
                                            jnp.asarray(setup.concepts.ids))
            losses[trained, kind] = float(metrics["loss_mask"])
    assert losses["v_prediction", "v_prediction"] < 1e-8 and losses["epsilon", "epsilon"] < 1e-8, losses
    assert losses["v_prediction", "epsilon"] > 1e-2 and losses["epsilon", "v_prediction"] > 1e-2, losses


def test_a_v_prediction_folder_samples_with_v(pt_folder, tmp_path):
    """The model's scheduler config reaches the sampler: the same UNet output read as v gives other images."""
    v_bundle = load_model(_edited(pt_folder, tmp_path, "scheduler", prediction_type="v_prediction"))
    assert v_bundle.prediction_type == "v_prediction"
    eps_bundle = load_model(pt_folder)
    settings = generate.Settings(num_images=1, steps=3, guidance=1.0, seed=0)
    a = generate.generate(v_bundle, ["a dog"], settings, progress=False)
    b = generate.generate(eps_bundle, ["a dog"], settings, progress=False)
    assert not np.array_equal(a, b)
    sched, _ = adapter.inference_scheduler("ddim", v_bundle.scheduler_config)
    assert sched.config.prediction_type == "v_prediction"
