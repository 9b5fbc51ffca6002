"""SDXL: the tiny SDXL-shaped model, SDXL folders (torch-free), the conditioning (both encoders' states, the pooled
embedding, the time ids, concept rows in both tables) and the UNet with its added conditioning, against PyTorch
diffusers' UNet2DConditionModel / StableDiffusionXLPipeline and transformers' CLIP text classes."""

import copy
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxconcept import ModelSourceError, load_model  # noqa: E402
from jaxconcept.model import adapter, capture, conditioning, loading as model, tokens  # noqa: E402
from jaxconcept.bench.torch_reference import record_cross_attention  # noqa: E402
from torch_reference import build_sdxl_folder, rel_err  # noqa: E402

TOL = 1e-4
PROMPTS = ["a photo of a red dog", "a blue car on the beach"]


@pytest.fixture(scope="module")
def tiny_sdxl():
    return load_model("tiny-sdxl")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pt_sdxl"))
    pt = build_sdxl_folder(folder)
    return load_model(folder), pt


def _pt_ids(tokenizer, prompts) -> torch.Tensor:
    enc = tokenizer(prompts, padding="max_length", max_length=77, truncation=True)
    return torch.tensor(enc.input_ids)


def _pt_pipeline(pt, force_zeros: bool = True):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    unet, vae, text, text_2, tok, tok_2 = pt
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=DDIMScheduler(**model.SD_SCHEDULER),
                                     add_watermarker=False, force_zeros_for_empty_prompt=force_zeros)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sdxl_has_sdxls_structure(tiny_sdxl):
    """No cross-attention at the finest level, list-valued transformer depths, two encoders and tokenizers."""
    b = tiny_sdxl
    assert b.is_sdxl and b.source == "tiny-sdxl" and b.resolution == 32
    assert b.unet.config.addition_embed_type == "text_time"
    assert b.unet.config.transformer_layers_per_block == (1, 2)
    assert adapter.has_projection(b.text_encoder_2) and not adapter.has_projection(b.text_encoder)
    assert b.tokenizer_2.pad_token == "!" and b.tokenizer_2.get_vocab() == b.tokenizer.get_vocab()
    assert b.params["text_encoder_2"]["text_projection"]["kernel"].shape == (64, 32)
    assert not load_model("tiny").is_sdxl
    ids = tokens.tokenize(b.tokenizer, PROMPTS, b.max_length)
    cond = jax.eval_shape(lambda p, i: conditioning.encode(conditioning.text_model(b), p, i,
                                                            time_ids_K=conditioning.image_time_ids(b)), b.params, ids)
    assert cond.context_BxTxD.shape == (2, 77, 96) and cond.text_embeds_BxP.shape == (2, 32)
    assert cond.time_ids_BxK.shape == (2, 6)
    layers = capture.layer_names(b.unet, b.params["unet"], jnp.zeros((2, 4, 16, 16)), cond)
    grids = {hw[0] for hw, _ in layers.values()}
    assert grids == {8}  # nothing at the finest (16x16) level
    assert sum(k.startswith("down_blocks_1/") for k in layers) == 2  # two transformer blocks at the coarser


def test_sdxl_folder_round_trips_through_flax_weights(tiny_sdxl, tmp_path):
    b = tiny_sdxl
    model.save_flax(b, str(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "FlaxStableDiffusionXLPipeline" and "text_encoder_2" in index
    loaded = load_model(str(tmp_path))
    assert loaded.is_sdxl and loaded.tokenizer_2.pad_token == "!"
    flat_a = jax.tree_util.tree_flatten_with_path(b.params)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(loaded.params)[0])
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(leaf))


def test_both_encoders_states_and_the_pooled_embedding_match(pair):
    bundle, pt = pair
    _, _, pt_text, pt_text_2, tok, tok_2 = pt
    ids = tokens.tokenize(bundle.tokenizer, PROMPTS, bundle.max_length)
    ids_2 = tokens.tokenize(bundle.tokenizer_2, PROMPTS, bundle.max_length)
    text = conditioning.text_model(bundle)
    np.testing.assert_array_equal(conditioning.second_ids(jnp.asarray(ids), text.end_id, text.pad_id_2), ids_2)
    with torch.no_grad():
        ref_1 = pt_text(_pt_ids(tok, PROMPTS), output_hidden_states=True).hidden_states[-2].numpy()
        out_2 = pt_text_2(_pt_ids(tok_2, PROMPTS), output_hidden_states=True)
        ref_2, ref_pooled = out_2.hidden_states[-2].numpy(), out_2.text_embeds.numpy()
    context, pooled = jax.jit(lambda p, i: conditioning.sdxl_text_states(text, p, i))(bundle.params, ids)
    errs = (rel_err(context[..., :32], ref_1), rel_err(context[..., 32:], ref_2), rel_err(pooled, ref_pooled))
    print("relative errors: states 1 %.2e, states 2 %.2e, pooled %.2e" % errs)
    assert context.shape == (2, 77, 96) and pooled.shape == ref_pooled.shape
    assert max(errs) <= TOL, errs


