"""Pre-training the toy Stable Diffusion from scratch, with the project's own modules.

Two phases, each a jit-compiled step with donated state, resumable from Orbax checkpoints:
  1. VAE: reconstruction + a small KL on generated scenes;
  2. text encoder + UNet: the usual epsilon-prediction loss on cached latents, classifier-free-guidance
     dropout (empty caption), and an optional weak auxiliary loss that pulls the cross-attention of
     each caption's object words (colour, pattern, shape) towards their objects' masks (never applied to concept tokens).
The result is written as a diffusers-layout folder (`model/`) that `load_model` reads.
Run with `python launch/train_toy.py` (see configs/toy_pretrain.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from ..masks import aggregate
from ..model import adapter, capture, diffusion, loading as model, tokens
from ..errors import JaxconceptError
from . import scene as scenes
from . import sd

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ data


def make_dataset(num: int, size: int, seed: int, max_length: int, tokenizer, latent_hw) -> dict:
    """Scenes (held-out combinations excluded) as arrays: images, caption ids, the prompt positions of the
    objects' words, which object each word names, and the objects' masks at latent resolution (for the
    auxiliary attention loss)."""
    images, ids, positions, owners, masks = [], [], [], [], []
    for i in range(num):
        s = scenes.make_scene(seed * 1_000_003 + i, size=size, exclude=scenes.HELD_OUT)
        images.append(s.image.astype(np.float32) / 127.5 - 1.0)
        ids.append(tokens.tokenize(tokenizer, [s.caption], max_length)[0])
        pos, own, msk = object_word_targets(s, latent_hw)
        positions.append(pos)
        owners.append(own)
        masks.append(msk)
    return {"images": np.stack(images), "ids": np.stack(ids), "positions": np.stack(positions),
            "owners": np.stack(owners), "masks": np.stack(masks)}


MAX_OBJECTS = 3
WORDS_PER_OBJECT = 3  # colour, pattern (when not solid), shape


def object_word_positions(s) -> list[list[int]]:
    """Prompt positions (start token = 0) of each object's words, in the scene's object order.

    The toy tokenizer gives every vocabulary word one token, so a word's position is its index in the
    caption plus one; objects are named in order, so each is searched after the previous one.
    """
    words = s.caption.split()
    out, cursor = [], 0
    for obj in s.objects:
        seq = list(scenes.object_words(obj.color, obj.shape, obj.pattern))
        i = next(j for j in range(cursor, len(words)) if words[j:j + len(seq)] == seq)
        out.append([1 + i + j for j in range(len(seq))])
        cursor = i + len(seq)
    return out


def object_word_targets(s, latent_hw):
    """(positions W, owners W, masks K x h x w): every word naming an object (-1 padding), the index of the
    object it names, and each object's mask area-averaged to latent size."""
    n_words = MAX_OBJECTS * WORDS_PER_OBJECT
    positions = np.full((n_words,), -1, np.int32)
    owners = np.zeros((n_words,), np.int32)
    masks = np.zeros((MAX_OBJECTS,) + tuple(latent_hw), np.float32)
    w = 0
    for k, (obj, pos) in enumerate(zip(s.objects[:MAX_OBJECTS], object_word_positions(s))):
        masks[k] = downsample_mask(s.masks[obj.name], latent_hw)
        for p in pos:
            positions[w], owners[w] = p, k
            w += 1
    return positions, owners, masks


