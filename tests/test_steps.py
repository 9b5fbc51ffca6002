"""The steps' optimisers: the flat update of small trainables equals the per-leaf one, and when it is chosen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import set_fields
from jaxconcept import config, settings
from jaxconcept.em import stages, steps


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {"rows": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32),
            "unet": {"a": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                     "b": {"bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}}


def _step(opt, state, grads):
    """One optimiser step on (params, optimiser state)."""
    p, s = state
    u, s = opt.update(grads, s, p)
    return optax.apply_updates(p, u), s


@pytest.mark.parametrize("kind", ["adamw", "adamw_bf16"])
def test_flat_update_takes_the_per_leaf_steps(kind):
    params, per_leaf, flat = _tree(0), steps.make_optimizer(1e-2, 0.5, 1e-2, kind), \
        steps.make_optimizer(1e-2, 0.5, 1e-2, kind, flat=True)
    a, b = (params, per_leaf.init(params)), (params, flat.init(params))
    assert len(jax.tree.leaves(b[1])) < len(jax.tree.leaves(a[1]))  # one vector per moment, not one per leaf
    for i in range(5):  # gradients large enough for the clip to act
        grads = jax.tree.map(lambda x: x * 10.0, _tree(i + 1))
        a, b = _step(per_leaf, a, grads), _step(flat, b, grads)
    tol = 1e-2 if kind == "adamw_bf16" else 1e-6  # bfloat16 moments round where the concatenation puts them
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=tol, atol=tol)


def _settings(**changes):
    c = config.get_config()
    c.model = "tiny"
    return settings.resolve(set_fields(c, changes))


def test_flat_update_only_for_small_unsplit_adamw_trainables(tiny, monkeypatch):
    params = tiny.params
    assert stages.flat_joint_update(_settings(), params)  # the tiny UNet: 3 MB
    assert stages.flat_joint_update(_settings(**{"joint.lora_rank": 4}), params)
    assert not stages.flat_joint_update(_settings(**{"joint.optimizer": "adafactor"}), params)
    assert not stages.flat_joint_update(_settings(**{"mesh.fsdp": 2}), params)
    assert not stages.flat_joint_update(_settings(**{"joint.steps": 0}), params)
    monkeypatch.setattr(steps, "FLAT_UPDATE_MAX_BYTES", 1024)  # a whole UNet larger than the limit
    assert not stages.flat_joint_update(_settings(), params)
    assert stages.stage_optimizers(_settings(), params)["joint"] is steps.make_optimizer(3e-5, 1.0, 1e-2, "adamw")
