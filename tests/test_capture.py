"""Attention capture through intercepted Flax modules: exactness, selection, gradients to concept rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconcept.masks import aggregate
from jaxconcept.errors import LayerGridError
from jaxconcept.model import capture, tokens


@pytest.fixture(scope="module")
def batch(tiny_with_concepts):
    bundle, concepts = tiny_with_concepts
    ids = tokens.tokenize(bundle.tokenizer, ["a photo of <v1> and <v2>"] * 2, bundle.max_length)
    latents = jax.random.normal(jax.random.key(0), (2, 4, 16, 16))
    t = jnp.array([10, 700])
    context = tokens.text_hidden_states(bundle.text_encoder, bundle.params["text_encoder"], jnp.asarray(ids))
    return ids, latents, t, context


def test_capture_changes_nothing(tiny_with_concepts, batch):
    bundle, _ = tiny_with_concepts
    _, latents, t, context = batch
    p = bundle.params["unet"]
    plain = jax.jit(functools.partial(capture.unet_eps, bundle.unet))(p, latents, t, context)
    eps, maps = jax.jit(functools.partial(capture.unet_with_attention, bundle.unet))(p, latents, t, context)
    # the same computation; the extra outputs only change how XLA fuses it (bit for bit with its newer fusion
    # emitters, to float32 rounding with the older ones the tests compile with: conftest.FAST_COMPILE_FLAGS)
    np.testing.assert_allclose(eps, plain, rtol=1e-5, atol=1e-6)
    assert len(maps) == 4  # down_blocks_0 (16x16), the mid block (8x8), up_blocks_1's two (16x16)
    for name, probs in maps.items():
        assert name.endswith("attn2") and probs.shape[0] == 2 and probs.shape[-1] == 77
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_selector_keeps_only_what_it_names(tiny_with_concepts, batch):
    bundle, _ = tiny_with_concepts
    _, latents, _, context = batch
    p = bundle.params["unet"]
    by_res = capture.layer_names(bundle.unet, p, latents, context, capture.LayerSelector(resolutions=(16,)))
    assert set(by_res) == {
        "down_blocks_0/attentions_0/transformer_blocks_0/attn2",
        "up_blocks_1/attentions_0/transformer_blocks_0/attn2",
        "up_blocks_1/attentions_1/transformer_blocks_0/attn2",
    }
    assert all(grid == (16, 16) and heads == 4 for grid, heads in by_res.values())
    by_res = capture.layer_names(bundle.unet, p, latents, context, capture.LayerSelector(resolutions=(8,)))
    assert by_res == {"mid_block/attentions_0/transformer_blocks_0/attn2": ((8, 8), 4)}
    sel = capture.LayerSelector(resolutions=(16, 8), include=("up_blocks", "mid_block"), exclude=("mid_block",))
    assert set(capture.layer_names(bundle.unet, p, latents, context, sel)) == {
        "up_blocks_1/attentions_0/transformer_blocks_0/attn2", "up_blocks_1/attentions_1/transformer_blocks_0/attn2"
    }
    asked = r"grid 4x4, but at this size \(latent 16x16\) .* grids 16x16, 8x8\. Choose"
    with pytest.raises(LayerGridError, match=asked):
        capture.layer_names(bundle.unet, p, latents, context, capture.LayerSelector(resolutions=(8, 4)))
    assert capture.grid_of(16, (4, 16)) == (2, 8) and capture.grid_of(4, (4, 16)) == (1, 4)
    with pytest.raises(ValueError, match="do not tile"):
        capture.grid_of(32, (4, 16))


@pytest.mark.parametrize("variant", [{"split_head_dim": True}, {"use_memory_efficient_attention": True}])
def test_attention_variants_capture_the_same_maps(tiny_with_concepts, batch, variant):
    """split-head layout and the chunked (memory-efficient) UNet: captured layers form the same
    probabilities; the layers not captured keep the variant's own path."""
    bundle, _ = tiny_with_concepts
    _, latents, t, context = batch
    sel = capture.LayerSelector(resolutions=(16,))
    fn = lambda unet: jax.jit(functools.partial(capture.unet_with_attention, unet, selector=sel))
    eps_a, maps_a = fn(bundle.unet)(bundle.params["unet"], latents, t, context)
    eps_b, maps_b = fn(bundle.unet.clone(**variant))(bundle.params["unet"], latents, t, context)
    np.testing.assert_allclose(eps_b, eps_a, rtol=1e-4, atol=1e-5)
    assert set(maps_a) == set(maps_b)
    for k in maps_a:
        np.testing.assert_allclose(maps_b[k], maps_a[k], rtol=1e-5, atol=1e-6)