def downsample_mask(mask_HxW: np.ndarray, out_hw) -> np.ndarray:
    """Area-average a boolean mask to out_hw (fractions in [0, 1])."""
    h, w = mask_HxW.shape
    fh, fw = h // out_hw[0], w // out_hw[1]
    return mask_HxW.reshape(out_hw[0], fh, out_hw[1], fw).mean(axis=(1, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------ losses


DECODER_PARTS = ("post_quant_conv", "decoder")


def decoder_loss(vae, decoder_params, frozen_params, means_BxZxhxw, images_BxHxWx3):
    """Reconstruction MSE of the decoder alone, from the frozen encoder's posterior means (computed once, not
    per step): the latent space (and so a denoiser trained on it) stays as it is while reconstructions sharpen."""
    recon = diffusion.decode_latents(vae, {**frozen_params, **decoder_params}, means_BxZxhxw)
    rec = jnp.mean((recon - images_BxHxWx3) ** 2)
    return rec, {"recon": rec}


def vae_loss(vae, vae_params, images_BxHxWx3, key, kl_weight: float):
    images_Bx3xHxW = jnp.transpose(images_BxHxWx3, (0, 3, 1, 2))
    dist = vae.apply({"params": vae_params}, images_Bx3xHxW, method=vae.encode).latent_dist
    z = dist.sample(key)
    recon = vae.apply({"params": vae_params}, z, method=vae.decode).sample
    rec = jnp.mean((recon - images_Bx3xHxW) ** 2)
    kl = jnp.mean(dist.kl())
    return rec + kl_weight * kl, {"recon": rec, "kl": kl}


@dataclasses.dataclass(frozen=True)
class DenoiseTerms:
    """The terms of the denoiser's loss besides the eps-MSE (the `denoise` config fields of the same names)."""

    cfg_dropout: float  # share of captions replaced by the empty one (classifier-free guidance)
    aux_weight: float  # weight of the auxiliary attention loss (0: none)
    aux_max_timestep: int = 1000  # the aux loss only below this timestep
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma weights on the eps-MSE

    @classmethod
    def of(cls, d) -> "DenoiseTerms":
        """From the config's `denoise` group."""
        return cls(d.cfg_dropout, d.aux_weight, d.aux_max_timestep, d.min_snr_gamma)


def denoise_loss(bundle, params, batch, key, *, terms: DenoiseTerms, selector: capture.LayerSelector, empty_ids_T):
    """eps-MSE (+ aux attention loss on the words naming objects); params = {"text_encoder", "unet"}.

    With terms.min_snr_gamma > 0 each sample's eps-MSE is weighted by `diffusion.min_snr_weights` (the reported
    `mse` stays unweighted). The aux term is the mean squared error between each object word's max-normalised attention
    map and its object's mask, only below `terms.aux_max_timestep` (at higher noise there is nothing left to
    localise)."""
    latents, ids, positions = batch["latents"], batch["ids"], batch["positions"]
    b = latents.shape[0]
    k_t, k_n, k_d = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (b,), 0, bundle.scheduler.config.num_train_timesteps)
    noise = jax.random.normal(k_n, latents.shape, latents.dtype)
    noisy = diffusion.add_noise(bundle.scheduler_state.common.alphas_cumprod, latents, noise, t)
    dropped = jax.random.uniform(k_d, (b,)) < terms.cfg_dropout
    ids = jnp.where(dropped[:, None], empty_ids_T[None], ids)
    context = tokens.text_hidden_states(bundle.text_encoder, params["text_encoder"], ids)
    eps, maps = capture.unet_with_attention(bundle.unet, params["unet"], noisy, t, context, selector)
    mse_B = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))
    mse = jnp.mean(mse_B)
    if terms.min_snr_gamma:
        weights_B = diffusion.min_snr_weights("epsilon", bundle.scheduler_state.common.alphas_cumprod, t,
                                              terms.min_snr_gamma)
        denoise = jnp.mean(mse_B * weights_B)
    else:
        denoise = mse
    if not terms.aux_weight:
        return denoise, {"mse": mse}
    valid = (positions >= 0) & ~dropped[:, None] & (t < terms.aux_max_timestep)[:, None]  # B x W
    attn_BxWxhxw = aggregate.aggregate_maps(maps, latents.shape[2:], jnp.maximum(positions, 0), normalize="max")
    target_BxWxhxw = jnp.take_along_axis(batch["masks"], batch["owners"][:, :, None, None], axis=1)
    per = jnp.mean((attn_BxWxhxw - target_BxWxhxw) ** 2, axis=(-2, -1))
    aux = jnp.sum(per * valid) / jnp.maximum(valid.sum(), 1)
    return denoise + terms.aux_weight * aux, {"mse": mse, "aux": aux}


