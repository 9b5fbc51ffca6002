"""Sharded capture on 4 simulated CPU devices equals the 1-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import ShardingError, capture, sharding, tokens


def test_four_devices_equal_one(tiny_with_concepts):
    assert jax.device_count() >= 4, "conftest sets --xla_force_host_platform_device_count=4"
    bundle, _ = tiny_with_concepts
    ids = tokens.tokenize(bundle.tokenizer, ["a photo of <v1>", "<v2>", "a dog", "a photo of <v1> and <v2>"], 77)
    context = tokens.text_hidden_states(bundle.text_encoder, bundle.params["text_encoder"], jnp.asarray(ids))
    latents = jax.random.normal(jax.random.key(1), (4, 4, 16, 16))
    t = jnp.array([1, 250, 500, 999])
    sel = capture.LayerSelector(resolutions=(16,))
    one = sharding.jit_attention_capture(bundle.unet, sharding.make_mesh(jax.devices()[:1]), sel)
    four_mesh = sharding.make_mesh(jax.devices()[:4])
    four = sharding.jit_attention_capture(bundle.unet, four_mesh, sel)
    eps1, maps1 = one(bundle.params["unet"], latents, t, context)
    eps4, maps4 = four(bundle.params["unet"], latents, t, context)
    assert eps4.sharding.is_equivalent_to(sharding.batch_sharded(four_mesh), eps4.ndim)
    assert len(eps4.sharding.device_set) == 4
    # one example per device changes XLA's blocking: equal up to float reassociation
    np.testing.assert_allclose(eps4, eps1, rtol=1e-4, atol=1e-5)
    e4, e1 = np.asarray(eps4), np.asarray(eps1)
    assert np.linalg.norm(e4 - e1) / np.linalg.norm(e1) < 1e-5
    assert set(maps4) == set(maps1) and len(maps1) == 3  # the three 16x16 layers
    for k in maps1:
        np.testing.assert_allclose(maps4[k], maps1[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ShardingError, match="multiple of 4"):
        four(bundle.params["unet"], latents[:3], t[:3], context[:3])