def test_attention_loss_gradient_reaches_only_concept_rows(tiny_with_concepts, batch):
    bundle, c = tiny_with_concepts
    ids, latents, t, _ = batch
    positions = tokens.token_positions(ids[0], c.ids)
    target = jnp.zeros((2, 2, 16, 16)).at[:, 0, :8].set(1.0).at[:, 1, 8:].set(1.0)
    te, tp, unet, up = bundle.text_encoder, bundle.params["text_encoder"], bundle.unet, bundle.params["unet"]

    def loss(rows):
        context = tokens.text_hidden_states(te, tp, jnp.asarray(ids), c.ids_array, rows)
        _, maps = capture.unet_with_attention(unet, up, latents, t, context)
        return jnp.mean((aggregate.aggregate_maps(maps, (16, 16), positions) - target) ** 2)

    rows = jnp.asarray(c.init_rows)
    opt = optax.adamw(5e-4, weight_decay=1e-2)
    state = opt.init(rows)

    @jax.jit
    def step(rows, state):
        value, grad = jax.value_and_grad(loss)(rows)
        updates, state = opt.update(grad, state, rows)
        return optax.apply_updates(rows, updates), state, value, grad

    new_rows, _, value, grad = step(rows, state)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert (np.abs(np.asarray(grad)).sum(axis=1) > 0).all()  # each concept row gets a gradient
    table = tokens.embedding_table(tp)
    spliced = tokens.splice_rows(table, c.ids_array, new_rows)
    changed = np.flatnonzero(np.abs(np.asarray(spliced) - np.asarray(table)).sum(axis=1) > 0)
    assert sorted(changed.tolist()) == sorted(c.ids)


def test_bfloat16_capture_runs_close_to_float32(tiny, batch):
    from jaxconcept import load_model

    bf = load_model("tiny", dtype="bfloat16")
    _, latents, t, _ = batch
    ids = tokens.tokenize(tiny.tokenizer, ["a photo of a dog", "a red car"], tiny.max_length)
    f32_ctx = tokens.text_hidden_states(tiny.text_encoder, tiny.params["text_encoder"], jnp.asarray(ids))
    bf_ctx = tokens.text_hidden_states(bf.text_encoder, bf.params["text_encoder"], jnp.asarray(ids))
    assert bf_ctx.dtype == jnp.bfloat16
    sel = capture.LayerSelector(resolutions=(16,))
    eps32, maps32 = jax.jit(functools.partial(capture.unet_with_attention, tiny.unet, selector=sel))(
        tiny.params["unet"], latents, t, f32_ctx)
    eps16, maps16 = jax.jit(functools.partial(capture.unet_with_attention, bf.unet, selector=sel))(
        bf.params["unet"], latents.astype(jnp.bfloat16), t, bf_ctx)
    assert eps16.dtype == jnp.bfloat16
    e16, e32 = np.asarray(eps16, np.float32), np.asarray(eps32)
    assert np.isfinite(e16).all()
    assert np.linalg.norm(e16 - e32) / np.linalg.norm(e32) < 0.05
    a16 = aggregate.aggregate_maps(maps16, (16, 16), [4])
    a32 = aggregate.aggregate_maps(maps32, (16, 16), [4])
    assert a16.dtype == jnp.float32 and float(jnp.abs(a16 - a32).max()) < 0.1