def _pt_with_concepts(pt, concepts, rows_NxE, names):
    """Copies of the PyTorch encoders and tokenizers with the concept tokens added as diffusers' textual
    inversion adds them (one row in each table)."""
    unet, vae, text, text_2, tok, tok_2 = pt
    text, text_2, tok, tok_2 = (copy.deepcopy(x) for x in (text, text_2, tok, tok_2))
    rows_1, rows_2 = conditioning.split_rows(np.asarray(rows_NxE), concepts.widths[0])
    for t, enc, rows in ((tok, text, rows_1), (tok_2, text_2, rows_2)):
        t.add_tokens(names)
        enc.resize_token_embeddings(len(t))
        with torch.no_grad():
            enc.get_input_embeddings().weight[list(concepts.ids)] = torch.from_numpy(np.asarray(rows))
    return unet, vae, text, text_2, tok, tok_2


def test_condition_with_concept_tokens_matches_the_sdxl_pipeline(pair):
    """Concept rows in both tables, a two-vector token written out, time ids: what StableDiffusionXLPipeline's
    encode_prompt and _get_add_time_ids make of the same prompts."""
    bundle, pt = pair
    b2, concepts = tokens.add_concept_tokens(bundle, ["<v1>", "<v2>"], ["dog", "red+car"], vectors=[1, 0])
    assert concepts.widths == (32, 64) and concepts.init_rows.shape == (3, 96)
    rows = concepts.init_rows + np.random.default_rng(0).normal(0, 0.3, concepts.init_rows.shape).astype(np.float32)
    prompts = ["a photo of <v1> and <v2>", "<v2> on the beach"]
    ids = tokens.tokenize(b2.tokenizer, prompts, b2.max_length)
    cond = conditioning.encode(conditioning.text_model(b2), b2.params, jnp.asarray(ids), concepts.ids_array,
                               jnp.asarray(rows), conditioning.time_ids((32, 32)))
    pipe = _pt_pipeline(_pt_with_concepts(pt, concepts, rows, ["<v1>", "<v2>", "<v2>_1"]))
    with torch.no_grad():
        ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        ref_time = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    errs = rel_err(cond.context_BxTxD, ref_ctx.numpy()), rel_err(cond.text_embeds_BxP, ref_pooled.numpy())
    print("relative errors with concept tokens: context %.2e, pooled %.2e" % errs)
    assert max(errs) <= TOL, errs
    np.testing.assert_array_equal(cond.time_ids_BxK, np.repeat(ref_time.numpy(), 2, axis=0))


def test_concept_rows_of_both_tables_get_gradients(pair):
    bundle, _ = pair
    b2, concepts = tokens.add_concept_tokens(bundle, ["<v1>"], ["dog"])
    ids = jnp.asarray(tokens.tokenize(b2.tokenizer, ["a photo of <v1>"], b2.max_length))
    text, time_ids = conditioning.text_model(b2), conditioning.time_ids((32, 32))

    def loss(rows):
        cond = conditioning.encode(text, b2.params, ids, concepts.ids_array, rows, time_ids)
        return jnp.sum(cond.context_BxTxD ** 2) + jnp.sum(cond.text_embeds_BxP ** 2)

    grad = jax.jit(jax.grad(loss))(jnp.asarray(concepts.init_rows))
    grad_1, grad_2 = conditioning.split_rows(grad, 32)
    assert float(jnp.abs(grad_1).max()) > 0 and float(jnp.abs(grad_2).max()) > 0


