"""The shipped toy model: loadable by our loader and by diffusers' own Flax pipeline (torch blocked), with the
real component classes and cross-attention at two resolutions."""

import json
import os
import subprocess
import sys

import numpy as np

from jaxconcept import load_model
from jaxconcept.model import capture
from jaxconcept.toy import sd

# diffusers' FlaxStableDiffusionPipeline, with torch made unimportable, samples from the shipped folder; it
# must give the same image as our sampler with the same noise, DDIM schedule and guidance.
PIPELINE_CODE = r"""
import json, sys
sys.modules["torch"] = None
import jax, jax.numpy as jnp, numpy as np
from diffusers import FlaxStableDiffusionPipeline
pipe, params = FlaxStableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, feature_extractor=None)
ids = pipe.prepare_inputs(["a red circle on a gray background"])
noise = jax.random.normal(jax.random.key(0), (1, 4, 16, 16))
out = pipe(ids, params, jax.random.key(0), num_inference_steps=5, guidance_scale=5.0, height=64, width=64,
           latents=noise, jit=False)
assert "torch" not in sys.modules or sys.modules["torch"] is None
print("RESULT " + json.dumps({"scheduler": type(pipe.scheduler).__name__,
                              "image": np.asarray(out.images).reshape(64, 64, 3).tolist()}))
"""


def test_shipped_folder_has_a_pipeline_index_and_stays_small():
    index = json.load(open(os.path.join(sd.WEIGHTS, "model_index.json")))
    assert index["_class_name"] == "FlaxStableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "FlaxUNet2DConditionModel"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sd.WEIGHTS) for f in fs)
    assert size <= 25 * 2 ** 20, size


def test_shipped_model_keeps_real_classes_and_two_attention_resolutions():
    import jax.numpy as jnp

    bundle = load_model("toy")
    assert type(bundle.unet).__name__ == "FlaxUNet2DConditionModel"
    assert type(bundle.vae).__name__ == "FlaxAutoencoderKL"
    assert type(bundle.text_encoder).__name__.startswith("FlaxCLIPText")
    assert bundle.vae.config.latent_channels == 4
    latents = jnp.zeros((1, 4, 16, 16))
    context = jnp.zeros((1, bundle.max_length, bundle.unet.config.cross_attention_dim))
    grids = {hw for hw, _ in capture.layer_names(bundle.unet, bundle.params["unet"], latents, context).values()}
    assert {(16, 16), (8, 8)} <= grids, grids  # and the mid block at 4x4


def test_diffusers_flax_pipeline_samples_like_our_sampler():
    from jaxconcept.model import sampling, tokens
    from jaxconcept.runio import images
    import jax
    import jax.numpy as jnp

    proc = subprocess.run([sys.executable, "-c", PIPELINE_CODE, sd.WEIGHTS], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert result["scheduler"] == "FlaxDDIMScheduler"
    theirs = np.asarray(result["image"], np.float32)  # [0, 1]
    bundle = load_model("toy")
    ids = tokens.tokenize(bundle.tokenizer, ["a red circle on a gray background", ""], bundle.max_length)
    ctx = tokens.text_hidden_states(bundle.text_encoder, bundle.params["text_encoder"], jnp.asarray(ids))
    noise = jax.random.normal(jax.random.key(0), (1, 4, 16, 16))
    ours = sampling.make_sampler(bundle, "ddim", num_steps=5, guidance=5.0)(bundle.params, noise, ctx[:1], ctx[1:])
    ours = (np.asarray(ours)[0] + 1) / 2
    assert np.abs(ours - theirs).max() < 2 / 255, np.abs(ours - theirs).max()
    assert images.to_uint8(np.asarray(ours) * 2 - 1).std() > 5  # not a blank image