# ------------------------------------------------------------------------------------------ steps


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float = 1e-2):
    """Clip, then AdamW on a warmed-up cosine schedule, updating the (small) model as one flat vector: per leaf,
    AdamW over hundreds of leaves compiles for longer than the gradient (em/steps.FLAT_UPDATE_MAX_BYTES)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), lr * 0.05)
    return optax.flatten(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay)))


def ema_update(ema, params, step_i, decay: float):
    """Exponential moving average of the weights, its decay warmed up as min(decay, (1 + n) / (10 + n)) so
    that the average does not remember the random initialisation for thousands of steps."""
    d = jnp.minimum(decay, (1.0 + step_i) / (10.0 + step_i))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def make_step(loss_fn, opt, data: dict, batch_size: int, ema_decay: float = 0.0):
    """jit(state, step, base_key) -> new state, metrics; the batch is drawn on device.

    state = (params, opt_state), or (params, opt_state, ema_params) with ema_decay > 0."""

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, step_i, base_key):
        params, opt_state = state[:2]
        key = jax.random.fold_in(base_key, step_i)
        k_idx, k_loss = jax.random.split(key)
        n = next(iter(data.values())).shape[0]
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)
        batch = {k: v[idx] for k, v in data.items()}
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, k_loss)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        if ema_decay:
            return (params, opt_state, ema_update(state[2], params, step_i, ema_decay)), metrics
        return (params, opt_state), metrics

    return step


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a phase runs and when it logs, checkpoints and calls its snapshot."""

    num_steps: int
    seed: int  # of the phase's base key
    ckpt_every: int
    log_every: int
    snapshot_every: int = 0  # 0: no snapshots


def run_phase(name: str, workdir: str, step_fn, state, schedule: Schedule, metrics_file, snapshot=None) -> tuple:
    """One readable loop: resume from the latest checkpoint, step, log, checkpoint, with a progress bar;
    `snapshot(done, state)` every `schedule.snapshot_every` steps."""
    mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), f"ckpt_{name}"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = mngr.latest_step() or 0
    if start:
        state = mngr.restore(start, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)))
        log.info("%s: resumed at step %d", name, start)
    # every leaf placed on the device as the step's outputs will be (committed, fresh buffers that may be donated):
    # a state mixing host arrays, uncommitted and committed ones is another program's input, and the step would
    # compile twice (measured: the toy denoiser's step, 38 s then 47 s on 2 cores)
    state = jax.device_put(state, jax.devices()[0], may_alias=False)
    base_key = jax.random.key(schedule.seed)
    bar = tqdm(range(start, schedule.num_steps), initial=start, total=schedule.num_steps, desc=name,
               dynamic_ncols=True)
    t0 = time.time()
    for i in bar:
        state, metrics = step_fn(state, jnp.asarray(i), base_key)
        done = i + 1
        if done % schedule.log_every == 0 or done == schedule.num_steps:
            m = {k: float(v) for k, v in metrics.items()}  # host sync only at logging steps
            if not np.isfinite(m["loss"]):
                raise JaxconceptError(f"{name}: loss became {m['loss']} at step {done}; the last good checkpoint "
                                      f"is step {mngr.latest_step()} in {workdir}. Lower the learning rate.")
            bar.set_postfix({k: f"{v:.4f}" for k, v in m.items()})
            metrics_file.write(json.dumps({"phase": name, "step": done, "sec": round(time.time() - t0, 1), **m}) + "\n")
            metrics_file.flush()
        if done % schedule.ckpt_every == 0 or done == schedule.num_steps:
            mngr.save(done, args=ocp.args.StandardSave(state))
        if schedule.snapshot_every and done % schedule.snapshot_every == 0:
            snapshot(done, state)
    mngr.wait_until_finished()
    return state


# ------------------------------------------------------------------------------------------ main loop


VALIDATION_SEEDS = range(10_100_000, 10_100_020)  # never trained on; the evaluation seeds are others


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(vae, vae_params, images_BxHxWx3):
    mean_BxZxhxw, _ = diffusion.encode_images(vae, vae_params, images_BxHxWx3)
    return jnp.clip(diffusion.decode_latents(vae, vae_params, mean_BxZxhxw), -1, 1)


