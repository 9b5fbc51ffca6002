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


def test_min_snr_weights_match_hand_computed_values(tiny):
    a = np.asarray(tiny.scheduler_state.common.alphas_cumprod, np.float64)
    t = np.array([0, 100, 500, 999])
    snr = a[t] / (1 - a[t])  # t=0: SNR ~ 1170, t=999: ~ 0.0047
    got = np.asarray(diffusion.min_snr_weights("epsilon", jnp.asarray(a, jnp.float32), jnp.asarray(t), 5.0))
    np.testing.assert_allclose(got, np.minimum(snr, 5.0) / snr, rtol=1e-4)
    assert got[0] < 0.01 and got[-1] == 1.0  # low noise down-weighted, high noise untouched
    # v-prediction: the v error is the noise error times (SNR + 1), so the cap divides by SNR + 1
    got_v = np.asarray(diffusion.min_snr_weights("v_prediction", jnp.asarray(a, jnp.float32), jnp.asarray(t), 5.0))
    np.testing.assert_allclose(got_v, np.minimum(snr, 5.0) / (snr + 1), rtol=1e-4)
