"""Losses against hand-computed small cases."""

import jax.numpy as jnp
import numpy as np

from jaxconcept.em import losses


def test_masked_diffusion_loss_is_mean_over_all_elements():
    eps = jnp.zeros((1, 2, 2, 2))
    noise = jnp.ones((1, 2, 2, 2)) * 2.0
    mask = jnp.array([[[[1.0, 0.0], [0.0, 0.0]]]])  # one of four pixels
    # (0 - 2)^2 = 4 at 1 pixel x 2 channels, out of 8 elements -> 1.0 (not normalised by mask area)
    assert float(losses.masked_diffusion_loss(eps, noise, mask)) == 1.0


def test_sample_weights_scale_each_samples_masked_and_plain_error():
    eps, noise = jnp.zeros((2, 2, 2, 2)), jnp.ones((2, 2, 2, 2)) * jnp.array([2.0, 1.0])[:, None, None, None]
    mask = jnp.ones((2, 1, 2, 2)).at[:, :, 1].set(0.0)  # half of each sample's cells
    w = jnp.array([0.25, 1.0])
    # per sample: (4 * 0.5, 1 * 0.5) weighted (0.25, 1) -> mean(0.5, 0.5); per area: (4, 1) -> mean(1, 1)
    assert float(losses.masked_diffusion_loss(eps, noise, mask, weight_B=w)) == 0.5
    assert float(losses.masked_diffusion_loss(eps, noise, mask, per_area=True, weight_B=w)) == 1.0
    assert float(losses.diffusion_loss(eps, noise, w)) == (4 * 0.25 + 1) / 2
    # unit weights: the unweighted losses
    for per_area in (False, True):
        assert float(losses.masked_diffusion_loss(eps, noise, mask, per_area, jnp.ones(2))) == \
            float(losses.masked_diffusion_loss(eps, noise, mask, per_area))


def test_union_mask_keeps_only_present_concepts():
    m = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]])  # B=1, C=3, 1x2
    present = jnp.array([[1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(losses.union_mask(m, present), [[[[1.0, 1.0]]]])
    np.testing.assert_array_equal(losses.union_mask(m, jnp.array([[0.0, 1.0, 0.0]])), [[[[0.0, 1.0]]]])


def test_attention_loss_sums_concepts_and_averages_batch():
    maps = jnp.array([[[[1.0, 0.0]], [[0.5, 0.5]]], [[[0.0, 0.0]], [[1.0, 1.0]]]])  # B=2, C=2, 1x2
    target = jnp.array([[[[1.0, 1.0]], [[0.0, 0.0]]], [[[1.0, 1.0]], [[1.0, 1.0]]]])
    present = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    # sample 0: concept 0 mean((0,1)^2)=0.5, concept 1 mean(0.25,0.25)=0.25; sample 1: concept 0 = 1.0
    expected = (0.5 + 0.25 + 1.0) / 2
    np.testing.assert_allclose(float(losses.attention_loss(maps, target, present)), expected)


def test_diffusion_loss():
    np.testing.assert_allclose(float(losses.diffusion_loss(jnp.zeros((2, 3)), jnp.full((2, 3), 3.0))), 9.0)


def test_per_area_averages_over_the_masked_elements_only():
    eps, noise = jnp.zeros((1, 2, 2, 2)), jnp.ones((1, 2, 2, 2)) * 2.0
    mask = jnp.array([[[[1.0, 0.0], [0.0, 0.0]]]])
    # 4 at the one masked pixel, both channels: a small object weighs as much as a large one
    assert float(losses.masked_diffusion_loss(eps, noise, mask, per_area=True)) == 4.0
    assert float(losses.masked_diffusion_loss(eps, noise, jnp.zeros_like(mask), per_area=True)) == 0.0


def test_dilate_grows_a_mask_by_whole_cells_and_fills_a_ring():
    ring = np.zeros((1, 1, 7, 7), np.float32)
    ring[0, 0, 2:5, 2:5] = 1.0
    ring[0, 0, 3, 3] = 0.0  # the hole
    grown = np.asarray(losses.dilate(jnp.asarray(ring), 1))
    expected = np.zeros_like(ring)
    expected[0, 0, 1:6, 1:6] = 1.0  # the hole filled and one cell around
    np.testing.assert_array_equal(grown, expected)
    np.testing.assert_array_equal(np.asarray(losses.dilate(jnp.asarray(ring), 0)), ring)


def test_context_loss_is_the_relative_squared_change_of_the_weighted_positions():
    target = jnp.asarray(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    weight = jnp.asarray([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert float(losses.context_loss(target, target, weight)) == 0.0
    moved = target.at[:, 0].add(100.0)  # only unweighted positions (the concept's own) moved: no loss
    assert float(losses.context_loss(moved, target, weight)) == 0.0
    moved = target.at[1, 1].add(1.0)  # one weighted state moved by 1 in each of 4 features
    expected = 4.0 / float(np.sum(np.asarray(target)[[0, 0, 1], [1, 2, 1]] ** 2))
    np.testing.assert_allclose(float(losses.context_loss(moved, target, weight)), expected, rtol=1e-6)


def test_attention_loss_over_every_vector_averages_a_concepts_vectors():
    masks = jnp.zeros((1, 2, 4, 4)).at[0, 0, :2].set(1.0)
    first = jnp.zeros((1, 2, 4, 4)).at[0, 0, :2].set(1.0)  # concept 0's first vector: its mask exactly
    second = jnp.ones((1, 2, 4, 4))  # its second vector everywhere: 0.5 squared error per cell of concept 0
    maps_BxCxVxhxw = jnp.stack([first, second], axis=2)
    both = jnp.ones((1, 2))
    # one vector per concept (V = 1) is the plain loss
    np.testing.assert_allclose(losses.attention_loss(maps_BxCxVxhxw[:, :, :1], masks, both, jnp.ones((1, 2, 1))),
                               losses.attention_loss(first, masks, both))
    # concept 0: mean over its two vectors (0 and 0.5); concept 1 has one vector (the second absent): error 0
    only_one = jnp.asarray([[[1.0, 1.0], [1.0, 0.0]]])
    np.testing.assert_allclose(losses.attention_loss(maps_BxCxVxhxw, masks, both, only_one), 0.25)


def test_outside_loss_reads_only_the_cells_outside_the_union():
    eps, ref = jnp.zeros((1, 2, 2, 2)), jnp.ones((1, 2, 2, 2)) * 2.0
    union = jnp.array([[[[1.0, 1.0], [1.0, 0.0]]]])  # one of four cells outside
    # (0 - 2)^2 = 4 at that cell's 2 channels, out of 8 elements -> 1.0; inside the union nothing counts
    assert float(losses.outside_loss(eps, ref, union)) == 1.0
    assert float(losses.outside_loss(eps, ref, jnp.ones_like(union))) == 0.0
    assert float(losses.outside_loss(eps, ref, union, jnp.array([0.5]))) == 0.5