def reconstruct(vae, vae_params, images_BxHxWx3, batch: int = 64) -> np.ndarray:
    """Reconstructions (in [-1, 1]) from the posterior means, in batches; one compiled program per VAE
    and batch shape, so the PSNR logged during training does not recompile each time."""
    return np.concatenate([np.asarray(_reconstruct(vae, vae_params, jnp.asarray(images_BxHxWx3[i:i + batch])))
                           for i in range(0, len(images_BxHxWx3), batch)])


def psnr(recon_BxHxWx3, images_BxHxWx3) -> float:
    """PSNR in dB, peak-to-peak 2 (images in [-1, 1]), over all images."""
    return float(10 * np.log10(4.0 / np.mean((np.asarray(recon_BxHxWx3) - images_BxHxWx3) ** 2)))


def vae_psnr(vae, vae_params, images_BxHxWx3, batch: int = 64) -> float:
    """PSNR (dB) of reconstructions from the posterior means."""
    return psnr(reconstruct(vae, vae_params, images_BxHxWx3, batch), images_BxHxWx3)


def scene_images(seeds, size: int) -> np.ndarray:
    return np.stack([scenes.make_scene(s, size=size).image for s in seeds]).astype(np.float32) / 127.5 - 1.0


def train_vae(cfg, workdir: str, bundle, images, means, metrics_file):
    """Phase 1; returns the VAE params and logs held-out PSNR (validation seeds). `means`: the loaded encoder's
    posterior means of `images`, which the decoder alone trains on (used only when cfg.vae.decoder_only)."""
    vopt = make_optimizer(cfg.vae.lr, cfg.vae.steps, cfg.vae.warmup)
    vparams = bundle.params["vae"]
    if cfg.vae.decoder_only:
        frozen = {k: v for k, v in vparams.items() if k not in DECODER_PARTS}
        vloss = lambda p, batch, key: decoder_loss(bundle.vae, p, frozen, batch["means"], batch["images"])
        data = {"images": images, "means": jnp.asarray(means)}
        vparams = {k: vparams[k] for k in DECODER_PARTS}
    else:
        frozen, data = {}, {"images": images}
        vloss = lambda p, batch, key: vae_loss(bundle.vae, p, batch["images"], key, cfg.vae.kl_weight)
    vstep = make_step(vloss, vopt, data, cfg.vae.batch_size)
    held_out = scene_images(VALIDATION_SEEDS, images.shape[1])

    def log_psnr(done, state):
        psnr = vae_psnr(bundle.vae, {**frozen, **state[0]}, held_out)
        metrics_file.write(json.dumps({"phase": "vae", "step": done, "val_psnr": round(psnr, 2)}) + "\n")
        metrics_file.flush()
        log.info("VAE step %d: held-out PSNR %.2f dB", done, psnr)

    schedule = Schedule(cfg.vae.steps, cfg.seed, cfg.checkpoint_every, cfg.log_every, cfg.vae.eval_every)
    state = run_phase("vae", workdir, vstep, (vparams, vopt.init(vparams)), schedule, metrics_file, log_psnr)
    if not cfg.vae.eval_every or cfg.vae.steps % cfg.vae.eval_every:
        log_psnr(cfg.vae.steps, state)
    return {**frozen, **state[0]}


def cached_latents(bundle, vparams, images) -> tuple[np.ndarray, float]:
    """Posterior means of all images and the scale that gives them unit variance (cached once)."""
    encode = jax.jit(functools.partial(diffusion.encode_images, bundle.vae))
    means = np.concatenate([np.asarray(encode(vparams, images[i:i + 64])[0]) for i in range(0, len(images), 64)])
    return means, float(1.0 / means.std())


def write_model(bundle, dparams, folder: str) -> model.ModelBundle:
    out = bundle.replace(params={**bundle.params, **dparams}, source=folder)
    model.save_flax(out, folder)
    return out


