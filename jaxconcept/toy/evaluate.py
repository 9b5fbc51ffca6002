"""Quality gates of a toy model, on held-out scenes:

1. masks from the cross-attention of the words naming each object (the mean over its colour, pattern and
   shape words; no CRF, no training) against the ground-truth masks: IoU per object, also reported for the
   shape word alone;
2. samples for the held-out captions, judged by the toy analysis: is each named object present with the
   right colour and shape?
Writes `gates.json` and `gates.png` (image, ground truth, attention per object word, samples).

    python -m jaxconcept.toy.evaluate --model toy --seeds 10000000-10000049 --out runs/toy_gates
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ..masks import aggregate, crf, labels as masks
from ..model import capture, sampling, tokens
from ..parallel import sharding
from ..runio import images, viz
from ..errors import JaxconceptError
from ..model.loading import ModelBundle, load_model, recommended_sampling
from ..show_attention import token_attention
from . import analysis, scene, train

# Training scenes use seeds seed * 1_000_003 + i for i < num_scenes; evaluation seeds start far away.
EVAL_SEEDS = range(10_000_000, 10_000_050)


def object_word_maps(bundle: ModelBundle, s: scene.Scene, num_timesteps: int, selector, seed: int, mesh,
                     words: str = "object"):
    """Soft maps (K x H x W at image resolution, min-max per object) of each object: the mean of the maps
    of all its words (colour, pattern, shape) with words="object", or of its shape word with words="shape"."""
    image = s.image.astype(np.float32) / 127.5 - 1.0
    result = token_attention(bundle, s.caption, image, num_timesteps, selector, seed=seed, mesh=mesh)
    maps_WxHxW = jnp.asarray(result["maps"])
    per_object = []
    for pos in train.object_word_positions(s):
        chosen = pos if words == "object" else pos[-1:]  # the shape word comes last
        per_object.append(jnp.mean(maps_WxHxW[jnp.asarray([result["positions"].index(p) for p in chosen])], 0))
    soft_KxHxW = aggregate.normalize_maps(jnp.stack(per_object), "minmax")
    return np.asarray(masks.upsample_maps(soft_KxHxW, s.image.shape[:2]))


def attention_iou(bundle: ModelBundle, scenes, background_level: float = 0.45, num_timesteps: int = 8,
                  selector=capture.ALL_LAYERS, seed: int = 0, mesh=None,
                  words: str = "object") -> tuple[list[dict], list[np.ndarray]]:
    """One record per object: IoU of its attention mask (argmax against a background level) with the
    truth; and each scene's soft maps (K x H x W)."""
    mesh = mesh or sharding.make_mesh()
    records, soft_maps = [], []
    for s in scenes:
        soft_KxHxW = object_word_maps(bundle, s, num_timesteps, selector, seed, mesh, words)
        soft_maps.append(soft_KxHxW)
        labels = np.asarray(masks.labels_from_maps(jnp.asarray(soft_KxHxW), background_level))
        predicted = masks.masks_from_labels(labels, len(s.objects))
        refined, _ = crf.refine_labels(s.image, labels, len(s.objects) + 1, soft_KxHxW=np.clip(soft_KxHxW, 0, 1))
        with_crf = masks.masks_from_labels(refined, len(s.objects))
        for k, obj in enumerate(s.objects):
            truth = s.masks[obj.name]
            records.append({"seed": s.seed, "object": obj.name, "iou": masks.iou(predicted[k], truth),
                            "iou_cleaned": masks.iou(masks.clean_mask(predicted[k]), truth),
                            "iou_crf": masks.iou(with_crf[k], truth)})
    return records, soft_maps


def sample_fidelity(bundle: ModelBundle, scenes, num_steps: int = 25, guidance: float = 5.0,
                    seed: int = 0, scheduler: str = "ddim") -> tuple[list[dict], np.ndarray]:
    """One record per scene (objects found with the right colour and shape), and the samples (N x H x W x 3)."""
    sample = sampling.make_sampler(bundle, scheduler=scheduler, num_steps=num_steps, guidance=guidance)
    captions = [s.caption for s in scenes]
    ids = tokens.tokenize(bundle.tokenizer, captions + [""], bundle.max_length)
    ctx = tokens.text_hidden_states(bundle.text_encoder, bundle.params["text_encoder"], jnp.asarray(ids))
    cond, uncond = ctx[:-1], jnp.broadcast_to(ctx[-1:], ctx[:-1].shape)
    latent = bundle.resolution // bundle.vae_factor
    noise = jax.random.normal(jax.random.key(seed), (len(scenes), bundle.unet.config.in_channels, latent, latent))
    pictures = images.to_uint8(np.asarray(sample(bundle.params, noise, cond, uncond)))
    records = []
    for s, picture in zip(scenes, pictures):
        match = analysis.match_caption(picture, s.objects)
        records.append({"seed": s.seed, "caption": s.caption, "fraction": match["fraction"],
                        "pattern_fraction": match["pattern_fraction"]})
    return records, pictures


