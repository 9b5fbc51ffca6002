"""Image metrics (CLIP-I, CLIP-T-style cosine, LPIPS-style diversity, concept presence) with a Flax CLIP."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxconcept.eval import metrics
from jaxconcept.errors import ModelSourceError

TOL = 1e-4
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not OpenAI's: proves the folder's preprocessor config is read


@pytest.fixture(scope="module")
def clip():
    return metrics.load_clip("tiny-clip")


@pytest.fixture(scope="module")
def images():
    """Four distinct smooth 40x40 uint8 images (resized to the tiny CLIP's 32 px inside)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 40.0
    out = []
    for _ in range(4):
        f = rng.uniform(1, 4, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        chans = [0.5 + 0.5 * np.sin(2 * np.pi * (f[c, 0] * yy + f[c, 1] * xx) + phase[c]) for c in range(3)]
        out.append(np.stack(chans, -1))
    return np.round(np.stack(out) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ embeddings


def test_embeddings_unit_norm_and_shapes(clip, images):
    img = np.asarray(metrics.image_embeddings(clip, images))
    txt = np.asarray(metrics.text_embeddings(clip, ["a photo of a dog", "a red car", "a cat on the grass"]))
    assert img.shape == (4, metrics.TINY_CLIP_PROJECTION) and txt.shape == (3, metrics.TINY_CLIP_PROJECTION)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-6)
    assert metrics.cosine_matrix(img, txt).shape == (4, 3)


def test_image_embedding_is_batch_invariant(clip, images):
    alone = np.asarray(metrics.image_embeddings(clip, images[:1]))[0]
    with_bc = np.asarray(metrics.image_embeddings(clip, images[[0, 1, 2]]))[0]
    with_dc = np.asarray(metrics.image_embeddings(clip, images[[0, 3, 2]]))[0]
    np.testing.assert_allclose(with_bc, with_dc, atol=1e-6)
    np.testing.assert_allclose(with_bc, alone, atol=1e-6)


def test_identical_images_similarity_one_distance_zero(clip, images):
    emb = metrics.image_embeddings(clip, images)
    assert abs(float(metrics.clip_image_similarity(emb[:1], emb[:1])) - 1.0) <= 1e-5
    same = np.repeat(images[:1], 3, axis=0)
    emb_same = metrics.image_embeddings(clip, same)
    assert abs(float(metrics.clip_image_similarity(emb_same, emb_same)) - 1.0) <= 1e-5
    feats = metrics.perceptual_features(clip, images[:2])
    np.testing.assert_allclose(metrics.perceptual_distance(feats, feats), 0.0, atol=1e-7)
    assert float(metrics.diversity(clip, same)) <= 1e-6


def test_distance_symmetric_and_diversity_positive(clip, images):
    fa = metrics.perceptual_features(clip, images[:2])
    fb = metrics.perceptual_features(clip, images[2:])
    assert len(fa) == metrics.TINY_CLIP_VISION["num_hidden_layers"]
    assert fa[0].shape == (2, (32 // 8) ** 2, 32)  # patch tokens only, class token dropped
    np.testing.assert_allclose(np.linalg.norm(fa[0], axis=-1), 1.0, atol=1e-5)  # unit over channels
    d_ab, d_ba = metrics.perceptual_distance(fa, fb), metrics.perceptual_distance(fb, fa)
    np.testing.assert_allclose(d_ab, d_ba, rtol=1e-6)
    assert np.all(np.asarray(d_ab) > 0) and np.all(np.asarray(d_ab) <= 4)
    div = float(metrics.diversity(clip, images))
    assert div > 0
    # = the mean of the 6 pairwise distances computed one pair at a time
    feats = metrics.perceptual_features(clip, images)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    by_hand = np.mean([float(metrics.perceptual_distance([f[i:i + 1] for f in feats], [f[j:j + 1] for f in feats])[0])
                       for i, j in pairs])
    assert abs(div - by_hand) <= 1e-5 * by_hand


def test_diversity_needs_two_images_and_uint8(clip, images):
    with pytest.raises(ValueError, match="at least 2 images"):
        metrics.diversity(clip, images[:1])
    with pytest.raises(TypeError, match="uint8"):
        metrics.image_embeddings(clip, images.astype(np.float32) / 255.0)


def test_clip_text_similarity_is_paired(clip):
    a = metrics.text_embeddings(clip, ["a photo of a dog", "a red car"])
    b = metrics.text_embeddings(clip, ["a red car", "a photo of a dog"])
    assert abs(float(metrics.clip_text_similarity(a, a)) - 1.0) <= 1e-5
    cross = float(metrics.cosine_matrix(a[:1], a[1:])[0, 0])
    assert abs(float(metrics.clip_text_similarity(a, b)) - cross) <= 1e-5
    with pytest.raises(ValueError, match="pairs image i with text i"):
        metrics.clip_text_similarity(a, a[:1])


def test_concept_presence_rule(clip):
    concepts = ["a photo of a dog", "a red car"]
    emb = metrics.text_embeddings(clip, concepts + ["a photo"])  # stand-ins for image embeddings
    score, present = metrics.concept_presence(clip, emb, concepts)
    assert score.shape == present.shape == (3, 2)
    cos = np.asarray(metrics.cosine_matrix(emb, emb))
    # one neutral phrase: softmax over [concept, neutral] = sigmoid(scale * (cos_c - cos_n))
    expected = 1 / (1 + np.exp(-clip.logit_scale * (cos[:, :2] - cos[:, 2:3])))
    np.testing.assert_allclose(score, expected, rtol=1e-5)
    np.testing.assert_array_equal(present, cos[:, :2] > cos[:, 2:3])
    assert present[0, 0] and present[1, 1]  # an embedding equal to the phrase's holds that concept
    assert not present[2].any()  # the neutral phrase itself holds none


# ------------------------------------------------------------------------------------------ preprocessing


def test_preprocess_matches_hand_computation(clip):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)  # wider than tall: centre columns 8..40 kept
    out = np.asarray(metrics.preprocess(img, 32, MEAN, STD))
    hand = (img[:, :, 8:40].astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out, hand, atol=1e-5)
    flat = np.full((1, 64, 64, 3), 200, np.uint8)  # resizing a constant image keeps it
    np.testing.assert_allclose(np.asarray(metrics.preprocess(flat, 32, MEAN, STD)),
                               np.broadcast_to((200 / 255 - np.array(MEAN)) / np.array(STD), (1, 32, 32, 3)), atol=1e-5)


def test_preprocess_matches_clip_image_processor(images):
    """Bicubic 40 -> 32 like transformers' CLIPImageProcessor (PIL); it rounds to uint8 after resizing."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=list(MEAN), image_std=list(STD))
    ref = proc(images=list(images), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    ours = np.asarray(metrics.preprocess(images, 32, MEAN, STD))
    err = np.abs(ours - ref) * np.array(STD)  # back in [0, 1] units
    print(f"preprocess vs CLIPImageProcessor: max {err.max() * 255:.2f}/255, mean {err.mean() * 255:.3f}/255")
    assert err.max() <= 1.5 / 255, err.max()  # measured 1.04/255: uint8 rounding + PIL's fixed-point weights
    assert err.mean() <= 0.5 / 255, err.mean()  # measured 0.30/255


# ------------------------------------------------------------------------------------------ parity with PyTorch


def _perturb(module, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # norms and biases too: a mis-mapped one cannot hide
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def pt_pair(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from jaxconcept.model.loading import word_tokenizer

    folder = str(tmp_path_factory.mktemp("pt_clip"))
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    pt = CLIPModel(CLIPConfig.from_dict(metrics.tiny_clip_config(tokenizer))).eval()
    _perturb(pt, 0)
    pt.save_pretrained(folder)  # model.safetensors
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=list(MEAN), image_std=list(STD)).save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    return metrics.load_clip(folder), pt, folder


@pytest.fixture(scope="module")
def parity_inputs(pt_pair):
    clip = pt_pair[0]
    pixels = np.random.default_rng(2).standard_normal((3, 32, 32, 3)).astype(np.float32)  # already normalised
    ids, mask = metrics.tokenize(clip, ["a photo of a dog", "a red car on the beach", "a cat"])
    return pixels, ids, mask


def _pt_features(pt, pixels, ids, mask):
    import torch

    with torch.no_grad():
        img = pt.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
        txt = pt.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                   attention_mask=torch.from_numpy(mask.astype(np.int64))).numpy()
    return (img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True))


def test_parity_with_pytorch_clip(pt_pair, parity_inputs):
    from torch_reference import rel_err

    clip, pt, _ = pt_pair
    pixels, ids, mask = parity_inputs
    ref_img, ref_txt = _pt_features(pt, pixels, ids, mask)
    ours_img = metrics.pixel_embeddings(clip, pixels)
    ours_txt = metrics.text_embeddings(clip, ["a photo of a dog", "a red car on the beach", "a cat"])
    e_img, e_txt = rel_err(ours_img, ref_img), rel_err(ours_txt, ref_txt)
    print(f"parity: image embeddings rel err {e_img:.2e}, text embeddings rel err {e_txt:.2e}")
    assert e_img <= TOL and e_txt <= TOL, (e_img, e_txt)
    # the folder's settings were read
    assert clip.image_mean == MEAN and clip.image_std == STD and clip.image_size == 32
    assert abs(clip.logit_scale - float(pt.logit_scale.detach().exp())) <= 1e-4 * clip.logit_scale


def test_flax_msgpack_folder_loads_the_same(pt_pair, parity_inputs, tmp_path):
    from transformers import FlaxCLIPModel

    clip, _, src = pt_pair
    FlaxCLIPModel(clip.module.config, _do_init=False).save_pretrained(str(tmp_path), params=clip.params)
    for name in os.listdir(src):
        if name not in ("model.safetensors", "config.json"):  # tokenizer + preprocessor files
            with open(os.path.join(src, name), "rb") as f_in, open(tmp_path / name, "wb") as f_out:
                f_out.write(f_in.read())
    again = metrics.load_clip(str(tmp_path))
    pixels = parity_inputs[0]
    np.testing.assert_allclose(
        metrics.pixel_embeddings(again, pixels), metrics.pixel_embeddings(clip, pixels), atol=1e-6
    )


def test_safetensors_folder_loads_torch_free(pt_pair, parity_inputs, tmp_path):
    """With torch unimportable, `load_clip(folder)` gives the same embeddings as in this process."""
    clip, _, folder = pt_pair
    pixels = parity_inputs[0]
    pixels_path, emb_path = str(tmp_path / "pixels.npy"), str(tmp_path / "emb.npy")
    np.save(pixels_path, pixels)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from jaxconcept import metrics\n"
        f"c = metrics.load_clip({folder!r})\n"
        f"np.save({emb_path!r}, np.asarray(metrics.pixel_embeddings(c, np.load({pixels_path!r}))))\n"
        "assert sys.modules.get('torch') is None\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(np.load(emb_path), metrics.pixel_embeddings(clip, pixels), atol=1e-6)


# ------------------------------------------------------------------------------------------ loading errors


def test_missing_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        metrics.load_clip(str(tmp_path / "nope"))


def test_folder_without_weights(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "clip", "text_config": {}, "vision_config": {}}, f)
    with pytest.raises(ModelSourceError, match="no CLIP weights"):
        metrics.load_clip(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="need torch"):
        metrics.load_clip(str(tmp_path))


def test_text_only_folder_and_empty_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        metrics.load_clip(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "clip_text_model", "hidden_size": 32}, f)
    with pytest.raises(ModelSourceError, match="full CLIP"):
        metrics.load_clip(str(tmp_path))


def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub read both at import: point its constants at the empty cache too
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelSourceError) as info:
        metrics.load_clip("openai/clip-vit-base-patch32")
    msg = str(info.value)
    assert "openai/clip-vit-base-patch32" in msg and "huggingface-cli download" in msg and "HF_HUB_OFFLINE" in msg


def test_unknown_source():
    with pytest.raises(ModelSourceError, match="neither a named model"):
        metrics.load_clip("no-such-clip")


def test_jit_compiles_once_per_shape(clip, images):
    import dataclasses

    metrics.image_embeddings(clip, images[:2])
    fn = metrics._image_embeddings
    before = fn._cache_size()
    metrics.image_embeddings(clip, images[2:])  # same shape: no new compile
    metrics.image_embeddings(dataclasses.replace(clip), images[:2])  # another bundle of the same model: shared
    assert fn._cache_size() == before
    assert jax.tree.leaves(clip.params)  # params are an argument, not baked in
