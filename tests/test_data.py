"""Union-sampling prompt table and the on-device batch draw."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept.em import data
from jaxconcept.model import loading as model


def _tokenizer(new=("<a>", "<b>", "<c>", "<d>")):
    tok = model.word_tokenizer(model.TINY_WORDS)
    tok.add_tokens(list(new))
    return tok, [tok.convert_tokens_to_ids(t) for t in new]


def test_prompt_table_lists_ordered_subsets_with_positions():
    tok, ids = _tokenizer()
    toks = ["<a>", "<b>", "<c>", "<d>"]
    owner = [0, 0, 0, 1]  # three concepts in image 0, one in image 1
    table = data.prompt_table(tok, toks, owner, ids, 16)
    assert len(table.texts) == data.num_prompts([3, 1]) == 3 + 6 + 6 + 1
    assert "a photo of <c> and <a>" in table.texts  # the default template and joiner
    np.testing.assert_allclose(table.weight_P.sum(), 1.0)
    for text, ids_T, pos, img in zip(table.texts, table.ids_PxT, table.positions_PxC, table.image_P):
        named = [t for t in toks if t in text.split()]
        for c, t in enumerate(toks):
            assert (pos[c] >= 0) == (t in named)
            if pos[c] >= 0:
                assert ids_T[pos[c]] == ids[c]
        assert all(owner[toks.index(t)] == img for t in named)
    # images equally likely, then k uniform among 1..N
    w = collections.defaultdict(float)
    for text, img, wt in zip(table.texts, table.image_P, table.weight_P):
        w[(int(img), text.count("<"))] += wt
    np.testing.assert_allclose([w[(0, k)] for k in (1, 2, 3)], [1 / 6] * 3)
    np.testing.assert_allclose(w[(1, 1)], 0.5)


def test_draw_batch_follows_weights_and_flips_masks_with_latents():
    tok, ids = _tokenizer()
    table = data.prompt_table(tok, ["<a>", "<b>"], [0, 0], ids[:2], 16)
    arrays = data.table_arrays(table)
    lat = jnp.stack([jnp.arange(2.0)[:, None, None, None] * jnp.ones((2, 1, 2, 3))])  # N=1, flip index visible
    masks = jnp.asarray(np.arange(12, dtype=np.float32).reshape(2, 2, 3))
    draw = jax.jit(lambda k: data.draw_batch(k, arrays, lat, masks, 256))
    b = draw(jax.random.key(0))
    flip = np.asarray(b["flip"])
    assert 0.35 < flip.mean() < 0.65
    np.testing.assert_array_equal(np.asarray(b["latents"])[:, 0, 0, 0], flip)  # latent of the flipped copy
    np.testing.assert_array_equal(np.asarray(b["masks"])[flip == 1], np.broadcast_to(masks[:, :, ::-1], (int(flip.sum()), 2, 2, 3)))
    np.testing.assert_array_equal(np.asarray(b["masks"])[flip == 0], np.broadcast_to(masks, (int((1 - flip).sum()), 2, 2, 3)))
    k_counts = (np.asarray(b["positions"]) >= 0).sum(1)
    assert 0.35 < (k_counts == 2).mean() < 0.65  # k uniform in 1..2


def test_logw_without_a_background_drops_its_prompts_and_renormalises():
    tok, ids = _tokenizer()
    toks = ["<a>", "<b>", "<c>"]  # one image: two objects and <c>, its background
    table = data.prompt_table(tok, toks, [0, 0, 0], ids[:3], 16)
    logw_P = data.logw_without(table, [False, False, True])
    kept_P = np.isfinite(logw_P)
    assert [t for t, k in zip(table.texts, kept_P) if k] == [t for t in table.texts if "<c>" not in t]
    np.testing.assert_allclose(np.exp(logw_P[kept_P]).sum(), 1.0, rtol=1e-6)
    # the kept prompts keep their relative weights
    np.testing.assert_allclose(np.exp(logw_P[kept_P]) / table.weight_P[kept_P],
                               np.exp(logw_P[kept_P][0]) / table.weight_P[kept_P][0], rtol=1e-6)
    # an image whose only concept is its background: nothing else to draw, the weights are left as they were
    only = data.prompt_table(tok, ["<c>"], [0], ids[2:3], 16)
    np.testing.assert_allclose(np.exp(data.logw_without(only, [True])), only.weight_P, rtol=1e-6)


def test_nearest_resize_picks_top_left_of_each_cell():
    m = jnp.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(data.nearest_resize(m, (2, 2)), [[0, 2], [8, 10]])


def test_swap_background_replaces_only_the_unnamed_cells_of_prompts_without_a_background():
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.normal(size=(3, 4, 6, 6)), jnp.float32)
    bank = jnp.asarray(rng.normal(size=(1, 4, 6, 6)), jnp.float32)  # one entry: the pick is known
    masks = np.zeros((3, 3, 6, 6), np.float32)
    masks[:, 0, :2] = 1  # concept 0: rows 0-1; concept 1: rows 2-3; concept 2 (the background): the rest
    masks[:, 1, 2:4] = 1
    masks[:, 2, 4:] = 1
    positions = jnp.asarray([[3, -1, -1],   # names concept 0 only
                             [3, 5, -1],    # both objects
                             [3, -1, 5]])   # an object and the background: kept whole
    background_C = jnp.asarray([False, False, True])
    out = np.asarray(data.swap_background(jax.random.key(0), latents, jnp.asarray(masks), positions, background_C,
                                          bank, prob=1.0))
    lat, other = np.asarray(latents), np.asarray(bank[0])
    np.testing.assert_array_equal(out[0, :, :2], lat[0, :, :2])
    np.testing.assert_array_equal(out[0, :, 2:], other[:, 2:])
    np.testing.assert_array_equal(out[1, :, :4], lat[1, :, :4])
    np.testing.assert_array_equal(out[1, :, 4:], other[:, 4:])
    np.testing.assert_array_equal(out[2], lat[2])
    never = data.swap_background(jax.random.key(0), latents, jnp.asarray(masks), positions, background_C, bank, 0.0)
    np.testing.assert_array_equal(np.asarray(never), lat)
    # with probability 0.5, about half of the instances that may swap do
    many = jnp.broadcast_to(latents[:1], (400, 4, 6, 6))
    swapped = data.swap_background(jax.random.key(1), many, jnp.broadcast_to(jnp.asarray(masks[:1]), (400, 3, 6, 6)),
                                   jnp.broadcast_to(positions[:1], (400, 3)), background_C, bank, 0.5)
    rate = np.mean(np.any(np.asarray(swapped) != lat[:1], axis=(1, 2, 3)))
    assert 0.4 < rate < 0.6


def test_background_bank_is_plain_seeded_pictures_in_range():
    a, b = data.background_bank(4, (16, 24), seed=3), data.background_bank(4, (16, 24), seed=3)
    assert a.shape == (4, 16, 24, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # one colour per picture: the channels' ratios stay put across the picture (the shading multiplies them all)
    assert np.all(np.std(a, axis=(1, 2)) < 0.25) and len({tuple(np.round(x[0, 0], 3)) for x in a}) == 4


def test_context_prompts_name_each_object_alone_and_together_after_each_phrase():
    toks = ["<a>", "<b>", "<bg>", "<d>"]
    owner, objects = [0, 0, 0, 1], [True, True, False, True]  # image 0: two objects and its background
    texts = data.context_prompts(toks, owner, objects, ["on a pink sand background", "at night"], "a {}", " and a ")
    assert texts == ["a <a> on a pink sand background", "a <a> at night", "a <b> on a pink sand background",
                     "a <b> at night", "a <a> and a <b> on a pink sand background", "a <a> and a <b> at night",
                     "a <d> on a pink sand background", "a <d> at night"]
    assert not any("<bg>" in t for t in texts)  # a phrase stands where the background concept would
    assert data.context_prompts(toks, owner, objects, []) == []
    assert data.context_prompts(["<bg>"], [0], [False], ["at night"]) == []


def test_area_resize_gives_each_cell_its_share_of_the_mask():
    mask = np.zeros((1, 8, 8), np.float32)
    mask[0, 1:5, 0:4] = 1.0  # a 4 x 4 square straddling two rows of 4 x 4 cells (2 x 2 grid)
    out = np.asarray(data.area_resize(jnp.asarray(mask), (2, 2)))
    np.testing.assert_allclose(out[0], [[0.75, 0.0], [0.25, 0.0]])
    np.testing.assert_allclose(np.asarray(data.nearest_resize(jnp.asarray(mask), (2, 2)))[0], [[0.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="whole number"):
        data.area_resize(jnp.asarray(mask), (3, 3))


def test_vector_positions_find_each_vector_of_each_concept_in_the_prompt():
    from jaxconcept.model import tokens

    concepts = tokens.Concepts(("<ring>", "<bg>"), (50, 51, 60), ("purple+ring", "background"), np.zeros((3, 4)),
                               vectors=(2, 1))  # <ring> <ring>_1, then <bg>
    ids_CxV = concepts.ids_CxV
    np.testing.assert_array_equal(ids_CxV, [[50, 51], [60, -1]])
    ids_BxT = jnp.asarray([[1, 7, 50, 51, 8, 60, 2], [1, 7, 60, 2, 0, 0, 0]])  # both concepts; the background only
    pos, present = data.vector_positions(ids_BxT, jnp.asarray(ids_CxV))
    np.testing.assert_array_equal(pos[0], [[2, 3], [5, 0]])
    np.testing.assert_array_equal(present, [[[1, 1], [1, 0]], [[0, 0], [1, 0]]])
    assert pos[1, 1, 0] == 2


def test_zoom_windows_start_with_the_whole_image_and_stay_inside_it():
    w = data.zoom_windows(50, 0.6, seed=3)
    assert w.shape == (51, 3)
    np.testing.assert_array_equal(w[0], [0.0, 0.0, 1.0])
    top, left, side = w[1:].T
    assert (side >= 0.6).all() and (side < 1.0).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + side <= 1.0 + 1e-9).all() and (left + side <= 1.0 + 1e-9).all()
    np.testing.assert_array_equal(w, data.zoom_windows(50, 0.6, seed=3))  # seeded: a resumed run cuts the same views
    assert not np.array_equal(w, data.zoom_windows(50, 0.6, seed=4))


def test_zoomed_masks_cover_what_the_zoomed_images_show():
    """A bright square in the picture and its mask, cut by the same windows: the mask lies on the bright pixels of
    each view (up to the interpolation's one-pixel rim), and it grows with the zoom."""
    img = np.zeros((1, 64, 64, 3), np.float32)
    img[0, 20:32, 24:40] = 1.0
    mask_1xHxW = img[0, :, :, 0][None] > 0
    windows = np.array([[0.0, 0.0, 1.0], [0.25, 0.25, 0.5], [0.1, 0.3, 0.7]])
    views = data.zoomed_views(img, windows)
    masks = data.zoomed_masks(mask_1xHxW, windows)
    assert views.shape == (1, 3, 64, 64, 3) and masks.shape == (3, 1, 64, 64)
    np.testing.assert_array_equal(masks[0, 0], mask_1xHxW[0])
    for v in range(3):
        bright, m = views[0, v, :, :, 0] > 0.5, masks[v, 0] > 0.5
        assert (bright != m).sum() <= 2 * (m.sum() ** 0.5) * 2  # at most the rim
    assert masks[1, 0].sum() == pytest.approx(4 * mask_1xHxW.sum(), rel=0.1)  # half the side: four times the area


def test_draw_batch_with_views_picks_each_views_latents_and_masks_together():
    tok, ids = _tokenizer()
    table = data.prompt_table(tok, ["<a>", "<b>"], [0, 0], ids[:2], 16)
    arrays = data.table_arrays(table)
    v = 3
    # latent value = 10 * view + flip; masks of view k are all k
    lat = (10 * jnp.arange(v)[:, None] + jnp.arange(2)[None, :]).astype(jnp.float32)
    lat = jnp.broadcast_to(lat[None, :, :, None, None, None], (1, v, 2, 1, 2, 3))
    masks = jnp.broadcast_to(jnp.arange(v, dtype=jnp.float32)[:, None, None, None], (v, 2, 2, 3))
    b = jax.jit(lambda k: data.draw_batch(k, arrays, lat, masks, 300))(jax.random.key(1))
    view, flip = np.asarray(b["view"]), np.asarray(b["flip"])
    assert set(view.tolist()) == {0, 1, 2} and all(0.2 < (view == k).mean() < 0.47 for k in range(v))
    np.testing.assert_array_equal(np.asarray(b["latents"])[:, 0, 0, 0], 10 * view + flip)
    np.testing.assert_array_equal(np.asarray(b["masks"])[:, 0, 0, 0], view)
    # without views the draw is what it always was (the view's key is its own)
    one = data.draw_batch(jax.random.key(1), arrays, lat[:, 0], masks[0], 300)
    np.testing.assert_array_equal(np.asarray(one["flip"]), flip)
    np.testing.assert_array_equal(np.asarray(one["ids"]), np.asarray(b["ids"]))