def train_denoiser(cfg, workdir: str, bundle, data, latents, metrics_file):
    """Phase 2 (text encoder + UNet); returns the params to ship: the weight average when ema_decay > 0."""
    d = cfg.denoise
    dev_data = {"latents": jnp.asarray(latents), "ids": jnp.asarray(data["ids"]),
                "positions": jnp.asarray(data["positions"]), "owners": jnp.asarray(data["owners"]),
                "masks": jnp.asarray(data["masks"])}
    empty = jnp.asarray(tokens.tokenize(bundle.tokenizer, [""], sd.MAX_LENGTH)[0])
    selector = capture.LayerSelector(resolutions=tuple(d.aux_resolutions))
    dloss = functools.partial(denoise_loss, bundle, terms=DenoiseTerms.of(d), selector=selector, empty_ids_T=empty)
    dopt = make_optimizer(d.lr, d.steps, d.warmup)
    dstep = make_step(lambda p, batch, key: dloss(p, batch, key), dopt, dev_data, cfg.batch_size,
                      ema_decay=d.ema_decay)
    dparams = {"text_encoder": bundle.params["text_encoder"], "unet": bundle.params["unet"]}
    state = (dparams, dopt.init(dparams)) + ((jax.tree.map(jnp.copy, dparams),) if d.ema_decay else ())

    def snapshot(done, state):  # weights along the way, for the recipe's ablation table
        write_model(bundle, state[-1] if d.ema_decay else state[0], os.path.join(workdir, "snapshots", f"step_{done}"))
        if d.ema_decay:
            write_model(bundle, state[0], os.path.join(workdir, "snapshots", f"step_{done}_raw"))

    schedule = Schedule(d.steps, cfg.seed + 1, cfg.checkpoint_every, cfg.log_every, d.snapshot_every)
    state = run_phase("denoise", workdir, dstep, state, schedule, metrics_file, snapshot=snapshot)
    return state[-1] if d.ema_decay else state[0], state[0]


def start_model(cfg) -> model.ModelBundle:
    """Seeded random weights, or a warm start from `cfg.init_from` (a toy model folder or "toy")."""
    if not cfg.init_from:
        return sd.random_toy(cfg.arch, seed=cfg.seed, unet_widths=tuple(cfg.unet_widths or ()))
    start = model.load_model(cfg.init_from)
    if start.tokenizer.get_vocab() != sd.random_toy(cfg.arch).tokenizer.get_vocab():
        raise JaxconceptError(f"init_from={cfg.init_from!r} has another vocabulary than the {cfg.arch!r} toy model")
    return start


def train(cfg, workdir: str) -> model.ModelBundle:
    """Pre-train the toy model described by `cfg` (configs/toy_pretrain.py) into workdir/model."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json(indent=2))
    bundle = start_model(cfg)
    _, _, _, size = sd.architecture(cfg.arch)
    latent_hw = (size // bundle.vae_factor,) * 2
    data = make_dataset(cfg.num_scenes, size, cfg.seed, sd.MAX_LENGTH, bundle.tokenizer, latent_hw)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics_file:
        images = jnp.asarray(data.pop("images"))
        # an encoder that does not train gives the same means before and after phase 1: encoded once
        keeps_encoder = cfg.vae.decoder_only or cfg.vae.steps == 0
        loaded = cached_latents(bundle, bundle.params["vae"], images) if keeps_encoder else None
        vparams = train_vae(cfg, workdir, bundle, images, None if loaded is None else loaded[0], metrics_file)
        means, scale = loaded or cached_latents(bundle, vparams, images)
        # a warm start that keeps its encoder keeps its latent scale too (the loaded denoiser was trained with
        # it), a re-trained one gets its latents' own
        if cfg.init_from and keeps_encoder:
            scale = bundle.latent_scale
        del images
        bundle = bundle.replace(vae=adapter.vae_from_config(dict(bundle.vae.config, scaling_factor=scale)),
                                params={**bundle.params, "vae": vparams})
        shipped, raw = train_denoiser(cfg, workdir, bundle, data, means * scale, metrics_file)
    if cfg.denoise.ema_decay:
        write_model(bundle, raw, os.path.join(workdir, "model_raw"))
    trained = write_model(bundle, shipped, os.path.join(workdir, "model"))
    log.info("toy model written to %s", os.path.join(workdir, "model"))
    return trained
