"""The one aggregation helper, on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept.masks import aggregate


def _const(b, heads, q, t, values_per_head):
    """probs B x heads x Q x T with head h filled with values_per_head[h] (token-wise array of T)."""
    arr = np.zeros((b, heads, q, t), np.float32)
    for h, v in enumerate(values_per_head):
        arr[:, h, :, :] = v
    return jnp.asarray(arr)


def test_mean_over_heads_and_layers_then_equal_weight_per_resolution():
    T = 3
    layers = {
        # two layers at 4x4 (Q=16): head means 0.3 and 0.5 for token 0 -> resolution mean 0.4
        "a/attn2": _const(1, 2, 16, T, [np.array([0.2, 0.1, 0.7]), np.array([0.4, 0.1, 0.5])]),
        "b/attn2": _const(1, 1, 16, T, [np.array([0.5, 0.2, 0.3])]),
        # one layer at 2x2 (Q=4): token 0 is 0.8
        "c/attn2": _const(1, 1, 4, T, [np.array([0.8, 0.1, 0.1])]),
    }
    per = aggregate.per_resolution(layers, (4, 4))
    assert set(per) == {(4, 4), (2, 2)}
    np.testing.assert_allclose(per[(4, 4)][0, 0, 0], [0.4, 0.15, 0.45], rtol=1e-6)
    maps = aggregate.aggregate_maps(layers, (4, 4), normalize=None)
    assert maps.shape == (1, T, 4, 4)
    # constant maps survive bilinear upsampling; 4x4 and 2x2 weigh the same despite 2 vs 1 layers
    np.testing.assert_allclose(maps[0, :, 1, 2], [(0.4 + 0.8) / 2, (0.15 + 0.1) / 2, (0.45 + 0.1) / 2], rtol=1e-6)


def test_token_selection_normalisation_and_gradient():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 16, 5)).astype(np.float32)
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    layers = {"x/attn2": probs}
    raw = aggregate.aggregate_maps(layers, (4, 4), normalize=None)
    np.testing.assert_allclose(raw.sum(axis=1), 1.0, rtol=1e-5)  # probabilities over tokens
    picked = aggregate.aggregate_maps(layers, (4, 4), token_positions=[3, 1], normalize=None)
    np.testing.assert_array_equal(picked, raw[:, [3, 1]])
    per_sample = aggregate.aggregate_maps(layers, (4, 4), token_positions=[[3, 1], [0, 2]], normalize=None)
    np.testing.assert_array_equal(per_sample[1], raw[1, [0, 2]])

    by_max = aggregate.aggregate_maps(layers, (4, 4), normalize="max")
    np.testing.assert_allclose(by_max.max(axis=(-2, -1)), 1.0, rtol=1e-5)
    mm = aggregate.aggregate_maps(layers, (4, 4), normalize="minmax")
    np.testing.assert_allclose(mm.min(axis=(-2, -1)), 0.0, atol=1e-6)
    np.testing.assert_allclose(mm.max(axis=(-2, -1)), 1.0, rtol=1e-5)

    up = aggregate.aggregate_maps(layers, (4, 4), out_hw=(8, 8))
    assert up.shape == (2, 5, 8, 8)

    g = jax.grad(lambda lg: aggregate.aggregate_maps({"x": jax.nn.softmax(lg, -1)}, (4, 4), [1]).sum())(jnp.asarray(logits))
    assert np.isfinite(g).all() and np.abs(g).sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="no cross-attention layers"):
        aggregate.aggregate_maps({}, (4, 4))
    with pytest.raises(ValueError, match="normalize"):
        aggregate.aggregate_maps({"x": jnp.ones((1, 1, 16, 2))}, (4, 4), normalize="sum")
