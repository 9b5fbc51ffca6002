"""model/lora.py: adapters on the frozen UNet, merged for sampling, and the PEFT file PyTorch diffusers loads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import load_model
from jaxconcept.model import capture, lora

ALL = ("attention", "ff", "proj")


def _inputs(bundle, seed=0):
    rng = np.random.default_rng(seed)
    latents = jnp.asarray(rng.standard_normal((2, int(bundle.unet.in_channels), 16, 16)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 8, int(bundle.unet.cross_attention_dim))), jnp.float32)
    return latents, jnp.asarray([17, 803], jnp.int32), context


def _eps(unet, params, x, t, c, lora=None):
    """capture.unet_eps, jitted: run eagerly, each of the UNet's operations is dispatched and compiled on its own
    (a tiny UNet's call took seconds, against one program compiled for it)."""
    if lora is None:
        return jax.jit(lambda p, x, t, c: capture.unet_eps(unet, p, x, t, c))(params, x, t, c)
    adapters, scale = lora
    return jax.jit(lambda p, a, x, t, c: capture.unet_eps(unet, p, x, t, c, lora=(a, scale)))(params, adapters, x, t, c)


def _trained(bundle, spec, seed=1):
    """Adapters as after some training: B no longer zero."""
    adapters = lora.init(jax.random.key(seed), bundle.params["unet"], spec)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 10_000))
    return jax.tree.map(lambda x: x if x.shape[0] != spec.rank else 0.2 * jax.random.normal(next(keys), x.shape),
                        adapters)


def test_targets_cover_every_transformer_block(tiny):
    unet = tiny.params["unet"]
    attn = lora.target_paths(unet, ("attention",))
    blocks = {p[:-2] for p in attn}
    assert len(attn) == 8 * len(blocks) and len(blocks) == 4  # q, k, v, out of attn1 and attn2, 4 blocks
    every = lora.target_paths(unet, ALL)
    assert len(every) == len(attn) + 2 * len(blocks) + 2 * len(blocks)  # + ff in/out, + proj in/out
    assert lora.parse_targets("attention+ff") == ("attention", "ff")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.parse_targets("attention+mlp")


def test_fresh_adapters_change_nothing_and_are_small(tiny):
    spec = lora.LoraSpec(4, 4.0)
    adapters = lora.init(jax.random.key(0), tiny.params["unet"], spec)
    x, t, c = _inputs(tiny)
    base = _eps(tiny.unet, tiny.params["unet"], x, t, c)
    adapted = _eps(tiny.unet, tiny.params["unet"], x, t, c, lora=(adapters, spec.scale))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))  # B = 0
    assert lora.count(adapters) < 0.2 * sum(v.size for v in jax.tree.leaves(tiny.params["unet"]))


def test_applied_equals_merged_and_moves_the_output(tiny):
    spec = lora.LoraSpec(4, 8.0, ALL)
    adapters = _trained(tiny, spec)
    x, t, c = _inputs(tiny)
    base = _eps(tiny.unet, tiny.params["unet"], x, t, c)
    applied, maps = jax.jit(lambda a: capture.unet_with_attention(tiny.unet, tiny.params["unet"], x, t, c,
                                                                  lora=(a, spec.scale)))(adapters)
    merged = _eps(tiny.unet, lora.merge(tiny.params["unet"], adapters, spec.scale), x, t, c)
    assert float(jnp.max(jnp.abs(applied - base))) > 1e-2  # the adapters act
    np.testing.assert_allclose(np.asarray(applied), np.asarray(merged), rtol=1e-4, atol=1e-4)
    assert len(maps) == 4  # the capture still sees every cross-attention layer


def test_gradients_reach_only_the_adapters(tiny):
    spec = lora.LoraSpec(2, 2.0)
    adapters = _trained(tiny, spec)
    x, t, c = _inputs(tiny)

    def loss(ad):
        return jnp.mean(capture.unet_eps(tiny.unet, tiny.params["unet"], x, t, c, lora=(ad, spec.scale)) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert len(norms) == 2 * 8 * 4 and all(n > 0 for n in norms)


def test_peft_file_round_trip(tiny):
    spec = lora.LoraSpec(4, 2.0, ("attention", "proj"))
    adapters = _trained(tiny, spec)
    tensors, meta = lora.to_peft(adapters, spec, tiny.params["unet"])
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert key in tensors and tensors[key].shape[0] == 4
    assert any(k.endswith("to_out.0.lora_B.weight") for k in tensors)
    back, spec2 = lora.from_peft(tensors, meta, tiny.params["unet"])
    assert spec2 == spec
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="rank and alpha"):
        lora.from_peft(tensors, {}, tiny.params["unet"])


def test_pytorch_diffusers_loads_the_file_and_agrees(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.numpy import save_file
    from transformers import CLIPTokenizer

    from torch_reference import build_folder

    folder = str(tmp_path / "sd")
    pt_unet, pt_vae, pt_text = build_folder(folder)
    bundle = load_model(folder)
    spec = lora.LoraSpec(4, 8.0, ALL)  # a scale of 2: a wrong alpha would show
    adapters = _trained(bundle, spec)
    tensors, meta = lora.to_peft(adapters, spec, bundle.params["unet"])
    save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=meta)

    pipe = StableDiffusionPipeline(vae=pt_vae, text_encoder=pt_text, unet=pt_unet,
                                   tokenizer=CLIPTokenizer.from_pretrained(f"{folder}/tokenizer"),
                                   scheduler=DDIMScheduler.from_pretrained(f"{folder}/scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    x, t, c = _inputs(bundle)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(np.array(x)), torch.from_numpy(np.asarray(t, np.int64)),
                        torch.from_numpy(np.array(c))).sample.numpy()
    ours = _eps(bundle.unet, bundle.params["unet"], x, t, c, lora=(adapters, spec.scale))
    base = _eps(bundle.unet, bundle.params["unet"], x, t, c)
    rel = float(np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref))
    moved = float(np.linalg.norm(np.asarray(base) - ref) / np.linalg.norm(ref))
    assert rel <= 1e-4 and moved > 1e-2, (rel, moved)


def test_a_rank_4_run_on_sd15_writes_under_10_mb():
    """SD 1.5's UNet (its architecture, no weights): rank-4 adapters on every attention projection are 0.8 M
    parameters, 3.2 MB in float32, where the whole UNet is 3.4 GB."""
    import functools

    from jaxconcept.bench.workload import SD15_UNET
    from jaxconcept.model import adapter

    shapes = adapter.param_shapes(adapter.unet_from_config(SD15_UNET))
    spec = lora.LoraSpec(4, 4.0)
    adapters = jax.eval_shape(functools.partial(lora.init, spec=spec), jax.random.key(0), shapes)
    assert len(lora.target_paths(shapes, spec.targets)) == 16 * 8  # 16 transformer blocks x q, k, v, out x 2
    size = sum(x.size * 4 for x in jax.tree.leaves(adapters))
    assert 3e6 < size < 10e6 and size < sum(x.size * 4 for x in jax.tree.leaves(shapes)) / 1000
