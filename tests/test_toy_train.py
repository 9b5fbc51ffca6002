"""Toy pre-training: one step of each phase on the tiny architecture; resume equals an uninterrupted run."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import load_model
from jaxconcept.toy import recipe_config, scene, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name: str):
    return recipe_config(os.path.join(ROOT, "configs", f"{name}.py"))


def _config():
    cfg = _load_config("toy_pretrain")
    cfg.arch, cfg.num_scenes, cfg.batch_size, cfg.vae.batch_size = "tiny", 8, 4, 4
    cfg.vae.steps, cfg.denoise.steps, cfg.denoise.aux_weight = 1, 1, 0.1
    cfg.checkpoint_every = cfg.log_every = 1
    return cfg


def test_each_phase_writes_a_loadable_model_that_ships_the_weight_average(tmp_path):
    """Two VAE steps and two averaged denoiser steps, warm started from a saved model whose whole VAE trains
    (v4's recipe): the encoder moved, so the latent scale is measured again. The first denoiser step, at
    warm-up lr 0, leaves the weights as they were; with decays 0.1 then 2/11 the shipped weights are
    2/11 x initial + 9/11 x trained, leaf by leaf."""
    from jaxconcept.model import loading as model

    start = train.sd.random_toy("tiny")
    start = start.replace(vae=train.adapter.vae_from_config(dict(start.vae.config, scaling_factor=0.7)))
    model.save_flax(start, str(tmp_path / "start"))
    cfg = _config()
    cfg.init_from, cfg.vae.steps, cfg.vae.warmup = str(tmp_path / "start"), 2, 1  # step 0 at warm-up lr 0
    cfg.denoise.steps, cfg.denoise.ema_decay, cfg.denoise.min_snr_gamma = 2, 0.999, 5.0
    shipped = train.train(cfg, str(tmp_path / "run"))
    loaded = load_model(str(tmp_path / "run" / "model"))  # the same loader as a real model
    kernel = lambda b: b.params["unet"]["conv_in"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(kernel(loaded), kernel(shipped))
    assert "striped" in loaded.tokenizer.get_vocab() or "striped</w>" in loaded.tokenizer.get_vocab()
    enc0, enc1 = start.params["vae"]["encoder"], loaded.params["vae"]["encoder"]
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(enc0), jax.tree.leaves(enc1)))
    assert loaded.latent_scale == shipped.latent_scale and loaded.latent_scale > 0 and loaded.latent_scale != 0.7
    raw = load_model(str(tmp_path / "run" / "model_raw"))
    moved = 0
    for part in ("unet", "text_encoder"):
        for k_init, k_raw, k_shipped in zip(*(jax.tree.leaves(b.params[part]) for b in (start, raw, shipped))):
            moved += not np.allclose(k_raw, k_init)
            np.testing.assert_allclose(k_shipped, 2 / 11 * np.asarray(k_init) + 9 / 11 * np.asarray(k_raw), atol=1e-6)
    assert moved > 10  # training moved the weights
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [(m["phase"], m["step"]) for m in lines if "loss" in m]
    assert logged == [("vae", 1), ("vae", 2), ("denoise", 1), ("denoise", 2)]
    assert [m["step"] for m in lines if "val_psnr" in m] == [2]
    steps = [m for m in lines if "loss" in m]
    assert all(np.isfinite(m["loss"]) for m in steps) and steps[2]["aux"] > 0
    assert all(np.isfinite(m["val_psnr"]) for m in lines if "val_psnr" in m)
    from_scratch = train.start_model(_config())  # v1's start: the seeded random weights
    np.testing.assert_array_equal(from_scratch.params["unet"]["conv_in"]["kernel"],
                                  train.sd.random_toy("tiny", seed=0).params["unet"]["conv_in"]["kernel"])


def test_the_recipe_configs_of_each_shipped_version_load():
    v1, v2, v3, v4 = (_load_config(n) for n in ("toy_pretrain", "toy_v2", "toy_v3", "toy_v4"))
    starts = (v1.init_from, v2.init_from, v3.init_from, v4.init_from)
    assert starts == ("", "runs/toy_v1/model", "runs/toy_v2/model", "runs/toy_v3/model")  # each from the one before
    assert len({v1.seed, v2.seed, v3.seed, v4.seed}) == 4  # each version trains on scenes the earlier ones never saw
    assert v3.vae.steps == 0 and v3.denoise.steps == 4000 and v3.denoise.ema_decay and v3.denoise.min_snr_gamma == 5
    assert v4.vae.steps > 0 and not v4.vae.decoder_only and v4.vae.kl_weight == 1e-10
    v5, v6 = _load_config("toy_v5"), _load_config("toy_v6")  # the decoder alone, on from v4 then from v5
    assert (v5.init_from, v6.init_from) == ("runs/toy_v4/model", "runs/toy_v5/model")
    assert len({v1.seed, v2.seed, v3.seed, v4.seed, v5.seed, v6.seed}) == 6
    for c in (v5, v6):
        assert c.vae.decoder_only and c.vae.steps > 0 and c.denoise.steps == 0  # the denoiser stays v4's
    for c in (v1, v2, v3, v4, v5, v6):
        assert set(c.denoise) == set(v1.denoise) and set(c.vae) == set(v1.vae)  # no field misspelled


def test_resumed_phase_equals_uninterrupted(tmp_path):
    """Killed after 2 of 4 steps and started again: the same params as 4 steps in one go."""
    data = {"x": jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)), jnp.float32)}
    loss = lambda p, batch, key: (jnp.mean((batch["x"] @ p["w"] - 1.0) ** 2 + 0.1 * jax.random.normal(key)), {})
    opt = train.make_optimizer(1e-2, 4, 1)
    step = train.make_step(loss, opt, data, 4)
    fresh = lambda: ({"w": jnp.zeros((3,))}, opt.init({"w": jnp.zeros((3,))}))
    whole = train.run_phase("p", str(tmp_path / "a"), step, fresh(), train.Schedule(4, 0, 1, 1), io.StringIO())
    train.run_phase("p", str(tmp_path / "b"), step, fresh(), train.Schedule(2, 0, 1, 1), io.StringIO())
    resumed = train.run_phase("p", str(tmp_path / "b"), step, fresh(), train.Schedule(4, 0, 1, 1), io.StringIO())
    np.testing.assert_array_equal(resumed[0]["w"], whole[0]["w"])
    assert not np.allclose(whole[0]["w"], 0)


def test_object_word_targets_follow_caption_order():
    s = scene.make_scene(4, size=32)  # "a yellow dotted cross and a black striped circle and a purple striped square ..."
    from jaxconcept.model import loading as model

    tok = model.word_tokenizer(scene.vocabulary())
    ids = tok(s.caption, padding="max_length", max_length=32).input_ids
    pos, owners, masks = train.object_word_targets(s, (16, 16))
    words = s.caption.split()
    for k, obj in enumerate(s.objects):
        named = [words[p - 1] for p, o in zip(pos, owners) if p >= 0 and o == k]  # position 0: start token
        assert named == list(scene.object_words(obj.color, obj.shape, obj.pattern))
        assert all(ids[p] == tok.convert_tokens_to_ids(w + "</w>") for p, w in zip(pos[(owners == k) & (pos >= 0)], named))
        assert masks[k].sum() > 0 and abs(masks[k].mean() - s.masks[obj.name].mean()) < 1e-6
    assert (pos >= 0).sum() == sum(len(obj.words) for obj in s.objects)


def test_ema_update_averages_with_a_warmed_up_decay():
    ema, params = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    first = train.ema_update(ema, params, jnp.asarray(0), 0.999)  # decay (1 + 0) / (10 + 0) = 0.1
    np.testing.assert_allclose(first["w"], 0.9)
    late = train.ema_update(ema, params, jnp.asarray(10 ** 6), 0.999)  # decay capped at 0.999
    np.testing.assert_allclose(late["w"], 0.001, rtol=1e-4)


def test_warm_start_decoder_only_keeps_encoder_and_latent_scale(tmp_path):
    """v2's recipe: from a saved model, the VAE decoder alone trains; the encoder and the latent scale (which
    the loaded denoiser was trained with) stay exactly as they were."""
    from jaxconcept.model import loading as model

    start = train.sd.random_toy("tiny")
    start = start.replace(vae=train.adapter.vae_from_config(dict(start.vae.config, scaling_factor=0.7)))
    model.save_flax(start, str(tmp_path / "v1"))
    cfg = _config()
    cfg.init_from, cfg.vae.decoder_only, cfg.vae.steps = str(tmp_path / "v1"), True, 2  # step 0: warm-up lr 0
    cfg.denoise.steps = 0  # v5's recipe: the loaded denoiser ships untouched
    out = train.train(cfg, str(tmp_path / "v2"))
    enc0, enc1 = start.params["vae"]["encoder"], out.params["vae"]["encoder"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(enc0), jax.tree.leaves(enc1)))
    dec0, dec1 = start.params["vae"]["decoder"], out.params["vae"]["decoder"]
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(dec0), jax.tree.leaves(dec1)))
    assert out.latent_scale == 0.7
    for part in ("unet", "text_encoder"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start.params[part]),
                                                        jax.tree.leaves(out.params[part]))), part