def reconstructions(bundle: ModelBundle, scenes) -> tuple[float, np.ndarray]:
    """(PSNR in dB over the scenes, VAE reconstructions N x H x W x 3 uint8) from the posterior means."""
    x = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    recon = train.reconstruct(bundle.vae, bundle.params["vae"], x)  # encoded and decoded once, for both
    return train.psnr(recon, x), images.to_uint8(recon)


def gates_figure(scenes, soft_maps, pictures, recons, rows: int = 6) -> np.ndarray:
    tiles, labels = [], []
    for s, soft, picture, recon in list(zip(scenes, soft_maps, pictures, recons))[:rows]:
        truth = [np.stack([s.masks[o.name] * 255] * 3, -1).astype(np.uint8) for o in s.objects]
        tiles.append([s.image, recon, picture] + truth + [viz.overlay(s.image, m) for m in soft])
        names = [o.shape for o in s.objects]
        labels.append(["scene", "VAE recon", "sample"] + [f"true {n}" for n in names] + [f"attn {n}" for n in names])
    return viz.grid(tiles, labels, cell=96)


def parse_seeds(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise JaxconceptError(f"--seeds takes 'A-B' or 'a,b,c', got {text!r}") from e


def run_gates(bundle: ModelBundle, scenes, args) -> tuple[dict, dict, np.ndarray | None]:
    """(summary, per-object and per-sample details, gate picture or None) of the gates `args` asks for."""
    details, summary = {}, {"model": bundle.source, "scenes": len(scenes)}
    if not args.samples_only:
        ious, soft = attention_iou(bundle, scenes, args.background_level, args.timesteps)
        shape_ious, _ = attention_iou(bundle, scenes, args.background_level, args.timesteps, words="shape")
        details.update(attention=ious, attention_shape_word=shape_ious)
        summary.update({
            "objects": len(ious), "attention_iou": float(np.mean([r["iou"] for r in ious])),
            "attention_iou_cleaned": float(np.mean([r["iou_cleaned"] for r in ious])),
            "attention_iou_crf": float(np.mean([r["iou_crf"] for r in ious])),
            "attention_iou_shape_word": float(np.mean([r["iou"] for r in shape_ious]))})
    fidelity, pictures = [], []
    for k in range(args.samples_per_scene):  # another noise seed per round
        records, batch = sample_fidelity(bundle, scenes, args.steps, args.guidance, seed=k, scheduler=args.scheduler)
        fidelity += records
        pictures.append(batch)
    details["samples"] = fidelity
    summary.update({
        "samples_objects_found": float(np.mean([r["fraction"] for r in fidelity])),
        "samples_objects_found_se": float(np.std([r["fraction"] for r in fidelity]) / np.sqrt(len(fidelity))),
        "samples_patterns_found": float(np.mean([r["pattern_fraction"] for r in fidelity])),
        "sampling": f"{args.scheduler}, {args.steps} steps, guidance {args.guidance}"})
    if args.samples_only:
        return summary, details, None
    psnr, recons = reconstructions(bundle, scenes)
    summary["vae_psnr_db"] = psnr
    return summary, details, gates_figure(scenes, soft, pictures[0], recons)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.toy.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--seeds", default=f"{EVAL_SEEDS.start}-{EVAL_SEEDS.stop - 1}")
    p.add_argument("--timesteps", type=int, default=8)
    p.add_argument("--background-level", type=float, default=0.55)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommendation)")
    p.add_argument("--guidance", type=float, default=None, help="(default: the model's recommendation)")
    p.add_argument("--scheduler", default=None, choices=("ddim", "pndm", "dpm++"),
                   help="(default: the model's recommendation)")
    p.add_argument("--samples-per-scene", type=int, default=1, help="samples per caption, each from other noise")
    p.add_argument("--samples-only", action="store_true", help="only the sample gate (for sampling sweeps)")
    p.add_argument("--out", default="runs/toy_gates")
    args = p.parse_args(argv)
    try:
        bundle = load_model(args.model)
        pick = {"scheduler": "ddim", "steps": 25, "guidance": 5.0, **recommended_sampling(args.model)}
        args.scheduler, args.steps, args.guidance = (pick[k] if getattr(args, k) is None else getattr(args, k)
                                                     for k in ("scheduler", "steps", "guidance"))
        scenes = [scene.make_scene(s, size=bundle.resolution) for s in parse_seeds(args.seeds)]
        os.makedirs(args.out, exist_ok=True)
        summary, details, figure = run_gates(bundle, scenes, args)
    except (JaxconceptError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "gates.json"), "w") as f:
        json.dump({"summary": summary, **details}, f, indent=1)
    if figure is not None:
        images.save_image(figure, os.path.join(args.out, "gates.png"))
    # results go to stdout: other libraries (absl via Orbax) may own the logging set-up
    for k, v in summary.items():
        print(f"{k:<26} {v:.3f}" if isinstance(v, float) else f"{k:<26} {v}")
    print(f"details: {os.path.join(args.out, 'gates.json')}" + (
        f"\npicture: {os.path.join(args.out, 'gates.png')}" if figure is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
