"""Guided sampling: exact on a predictor with a known answer; deterministic on the tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.model import adapter, sampling, tokens


def _point_mass_eps(alphas_cumprod, x_t, t_B, context):
    """The exact noise predictor when all data sits at x0 = context[:, 0, 0] (a constant image)."""
    x0 = context[:, 0, 0][:, None, None, None] * jnp.ones_like(x_t)
    a_t = alphas_cumprod[t_B][:, None, None, None]
    return (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)


def test_ddim_with_guidance_lands_on_the_guided_target():
    sched, state = adapter.ddim_scheduler(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               set_alpha_to_one=True, steps_offset=1, clip_sample=False))
    eps_fn = functools.partial(_point_mass_eps, state.common.alphas_cumprod)
    noise = jax.random.normal(jax.random.key(0), (2, 4, 8, 8))
    cond = jnp.full((2, 3, 5), 0.5)  # target A = 0.5
    uncond = jnp.full((2, 3, 5), -0.25)  # target B = -0.25
    for guidance in (1.0, 3.0):
        out = jax.jit(sampling.guided_sample, static_argnums=(0, 1, 6))(
            eps_fn, sched, state, noise, cond, uncond, 20, guidance)
        expected = -0.25 + guidance * (0.5 - -0.25)  # x0 predictions are linear in eps
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


def test_tiny_model_sampling_is_deterministic_per_seed(tiny):
    ids = tokens.tokenize(tiny.tokenizer, ["a red dog", ""], tiny.max_length)
    ctx = tokens.text_hidden_states(tiny.text_encoder, tiny.params["text_encoder"], jnp.asarray(ids))
    cond, uncond = ctx[:1], ctx[1:]
    sample = sampling.make_sampler(tiny, num_steps=4, guidance=7.5)
    noise = lambda seed: jax.random.normal(jax.random.key(seed), (1, 4, 16, 16))
    a, b, c = sample(tiny.params, noise(0), cond, uncond), sample(tiny.params, noise(0), cond, uncond), \
        sample(tiny.params, noise(1), cond, uncond)
    assert a.shape == (1, 32, 32, 3) and float(jnp.abs(a).max()) <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