def test_unet_eps_with_added_conditioning_and_every_cross_attention_map_match(pair):
    bundle, pt = pair
    pt_unet = pt[0]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([17, 803], np.int32)
    context = rng.standard_normal((2, 77, 96)).astype(np.float32)
    pooled = rng.standard_normal((2, 32)).astype(np.float32)
    time_ids = np.stack([conditioning.time_ids((32, 32)), conditioning.time_ids((48, 40), (3, 5), (32, 32))])
    with torch.no_grad():
        stores = record_cross_attention(pt_unet)  # the speed benchmark's reference recorder
        added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
        ref_eps = pt_unet(torch.from_numpy(latents), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(context),
                          added_cond_kwargs=added).sample.numpy()
    store = {name: probs[-1].numpy() for name, probs in stores.items() if probs}
    cond = conditioning.SDXLCondition(jnp.asarray(context), jnp.asarray(pooled), jnp.asarray(time_ids))
    fn = jax.jit(lambda p, x, tt, c: capture.unet_with_attention(bundle.unet, p, x, tt, c))
    eps, maps = fn(bundle.params["unet"], latents, t, cond)
    err = rel_err(eps, ref_eps)
    print(f"SDXL UNet eps relative error {err:.2e}")
    assert err <= TOL, f"UNet eps relative error {err:.2e}"
    assert set(maps) == set(store) and len(maps) == 8  # every cross-attention layer; none at the finest level
    for name, ref in store.items():
        assert maps[name].shape == ref.shape, name
        assert rel_err(maps[name], ref) <= TOL, name
    other = cond._replace(time_ids_BxK=cond.time_ids_BxK[::-1])  # the time ids reach the UNet
    assert rel_err(fn(bundle.params["unet"], latents, t, other)[0], eps) > 1e-3


def test_sdxl_folder_loader_is_torch_free(pair):
    folder = pair[0].source
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from jaxconcept import load_model\n"
        f"b = load_model({folder!r})\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print('loaded', b.is_sdxl, b.text_encoder_2.config.projection_dim)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded True 32" in out.stdout


def _copy(pair, tmp_path) -> str:
    folder = str(tmp_path / "edited")
    shutil.copytree(pair[0].source, folder)
    return folder


def test_what_sdxl_folders_cannot_be_is_refused(pair, tmp_path):
    folder = _copy(pair, tmp_path)
    shutil.rmtree(os.path.join(folder, "text_encoder_2"))
    with pytest.raises(ModelSourceError, match="needs both text encoders.*lacks text_encoder_2/.*refiner"):
        load_model(folder)
    shutil.rmtree(os.path.join(folder, "unet"))
    shutil.copytree(os.path.join(pair[0].source, "text_encoder_2"), os.path.join(folder, "text_encoder_2"))
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**model.TINY_UNET).save_pretrained(os.path.join(folder, "unet"))
    with pytest.raises(ModelSourceError, match="no SDXL added conditioning"):
        load_model(folder)


def test_tokenizers_with_different_vocabularies_are_refused(pair, tmp_path):
    folder = _copy(pair, tmp_path)
    shutil.rmtree(os.path.join(folder, "tokenizer_2"))
    model.word_tokenizer(model.TINY_WORDS[:-1], pad_token="!").save_pretrained(os.path.join(folder, "tokenizer_2"))
    with pytest.raises(ModelSourceError, match="different vocabularies"):
        load_model(folder)


def test_show_attention_reads_sdxls_layers(tiny_sdxl):
    from jaxconcept import show_attention

    from jaxconcept.parallel import sharding

    # one device: the 4-device program takes twice as long to compile, and sharding is tested for SD already
    out = show_attention.token_attention(tiny_sdxl, "a red dog on the beach", num_timesteps=2,
                                         mesh=sharding.make_mesh(jax.devices()[:1]))
    assert out["words"] == ["a", "red", "dog", "on", "the", "beach"]
    assert out["maps"].shape == (6, 8, 8) and len(out["layers"]) == 8  # the finest captured grid: 8x8
    assert not any(k.startswith(("down_blocks_0", "up_blocks_1")) for k in out["layers"])


# ------------------------------------------------------------------------------------------ generation


def _with_index(pair, tmp_path, index: dict) -> str:
    """A copy of the SDXL folder with this model_index.json."""
    folder = _copy(pair, tmp_path)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(dict({"_class_name": "StableDiffusionXLPipeline"}, **index), f)
    return folder


