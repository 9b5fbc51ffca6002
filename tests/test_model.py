"""Model loading: named tiny model, Flax-weights folders, hub ids, dtypes, and bad sources."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import ModelSourceError, load_model
from jaxconcept.model import loading as model


def test_tiny_is_seeded_and_complete(tiny):
    again = load_model("tiny")
    leaves_a, leaves_b = jax.tree.leaves(tiny.params), jax.tree.leaves(again.params)
    assert all(np.array_equal(a, b) for a, b in zip(leaves_a, leaves_b))
    other = load_model("tiny", seed=1)
    assert not np.array_equal(other.params["unet"]["conv_in"]["kernel"], tiny.params["unet"]["conv_in"]["kernel"])
    assert tiny.resolution == 32 and tiny.vae_factor == 2 and tiny.max_length == 77
    assert tiny.latent_scale == pytest.approx(0.18215)
    # the tokenizer knows its words as single tokens
    for word in ("photo", "background", "striped"):
        assert len(tiny.tokenizer(word, add_special_tokens=False).input_ids) == 1


def test_flax_folder_round_trip(tiny, tmp_path):
    model.save_flax(tiny, str(tmp_path))
    assert os.path.isfile(tmp_path / "unet" / "diffusion_flax_model.msgpack")
    assert os.path.isfile(tmp_path / "text_encoder" / "flax_model.msgpack")
    loaded = load_model(str(tmp_path))
    flat_a = jax.tree_util.tree_flatten_with_path(tiny.params)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(loaded.params)[0])
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(leaf))
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert loaded.unet == tiny.unet and hash(loaded.vae) == hash(tiny.vae)  # hashable: static jit arguments


def test_bfloat16(tiny):
    bf = load_model("tiny", dtype="bfloat16")
    dtypes = {x.dtype for x in jax.tree.leaves(bf.params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert bf.unet.dtype == jnp.bfloat16


def test_offline_hub_id_not_cached_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelSourceError) as err:
        load_model("someone/no-such-model")
    msg = str(err.value)
    assert "someone/no-such-model" in msg and "huggingface-cli download" in msg and "local" in msg


def test_cached_hub_snapshot_loads_offline(tiny, monkeypatch, tmp_path):
    """A hub id whose files sit in the local cache loads with no network, through the same folder code."""
    import huggingface_hub.constants as hc

    repo = tmp_path / "models--someone--tiny-sd"
    snap = repo / "snapshots" / ("0" * 40)
    model.save_flax(tiny, str(snap))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("someone/tiny-sd")
    assert loaded.source == "someone/tiny-sd"
    np.testing.assert_array_equal(loaded.params["unet"]["conv_in"]["kernel"], tiny.params["unet"]["conv_in"]["kernel"])


def test_unknown_source_form():
    with pytest.raises(ModelSourceError, match="neither a named model"):
        load_model("not a folder nor id")
    with pytest.raises(ModelSourceError, match="model folder '/no/such/sd' does not exist"):
        load_model("/no/such/sd")


def test_bad_dtype():
    with pytest.raises(ModelSourceError, match="unknown dtype"):
        load_model("tiny", dtype="float8")


def test_folder_missing_components(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelSourceError, match="lacks vae/, text_encoder/, tokenizer/"):
        load_model(str(tmp_path))


def test_corrupt_and_mismatched_weights(tiny, tmp_path):
    """Truncated safetensors and weights that do not fit config.json: specific messages."""
    from safetensors.numpy import save_file

    model.save_flax(tiny, str(tmp_path))
    unet_dir = tmp_path / "unet"
    os.remove(unet_dir / "diffusion_flax_model.msgpack")
    (unet_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00garbage")
    with pytest.raises(ModelSourceError, match="cannot read weights file"):
        load_model(str(tmp_path))
    save_file({"conv_in.weight": np.zeros((7, 4, 3, 3), np.float32)}, str(unet_dir / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelSourceError, match="conv_in.weight has shape"):
        load_model(str(tmp_path))
    save_file({"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}, str(unet_dir / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelSourceError, match="missing from the PyTorch weights"):
        load_model(str(tmp_path))
    os.remove(unet_dir / "diffusion_pytorch_model.safetensors")
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="only PyTorch .bin files"):
        load_model(str(tmp_path))


def test_scheduler_config_from_other_class_is_accepted(tiny, tmp_path):
    """SD folders ship a PNDM scheduler config; its betas must carry over to the training schedule."""
    model.save_flax(tiny, str(tmp_path))
    cfg_path = tmp_path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(_class_name="PNDMScheduler", skip_prk_steps=True, beta_end=0.02, steps_offset=1)
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_model(str(tmp_path))
    assert loaded.scheduler.config.beta_end == 0.02


def test_shipped_toy_model_loads_like_a_real_one_and_its_tokenizer_round_trips():
    from jaxconcept.toy import scene, sd

    assert os.path.isfile(os.path.join(sd.WEIGHTS, "unet", "diffusion_flax_model.msgpack"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(sd.WEIGHTS) for f in fs)
    assert size <= 25 * 2**20, f"shipped toy model is {size / 2**20:.1f} MB"
    toy = load_model("toy")
    folder = model.load_folder(sd.WEIGHTS)  # the loader a real model goes through
    assert toy.resolution == 64 and toy.vae_factor == 4 and toy.max_length == sd.MAX_LENGTH
    np.testing.assert_array_equal(toy.params["unet"]["conv_in"]["kernel"], folder.params["unet"]["conv_in"]["kernel"])
    tok = toy.tokenizer
    for word in scene.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word  # every vocabulary word is one token
        assert tok.decode(ids).strip() == word
    caption = scene.make_scene(3).caption
    assert tok.decode(tok(caption).input_ids, skip_special_tokens=True).strip() == caption
