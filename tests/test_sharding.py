"""Sharded capture on 4 simulated CPU devices equals the 1-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import ShardingError
from jaxconcept.model import capture, tokens
from jaxconcept.parallel import sharding


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


# ------------------------------------------------------------------------------------------ FSDP


def test_fsdp_spec_splits_large_arrays_along_a_divisible_dimension():
    from jax.sharding import PartitionSpec as P

    assert sharding.fsdp_spec((3, 3, 64, 128), 4, min_size=0) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((6, 5), 4, min_size=0) == P()  # nothing divides
    assert sharding.fsdp_spec((128,), 4, min_size=1000) == P()  # small: kept whole
    assert sharding.fsdp_spec((4096, 320), 1) == P()
    mesh = sharding.make_mesh(fsdp=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
    with pytest.raises(ShardingError, match="fsdp=3 does not divide"):
        sharding.make_mesh(fsdp=3)


@pytest.fixture(scope="module")
def joint_setup(tmp_path_factory):
    from jaxconcept import config
    from jaxconcept.em.prepare import prepare
    from jaxconcept.em.stages import latent_masks
    from jaxconcept.runio import inputs
    from jaxconcept.toy import scene

    folder = tmp_path_factory.mktemp("scene")
    scene.write_scene(scene.make_scene(340, 32, 2), str(folder))
    spec = inputs.ImageSpec(str(folder / "image.png"), (
        inputs.ConceptSpec("<tri>", "red", "object", str(folder / "mask_red_triangle.png")),
        inputs.ConceptSpec("<ring>", None, "object", str(folder / "mask_purple_dotted_ring.png"))))
    cfg = config.get_config()
    cfg.model = "tiny"
    setup = prepare(cfg, [spec])
    masks = latent_masks(np.stack(setup.inputs.user_masks), setup.latent_hw, sharding.make_mesh())
    return setup, masks


def _joint_steps(setup, masks, mesh, *, fsdp: bool, remat="none", kind="adamw", n=2, opt=None):
    from jaxconcept.em import steps

    b = setup.bundle
    cfg = steps.LossConfig(batch_size=4, remat=remat)
    opt = opt or steps.make_optimizer(1e-3, 1.0, 1e-2, kind)
    state = steps.init_state(jax.tree.map(jnp.copy, {"rows": jnp.asarray(setup.concepts.init_rows),
                                                     "unet": b.params["unet"]}), opt)
    sh = sharding.fsdp_shardings(state, mesh, min_size=0) if fsdp else None
    state = jax.device_put(state, sh if fsdp else sharding.replicated(mesh))
    step = steps.make_train_step(b, setup.concepts.ids, cfg, opt, mesh, state_shardings=sh)
    frozen = sharding.put_replicated({"text_encoder": b.params["text_encoder"]}, mesh)
    run_data = sharding.put_replicated(setup.run_data, mesh)
    masks = sharding.put_replicated(masks, mesh)
    losses = []
    for _ in range(n):
        state, m = step(state, frozen, run_data, masks, jax.random.key(0))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def one_device_sgd(joint_setup):
    """Two plain-SGD joint steps on one device: the reference of the FSDP and memory-option tests."""
    import optax

    setup, masks = joint_setup
    return _joint_steps(setup, masks, sharding.make_mesh(jax.devices()[:1]), fsdp=False, opt=optax.sgd(0.5))


def test_fsdp_joint_step_equals_the_single_device_step(joint_setup, one_device_sgd):
    """Plain SGD, so the params after two steps are linear in the gradients: any mistake in how FSDP splits,
    gathers or reduces shows. (Adam would magnify reduction-order noise where a gradient is ~0, e.g. conv
    biases in front of a GroupNorm.) With AdamW, its moments are split like their params."""
    import optax

    setup, masks = joint_setup
    one, l1 = one_device_sgd
    four, l4 = _joint_steps(setup, masks, sharding.make_mesh(fsdp=4), fsdp=True, opt=optax.sgd(0.5))
    kernel = four["params"]["unet"]["conv_in"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec) and len(kernel.sharding.device_set) == 4
    assert kernel.addressable_shards[0].data.size == kernel.size // 4  # really split four ways
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    base = jax.tree.leaves(setup.bundle.params["unet"])
    for a, b, p0 in zip(jax.tree.leaves(four["params"]["unet"]), jax.tree.leaves(one["params"]["unet"]), base):
        step = float(np.abs(np.asarray(b) - np.asarray(p0)).max())
        ulps = 4e-7 * max(1.0, float(np.abs(np.asarray(b)).max()))  # float32 rounding of the stored weight
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-4 * step + ulps
    np.testing.assert_allclose(four["params"]["rows"], one["params"]["rows"], rtol=1e-5, atol=1e-6)
    from jaxconcept.em import steps

    adam = jax.eval_shape(lambda p: steps.init_state(p, steps.make_optimizer(1e-3)), four["params"])
    sh = sharding.fsdp_shardings(adam, sharding.make_mesh(fsdp=4), min_size=0)
    assert sh["opt_state"][1][0].mu["unet"]["conv_in"]["kernel"].spec == kernel.sharding.spec




# Remat is not crossed with the optimisers here: tests/test_learner.py checks that `dots` and `full` give the
# gradients of no remat, so their trajectories follow; compiling remat programs again would only cost time.
def test_factored_optimizer_trains_in_the_joint_step(joint_setup, one_device_sgd):
    """Adafactor, the memory option whose state differs in structure from AdamW's (factored second moments, no
    first moment), in the real joint step: the same first loss (it comes before any update), the params
    move, and it stores less than AdamW (whose state is sized without running it)."""
    from jaxconcept.em import steps

    setup, masks = joint_setup
    _, l_ref = one_device_sgd
    got, l_got = _joint_steps(setup, masks, sharding.make_mesh(jax.devices()[:1]), fsdp=False, kind="adafactor", n=1)
    assert l_got[0] == pytest.approx(l_ref[0], rel=1e-5)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         got["params"]["unet"], setup.bundle.params["unet"]))
    assert max(moved) > 0
    adamw = jax.eval_shape(lambda p: steps.init_state(p, steps.make_optimizer(1e-3, 1.0, 1e-2, "adamw")), got["params"])
    assert _state_bytes(got["opt_state"]) < 0.6 * _state_bytes(adamw["opt_state"])


def _state_bytes(opt_state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))


def test_bfloat16_first_moment_takes_adamws_step_in_three_quarters_of_its_memory(joint_setup):
    """adamw_bf16 is AdamW with its first moment stored in bfloat16, and nothing else: its first update is AdamW's
    to the moment's rounding (2^-8), shown on the rows and the UNet's outer convolutions, and its state for the
    joint stage's whole tree (rows and UNet; sized without running it) takes 3/4 of AdamW's bytes. The step
    itself is the optimizer-agnostic one adafactor runs above."""
    from jaxconcept.em import steps

    setup, _ = joint_setup
    unet = setup.bundle.params["unet"]
    params = {"rows": jnp.asarray(setup.concepts.init_rows), "conv_in": unet["conv_in"], "conv_out": unet["conv_out"]}
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    grads = jax.tree.unflatten(treedef, [jnp.asarray(1e-3 * rng.standard_normal(x.shape), x.dtype) for x in leaves])
    opts = {kind: steps.make_optimizer(1e-3, 1.0, 1e-2, kind) for kind in ("adamw", "adamw_bf16")}
    first = {kind: jax.jit(lambda g, p, opt=opt: opt.update(g, opt.init(p), p)[0])(grads, params)
             for kind, opt in opts.items()}
    for a, b in zip(jax.tree.leaves(first["adamw_bf16"]), jax.tree.leaves(first["adamw"])):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-7)
    whole = {"rows": params["rows"], "unet": unet}
    state = {kind: jax.eval_shape(opt.init, whole) for kind, opt in opts.items()}
    assert _state_bytes(state["adamw_bf16"]) == pytest.approx(0.75 * _state_bytes(state["adamw"]), rel=1e-3)