@pytest.mark.parametrize("force_zeros", [True, False])
def test_generate_matches_the_pytorch_sdxl_pipeline(pair, tmp_path, force_zeros):
    """Guided DDIM with SDXL's micro-conditioning, decoded: our generate against StableDiffusionXLPipeline from the
    same initial latents. Without a negative prompt the unconditional text is zeros where the folder's
    model_index.json says `force_zeros_for_empty_prompt` (or says nothing: the pipeline's default, SDXL base's
    choice), else the empty prompt's encoding."""
    from jaxconcept import generate
    from jaxconcept.parallel import sharding

    bundle, pt = pair  # a folder without model_index.json
    if not force_zeros:
        bundle = load_model(_with_index(pair, tmp_path, {"force_zeros_for_empty_prompt": False}))
    assert bundle.force_zeros_for_empty_prompt is force_zeros
    settings = generate.Settings(num_images=1, steps=3, guidance=5.0, seed=3, scheduler="ddim")
    ours = generate.generate(bundle, PROMPTS, settings, mesh=sharding.make_mesh(jax.devices()[:1]), progress=False)
    noise = generate.initial_noise(3, len(PROMPTS), 1, (4, 16, 16))[:, 0]
    pipe = _pt_pipeline(pt, force_zeros)
    with torch.no_grad():
        ref = pipe(PROMPTS, height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                   latents=torch.from_numpy(np.array(noise)), output_type="np").images
    diff = np.abs(ours[:, 0].astype(np.float64) / 255 - ref)
    print(f"SDXL generate vs PyTorch pipeline (force_zeros_for_empty_prompt={force_zeros}): max |diff| "
          f"{diff.max() * 255:.2f} / 255, mean {diff.mean() * 255:.3f}")
    assert ours.shape == (2, 1, 32, 32, 3) and diff.max() <= 1.5 / 255


def test_force_zeros_for_empty_prompt_is_read_kept_and_exported(pair, tmp_path):
    """Read from model_index.json (true where it does not say), kept through our Flax folders, written in the
    export's model_index.json; a negative prompt is always encoded; SD 1/2 never zeros."""
    from jaxconcept import export
    from jaxconcept.model import sampling

    for value in (False, True):
        b = load_model(_with_index(pair, tmp_path / str(value), {"force_zeros_for_empty_prompt": value}))
        assert b.force_zeros_for_empty_prompt is value
        assert sampling.zeros_for_uncond(b) is value and not sampling.zeros_for_uncond(b, "blurry")
        model.save_flax(b, str(tmp_path / f"flax_{value}"))
        assert load_model(str(tmp_path / f"flax_{value}")).force_zeros_for_empty_prompt is value
        export.save_pipeline_extras(str(tmp_path / f"pt_{value}"), b)
        assert json.loads((tmp_path / f"pt_{value}" / "model_index.json").read_text())[
            "force_zeros_for_empty_prompt"] is value
    tiny = load_model("tiny")
    assert not tiny.force_zeros_for_empty_prompt and not sampling.zeros_for_uncond(tiny)
    with pytest.raises(ModelSourceError, match="force_zeros_for_empty_prompt is 'yes', not true or false"):
        load_model(_with_index(pair, tmp_path / "bad", {"force_zeros_for_empty_prompt": "yes"}))


# ------------------------------------------------------------------------------------------ export
# (learner runs on tiny-sdxl, generate and evaluate on them, and their exports loaded in PyTorch: test_sdxl_joint.py)


def test_sdxl_load_lines_name_the_xl_pipeline_both_encoders_and_the_lora_file():
    from jaxconcept import export

    summary = {"out": "/x/out", "pipeline": False, "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
               "sdxl": True, "lora": {"file": "lora.safetensors", "rank": 4, "alpha": 4.0, "targets": "attn"},
               "files": {"<a>": "embeddings/a.safetensors"}, "run": "/x/run", "unet": "lora"}
    lines = export.load_snippet(summary).splitlines()
    assert lines[1] == ("pipe = diffusers.StableDiffusionXLPipeline.from_pretrained("
                        "'stabilityai/stable-diffusion-xl-base-1.0')")
    assert lines[2] == "pipe.load_lora_weights('/x/out', weight_name='lora.safetensors')"
    assert "e['clip_l']" in lines[4] and "tokenizer=pipe.tokenizer)" in lines[4]
    assert "e['clip_g']" in lines[5] and "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in lines[5]
    text = export.readme(summary)
    assert "`clip_l`" in text and "`clip_g`" in text and "pipe.load_lora_weights" in text
    tuned = dict(summary, text_encoder="tuned")  # joint.text_encoder: both tuned encoders come from the export
    lines = export.load_snippet(tuned).splitlines()
    assert lines[0] == "import diffusers, json, os, safetensors.torch, transformers"
    assert lines[1] == ("pipe = diffusers.StableDiffusionXLPipeline.from_pretrained("
                        "'stabilityai/stable-diffusion-xl-base-1.0', text_encoder=transformers.CLIPTextModel."
                        "from_pretrained(os.path.join('/x/out', 'text_encoder')), text_encoder_2=transformers."
                        "CLIPTextModelWithProjection.from_pretrained(os.path.join('/x/out', 'text_encoder_2')))")
    assert "transformers" not in export.load_snippet(dict(tuned, pipeline=True))  # in the pipeline folder already
