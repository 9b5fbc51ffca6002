"""Diffusion math against diffusers' own scheduler."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.model import diffusion


def test_add_noise_matches_diffusers_scheduler(tiny):
    sched, state = tiny.scheduler, tiny.scheduler_state
    x = jax.random.normal(jax.random.key(0), (3, 4, 8, 8))
    n = jax.random.normal(jax.random.key(1), (3, 4, 8, 8))
    t = jnp.array([0, 500, 999])
    ours = diffusion.add_noise(state.common.alphas_cumprod, x, n, t)
    ref = sched.add_noise(state, x, n, t)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    # scaled-linear SD schedule: a_0 close to 1, a_999 close to 0
    acp = np.asarray(state.common.alphas_cumprod)
    assert acp[0] > 0.999 and acp[-1] < 0.01
