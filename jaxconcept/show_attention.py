"""Show which image regions each word of a prompt attends to (captured cross-attention, DAAM-style).

    python -m jaxconcept.show_attention --model tiny --prompt "a photo of a dog on the beach" --out runs/attention
    python -m jaxconcept.show_attention --model stabilityai/stable-diffusion-2-1-base \
        --image dog.jpg --prompt "a photo of a dog on the beach" --resolutions 16,32

The image (or, without one, pure noise) is encoded, noised at several random timesteps, and run through
the UNet once per timestep as one batch split over all devices; each word's map is the aggregate over
heads, layers, resolutions and timesteps. Writes `attention.png` and `attention.npz` into --out.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .masks import aggregate
from .model import capture, conditioning, diffusion, tokens
from .parallel import sharding
from .runio import images, viz
from .errors import JaxconceptError
from .model.loading import ModelBundle, load_model


def prompt_words(bundle: ModelBundle, ids_T: np.ndarray) -> tuple[list[int], list[str]]:
    """Positions and readable pieces of the prompt's tokens (start/end/padding left out)."""
    tok = bundle.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    positions = [i for i, t in enumerate(ids_T) if int(t) not in special]
    words = [tok.convert_ids_to_tokens(int(ids_T[i])).replace("</w>", "") for i in positions]
    return positions, words


def token_attention(
    bundle: ModelBundle, prompt: str, image_HxWx3: np.ndarray | None = None, num_timesteps: int = 8,
    selector: capture.LayerSelector = capture.ALL_LAYERS, seed: int = 0, mesh=None,
) -> dict:
    """Per-word attention maps {"words", "positions", "maps" (K x h x w, min-max per word), "timesteps"}."""
    mesh = mesh or sharding.make_mesh()
    n_dev = mesh.size
    batch = -(-max(num_timesteps, 1) // n_dev) * n_dev  # whole batches per device
    k_t, k_noise, k_lat = jax.random.split(jax.random.key(seed), 3)
    res = bundle.resolution
    latent_hw = (res // bundle.vae_factor, res // bundle.vae_factor)
    channels = bundle.unet.config.in_channels
    if image_HxWx3 is not None:
        mean, _ = jax.jit(diffusion.encode_images, static_argnums=0)(bundle.vae, bundle.params["vae"], jnp.asarray(image_HxWx3)[None])
        latents0 = mean * bundle.latent_scale
        latent_hw = tuple(latents0.shape[2:])
    else:
        latents0 = jax.random.normal(k_lat, (1, channels) + latent_hw)
    num_train = int(bundle.scheduler.config.num_train_timesteps)
    timesteps = jax.random.randint(k_t, (batch,), 0, num_train)
    noise = jax.random.normal(k_noise, (batch,) + latents0.shape[1:])
    latents = diffusion.add_noise(bundle.scheduler_state.common.alphas_cumprod,
                                  jnp.broadcast_to(latents0, noise.shape), noise, timesteps)
    ids = tokens.tokenize(bundle.tokenizer, [prompt], bundle.max_length)
    image_hw = tuple(d * bundle.vae_factor for d in latent_hw)
    text, time_ids = conditioning.text_model(bundle), conditioning.image_time_ids(bundle, image_hw)
    # one compiled program: run op by op, SDXL's two encoders take seconds longer
    cond = jax.jit(lambda p, i: conditioning.encode(text, p, i, time_ids_K=time_ids))(
        conditioning.text_params(bundle.params), jnp.asarray(ids))
    run = sharding.jit_attention_capture(bundle.unet, mesh, selector)
    _, maps = run(bundle.params["unet"], latents, timesteps.astype(jnp.int32), conditioning.broadcast(cond, batch))
    positions, words = prompt_words(bundle, ids[0])
    if not maps:
        raise JaxconceptError("the layer selection captured no cross-attention layer; widen --resolutions")
    per_t = aggregate.aggregate_maps(maps, latent_hw, positions, normalize=None)  # B x K x h x w
    # min-max per word: raw probabilities differ little in level, the layout is what a reader wants to see
    avg = aggregate.normalize_maps(per_t.mean(axis=0, keepdims=True), "minmax")[0]
    return {"words": words, "positions": positions, "maps": np.asarray(avg), "timesteps": np.asarray(timesteps),
            "layers": sorted(maps)}


def attention_figure(result: dict, image_uint8: np.ndarray | None) -> np.ndarray:
    heat = [m for m in result["maps"]]
    if image_uint8 is None:
        return viz.grid([heat], [result["words"]])
    overlays = [viz.overlay(image_uint8, m) for m in heat]
    return viz.grid([[image_uint8] + overlays, [image_uint8] + heat], [["image"] + result["words"], ["image"] + result["words"]])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.show_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="named model ('tiny'), a diffusers folder, or a hub id")
    p.add_argument("--prompt", default="a photo of a dog on the beach")
    p.add_argument("--image", default=None, help="image to attend over (default: pure noise)")
    p.add_argument("--timesteps", type=int, default=8, help="random timesteps to average over")
    p.add_argument("--resolutions", default=None, help="layer grid heights to use, e.g. 16,32 (default: all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/attention")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        resolutions = tuple(int(r) for r in args.resolutions.split(",")) if args.resolutions else None
    except ValueError:
        print(f"error: --resolutions takes comma-separated integers, got {args.resolutions!r}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise JaxconceptError(f"output folder {args.out!r} is not writable")
        bundle = load_model(args.model, args.dtype, seed=args.seed)
        image = images.load_image(args.image, bundle.resolution) if args.image else None
        result = token_attention(bundle, args.prompt, image, args.timesteps,
                                 capture.LayerSelector(resolutions=resolutions), seed=args.seed)
    except (JaxconceptError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    picture = attention_figure(result, images.to_uint8(image) if image is not None else None)
    png, npz = os.path.join(args.out, "attention.png"), os.path.join(args.out, "attention.npz")
    images.save_image(picture, png)
    np.savez(npz, maps=result["maps"], words=np.array(result["words"]), timesteps=result["timesteps"])
    print(f"model {bundle.source}, {len(result['layers'])} cross-attention layers, "
          f"{len(result['timesteps'])} timesteps on {jax.device_count()} device(s)")
    print(f"per-word attention maps: {png}\narrays: {npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
