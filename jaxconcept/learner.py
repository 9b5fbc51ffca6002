"""The EM concept learner (DESIGN §1): the orchestration loop around the pure steps.

    stage 1  tokens from init words (or a short unmasked inversion); masks from cross-attention + CRF
    stage 2  rounds of token optimisation (L_mask + lambda L_attn, one compiled step), each followed on the
             host by mask re-estimation (mode "em"); masks kept (modes "attention", "user")
    stage 3  joint tuning of tokens and UNet with the masks fixed

Side effects live here: files, the host CRF, Orbax checkpoints (one per round and per stage end, so a
run started again on the same folder resumes where it stopped and ends exactly as an uninterrupted
one), progress and metrics. The host reads device values only at round boundaries and logging steps.
Usable from a notebook: `learn(get_config(), specs, "runs/x")`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from . import adapter, capture, crf, data, distributed, images, inputs, masks, outputs, settle, sharding, steps, tokens
from .errors import JaxconceptError
from .model import ModelBundle, load_model

log = logging.getLogger(__name__)

MODES = ("em", "attention", "user")


class TrainingError(JaxconceptError):
    """Training cannot go on (e.g. the loss became NaN); what was saved is kept."""


# ------------------------------------------------------------------------------------------ set-up


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything fixed for the run: model with the concept tokens, inputs, and device-resident data."""

    bundle: ModelBundle
    concepts: tokens.Concepts
    inputs: inputs.Inputs
    images_u8: np.ndarray  # N x H x W x 3
    run_data: dict  # device arrays read by the step: prompt table, latents (+ prior)
    image_ids_NxL: np.ndarray
    image_positions_NxC: np.ndarray
    latent_hw: tuple[int, int]


def prepare(cfg, specs, bundle: ModelBundle | None = None) -> Setup:
    """Load the model and inputs, add the concept tokens, cache latents and the prompt table."""
    if cfg.mode not in MODES:
        raise JaxconceptError(f"unknown mode {cfg.mode!r}: use one of {', '.join(MODES)}.")
    joint = cfg.get("joint") or {}
    if joint.get("optimizer", "adamw") not in steps.OPTIMIZERS:
        raise JaxconceptError(f"unknown joint.optimizer {joint.get('optimizer')!r}: use one of "
                              f"{', '.join(steps.OPTIMIZERS)}.")
    if joint.get("remat", "none") not in ("none", *steps.REMAT_POLICIES):
        raise JaxconceptError(f"unknown joint.remat {joint.get('remat')!r}: use none, "
                              f"{', '.join(steps.REMAT_POLICIES)}.")
    specs = inputs.validate(specs)
    for spec in specs:  # before a possibly long model download
        for path in [spec.path] + [c.mask for c in spec.concepts if c.mask]:
            if not os.path.isfile(path):
                raise inputs.InputError(f"{'mask' if path != spec.path else 'image'} {path!r} does not exist")
    bundle = bundle or load_model(cfg.model, cfg.dtype, seed=cfg.seed)
    size = cfg.get("resolution", 0) or bundle.resolution
    multiple = bundle.vae_factor * 2 ** (len(bundle.unet.config.block_out_channels) - 1)
    if size % multiple:
        raise JaxconceptError(f"resolution {size} must be a multiple of {multiple} for this model (VAE and UNet "
                              f"downsampling); the model's own is {bundle.resolution}.")
    crf_where(cfg, (size, size), (size // bundle.vae_factor,) * 2)  # a bad CRF setting fails before any work
    loaded = inputs.load(specs, size)
    if cfg.mode == "user" and not loaded.has_all_user_masks:
        missing = [c.token for c, m in zip(loaded.concepts, loaded.user_masks) if m is None]
        raise JaxconceptError(f"mode 'user' needs a mask file for every concept; none for {', '.join(missing)}. "
                              "Give them (TOKEN@mask.png), or use mode 'em'.")
    toks = [c.token for c in loaded.concepts]
    bundle, concepts = tokens.add_concept_tokens(bundle, toks, [c.init_word for c in loaded.concepts],
                                                 seed=cfg.seed)
    owner_C = np.asarray(loaded.owner_C)
    joiner = cfg.get("joiner", data.JOINER)
    table = data.prompt_table(bundle.tokenizer, toks, owner_C, concepts.ids, bundle.max_length, cfg.template,
                              joiner)
    ids_NxL, pos_NxC = data.image_prompts(bundle.tokenizer, toks, owner_C, concepts.ids, bundle.max_length,
                                          cfg.template, joiner)
    latents = data.encode_with_flips(bundle.vae, bundle.params["vae"], loaded.images_NxHxWx3, bundle.latent_scale)
    run_data = {"table": data.table_arrays(table), "latents": jnp.asarray(latents)}
    if cfg.prior.folder:
        run_data.update(prior_data(cfg, bundle))
    return Setup(bundle, concepts, loaded, images.to_uint8(loaded.images_NxHxWx3), run_data, ids_NxL, pos_NxC,
                 tuple(latents.shape[-2:]))


def prior_data(cfg, bundle: ModelBundle) -> dict:
    """Latents of the class images (prior preservation) and their prompt's ids."""
    folder = cfg.prior.folder
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(exts)) if os.path.isdir(folder) else []
    if not files:
        raise JaxconceptError(f"prior-preservation folder {folder!r} has no images ({', '.join(exts)}); "
                              "fill it or set --config.prior.folder=''.")
    pics = np.stack([images.load_image(os.path.join(folder, f), bundle.resolution) for f in files])
    lat = data.encode_with_flips(bundle.vae, bundle.params["vae"], pics, bundle.latent_scale)
    ids = tokens.tokenize(bundle.tokenizer, [cfg.prior.prompt], bundle.max_length)[0]
    context = tokens.text_hidden_states(bundle.text_encoder, bundle.params["text_encoder"], jnp.asarray(ids[None]))
    return {"prior_latents": jnp.asarray(lat.reshape((-1,) + lat.shape[2:])), "prior_ids": jnp.asarray(ids),
            "prior_context": context[0]}


# ------------------------------------------------------------------------------------------ E-step (host)


def assign_masks(soft_KxHxW, image_u8, kinds, background_level: float, use_crf: bool, crf_min_iou: float = 0.5,
                 crf_backend: str = "host", crf_size=None, previous_KxHxW=None, mask_prior: float = 0.0,
                 hysteresis: bool = False, ties=()):
    """Masks of one image's concepts from their soft maps (image resolution).

    Objects: argmax against a constant background level (non-overlapping); a "background" concept gets
    what no object claims. Then (optionally) a multi-label DenseCRF, hole filling and speck removal, and
    a fallback for an empty mask (its map's top 5%, minus other objects' pixels). The CRF runs on the host
    (pydensecrf) or on the device (`crf_backend`), at image resolution or at `crf_size` (h, w).
    EM (`settle`): maps damped towards `previous_KxHxW` (the last round's masks) by `mask_prior`, the CRF's
    rejection with hysteresis against them; without previous masks, tied groups (`ties`, indices into
    the K concepts) split their shared region in reading order.
    Returns (masks K x H x W, masks without CRF, info {"crf_seconds", "fallbacks", "crf_rejected"}).
    """
    soft_KxHxW = settle.damp_maps(soft_KxHxW, previous_KxHxW, mask_prior)
    if previous_KxHxW is None and ties:
        soft_KxHxW = masks.split_tied_maps(soft_KxHxW, ties, background_level)
    objects = [k for k, kind in enumerate(kinds) if kind == "object"]
    h, w = soft_KxHxW.shape[1:]
    labels = (np.asarray(masks.labels_from_maps(jnp.asarray(soft_KxHxW[objects]), background_level))
              if objects else np.zeros((h, w), np.int32))
    info = {"crf_seconds": 0.0, "fallbacks": [], "crf_rejected": []}
    raw = _masks_from_object_labels(labels, soft_KxHxW, objects, kinds, info, record=False)
    if not use_crf or not objects:
        return raw, raw, info
    reference = (settle.labels_of_masks(np.asarray(previous_KxHxW)[objects])
                 if hysteresis and previous_KxHxW is not None else None)
    refined, crf_info = crf.refine_labels(image_u8, labels, len(objects) + 1, crf.CRFParams(min_iou=crf_min_iou),
                                          soft_KxHxW=soft_KxHxW[objects], backend=crf_backend, size=crf_size,
                                          reference_HxW=reference)
    info["crf_seconds"] = crf_info["seconds"]
    info["crf_rejected"] = [objects[k] for k, r in enumerate(crf_info["rejected"]) if r]
    return _masks_from_object_labels(refined, soft_KxHxW, objects, kinds, info, record=True), raw, info


def _masks_from_object_labels(labels_HxW, soft_KxHxW, objects, kinds, info, record: bool):
    k_all = len(kinds)
    out = np.zeros((k_all,) + labels_HxW.shape, bool)
    for j, k in enumerate(objects):
        own = labels_HxW == j + 1
        others = (labels_HxW > 0) & ~own
        mask = masks.clean_mask(own) & ~others  # filled holes must not swallow another object
        mask, used = masks.nonempty_or_fallback(mask, np.where(others, 0.0, soft_KxHxW[k]))
        if used and record:
            info["fallbacks"].append(k)
        out[k] = mask
    claimed = out[objects].any(axis=0) if objects else np.zeros(labels_HxW.shape, bool)
    for k, kind in enumerate(kinds):
        if kind == "background":
            out[k] = ~claimed
            if not out[k].any():
                out[k], used = masks.nonempty_or_fallback(out[k], 1.0 - soft_KxHxW[objects].max(0))
                if used and record:
                    info["fallbacks"].append(k)
    return out


def crf_where(cfg, image_hw, latent_hw) -> tuple[str, tuple[int, int] | None]:
    """(backend, size) of the E-step's CRF from `masks.crf_backend` and `masks.crf_size` (checked)."""
    backend = cfg.masks.get("crf_backend", "host")
    size = cfg.masks.get("crf_size", "image")
    if backend not in crf.BACKENDS:
        raise JaxconceptError(f"masks.crf_backend must be 'host' or 'device', got {backend!r}.")
    if size == "image":
        return backend, None
    if size == "latent":
        return backend, tuple(int(v) for v in latent_hw)
    if isinstance(size, str) and size.strip().isdigit():  # "--config.masks.crf_size=64" (the field is a string)
        size = int(size)
    if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= max(image_hw):
        scale = size / max(image_hw)
        return backend, (max(1, round(image_hw[0] * scale)), max(1, round(image_hw[1] * scale)))
    raise JaxconceptError(f"masks.crf_size must be 'image', 'latent' or a number of pixels per side up to the "
                          f"image size {max(image_hw)}, got {size!r}.")


def estimate_masks(setup: Setup, maps_fn, rows, frozen, key, cfg, previous=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """E-step over all images: (masks C x H x W, masks without CRF, info); `previous` (the last round's
    masks, C x H x W) damps the update (`settle`)."""
    # the split is for identical starts (one init word); random rows differ, and their maps say who is where
    ties = [g for g in tied_concepts(setup) if setup.concepts.init_words[g[0]]]
    owner_C = np.asarray(setup.inputs.owner_C)
    kinds = np.asarray(setup.inputs.kinds)
    size = setup.images_u8.shape[1:3]
    out = np.zeros((len(owner_C),) + size, bool)
    raw_out = np.zeros_like(out)
    info = {"crf_seconds": 0.0, "fallbacks": [], "crf_rejected": [], "attention_seconds": 0.0}
    crf_backend, crf_size = crf_where(cfg, size, setup.latent_hw)
    for i in range(len(setup.images_u8)):
        t0 = time.time()
        soft_Cxhxw = maps_fn(rows, frozen, setup.run_data["latents"][i, 0], jnp.asarray(setup.image_ids_NxL[i]),
                             jnp.asarray(setup.image_positions_NxC[i]), jax.random.fold_in(key, i))
        mine = np.flatnonzero(owner_C == i)
        soft = np.asarray(masks.upsample_maps(soft_Cxhxw[mine], size))
        info["attention_seconds"] += time.time() - t0
        local = [tuple(int(np.flatnonzero(mine == c)[0]) for c in g) for g in ties if owner_C[g[0]] == i]
        got, raw, inf = assign_masks(soft, setup.images_u8[i], list(kinds[mine]), cfg.masks.background_level,
                                     cfg.masks.crf, cfg.masks.crf_min_iou, crf_backend, crf_size,
                                     None if previous is None else np.asarray(previous)[mine],
                                     cfg.masks.get("mask_prior", 0.0), cfg.masks.get("crf_hysteresis", False), local)
        out[mine], raw_out[mine] = got, raw
        info["crf_seconds"] += inf["crf_seconds"]
        info["fallbacks"] += [setup.concepts.tokens[mine[k]] for k in inf["fallbacks"]]
        info["crf_rejected"] += [setup.concepts.tokens[mine[k]] for k in inf["crf_rejected"]]
    for token in info["fallbacks"]:
        log.warning("mask of %s came out empty: using the top 5%% of its attention map instead", token)
    return out, raw_out, info


def latent_masks(masks_CxHxW: np.ndarray, latent_hw, mesh) -> jnp.ndarray:
    """Nearest downsampling to latent size (float32, what the step reads), replicated on the mesh."""
    return sharding.put_replicated(data.nearest_resize(jnp.asarray(masks_CxHxW, jnp.float32), latent_hw), mesh)


def mean_iou(a_CxHxW, b_CxHxW) -> list[float]:
    return [masks.iou(a, b) for a, b in zip(a_CxHxW, b_CxHxW)]


def tied_concepts(setup: Setup) -> tuple[tuple[int, ...], ...]:
    """Object concepts of one image with the same init word (`settle.tied_groups`)."""
    return settle.tied_groups(setup.inputs.owner_C, setup.concepts.init_words, setup.inputs.kinds)


MATCHING_NOTE = "tied concepts (same init word in one image) matched to the truth by the best assignment"


def round_metrics(r: int, masks_now, raw, prev, info: dict, tokens, truth, tied=()) -> dict:
    """The metrics.jsonl entry of one round: timings, fallbacks, mask change (mean and per concept), and
    IoU against `truth` (with and without CRF) when there is one, `tied` groups matched (`masks.matched_ious`)."""
    entry = {"round": r, "crf_seconds": round(info.get("crf_seconds", 0.0), 4),
             "attention_seconds": round(info.get("attention_seconds", 0.0), 4),
             "fallbacks": info.get("fallbacks", []), "crf_rejected": info.get("crf_rejected", [])}
    if prev is not None:
        change = settle.mask_change(prev, masks_now)
        entry["mask_change"] = float(np.mean(change))
        entry["mask_change_by_concept"] = dict(zip(tokens, change))
    if truth is not None:
        entry["iou"] = dict(zip(tokens, masks.matched_ious(masks_now, truth, tied)))
        entry["iou_no_crf"] = dict(zip(tokens, masks.matched_ious(raw, truth, tied)))
        if tied:
            entry["iou_matching"] = MATCHING_NOTE
        entry["mean_iou"] = float(np.mean(list(entry["iou"].values())))
        entry["mean_iou_no_crf"] = float(np.mean(list(entry["iou_no_crf"].values())))
    return entry


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_manager(run_dir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=None))


def save_checkpoint(mngr, index: int, meta: dict, state, masks_CxHxW) -> None:
    mngr.save(index, args=ocp.args.Composite(
        meta=ocp.args.JsonSave(meta), state=ocp.args.StandardSave(state),
        masks=ocp.args.StandardSave({"masks": np.asarray(masks_CxHxW, np.uint8)})))
    mngr.wait_until_finished()


def restore_checkpoint(mngr, index: int, state_like, masks_like):
    meta = mngr.restore(index, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    got = mngr.restore(index, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), state=ocp.args.StandardRestore(abstract),
        masks=ocp.args.StandardRestore({"masks": np.zeros(masks_like.shape, np.uint8)})))
    return meta, got.state, np.asarray(got.masks["masks"], bool)


def latest_meta(mngr) -> dict | None:
    step = mngr.latest_step()
    if step is None:
        return None
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta, index=step)


# ------------------------------------------------------------------------------------------ the loop


def _check_finite(metrics: dict, where: str, mngr) -> dict:
    m = {k: float(v) for k, v in metrics.items()}
    if not all(np.isfinite(v) for v in m.values()):
        last = mngr.latest_step()
        raise TrainingError(f"the loss became {m.get('loss')} during {where}. Stopped; the last good checkpoint "
                            f"({'none' if last is None else f'index {last}'}) is kept. Lower the learning rate "
                            "and start again on the same --out to resume from it.")
    return m


def start_run_folder(run_dir: str, cfg, setup: Setup):
    """Write the run's config.json and input images and open its metrics.jsonl for appending (process 0
    only: other processes get None)."""
    if not distributed.is_primary():
        return None
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    with open(cfg_path + ".tmp", "w") as f:
        f.write(cfg.to_json(indent=2))
    os.replace(cfg_path + ".tmp", cfg_path)
    for i, name in enumerate(setup.inputs.names):
        images.save_image(setup.images_u8[i], os.path.join(run_dir, "images", f"{name}.png"))
    return open(os.path.join(run_dir, "metrics.jsonl"), "a")


def truth_masks(setup: Setup, ground_truth=None) -> np.ndarray | None:
    """What the masks are measured against: the given ground truth, else the user's masks when every
    concept has one, else None."""
    if ground_truth is not None:
        return np.asarray(ground_truth, bool)
    return np.stack(setup.inputs.user_masks) if setup.inputs.has_all_user_masks else None


def learn(cfg, specs, run_dir: str, *, bundle: ModelBundle | None = None, mesh=None,
          on_checkpoint: Callable[[dict], None] | None = None, ground_truth=None, progress: bool = True) -> dict:
    """Run every stage into `run_dir` (resuming from its checkpoints) and return the summary.

    ground_truth: optional C x H x W masks, only *measured* against (benchmarks); never used for training.
    on_checkpoint(meta): called after each checkpoint (notebooks; tests interrupt a run with it).
    """
    outputs.check_writable(run_dir)
    t_start = time.time()
    setup = prepare(cfg, specs, bundle)
    b = setup.bundle
    mcfg = cfg.get("mesh") or {}
    mesh = mesh or sharding.make_mesh(fsdp=mcfg.get("fsdp", 1))
    min_size = mcfg.get("fsdp_min_size", 2 ** 14)
    primary = distributed.is_primary()  # multi-host: process 0 writes the files, all write checkpoints
    metrics_file = start_run_folder(run_dir, cfg, setup)
    names = setup.inputs.names
    token_names = outputs.file_names(setup.concepts.tokens)
    owner_C = np.asarray(setup.inputs.owner_C)
    truth = truth_masks(setup, ground_truth)
    tied = tied_concepts(setup)
    warning = settle.tie_warning(tied, setup.concepts.tokens, setup.concepts.init_words)
    if warning and primary:
        log.warning(warning)

    def record(entry: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    place = lambda tree: sharding.put_replicated(tree, mesh)  # noqa: E731
    frozen = {"text_encoder": b.params["text_encoder"], "unet": b.params["unet"]}
    # the frozen UNet is replicated for the token stage, or FSDP-split when it does not fit one device
    frozen_sh = sharding.fsdp_shardings(frozen, mesh, min_size) if mcfg.get("shard_frozen") else None
    frozen = place(frozen) if frozen_sh is None else sharding.put(frozen, frozen_sh)
    run_data = place(setup.run_data)
    setup = dataclasses.replace(setup, run_data=run_data)
    rows0 = place(jnp.asarray(setup.concepts.init_rows))
    tcfg = cfg.tokens
    loss_cfg = steps.LossConfig(batch_size=tcfg.batch_size, attn_weight=tcfg.attn_weight,
                                attn_resolution=tcfg.attn_resolution, flip_prob=cfg.flip_prob,
                                prior_weight=cfg.prior.weight)
    token_opt = steps.make_optimizer(tcfg.lr, tcfg.clip, tcfg.weight_decay)
    token_step = steps.make_train_step(b, setup.concepts.ids, loss_cfg, token_opt, mesh, frozen_shardings=frozen_sh)
    maps_fn = steps.make_concept_maps(b, setup.concepts.ids, capture.LayerSelector(resolutions=tuple(cfg.masks.resolutions)),
                                      cfg.masks.num_timesteps, setup.latent_hw, mesh, frozen_shardings=frozen_sh)
    base_key = jax.random.key(cfg.seed)
    k_inv, k_tok, k_est, k_joint = jax.random.split(base_key, 4)
    mngr = checkpoint_manager(run_dir)
    n_rounds = -(-tcfg.steps // tcfg.estep_every) if tcfg.steps else 0
    inv_steps = cfg.init.inversion_steps if cfg.init.method == "inversion" else 0
    total_steps = inv_steps + tcfg.steps + cfg.joint.steps
    bar = tqdm(total=total_steps, desc="learning", dynamic_ncols=True, disable=not (progress and primary))
    history: list[dict] = []

    def save(index, meta, state, masks_now):
        if not np.all(np.isfinite(np.asarray(state["params"]["rows"]))):
            raise TrainingError("the concept embeddings are no longer finite; not saving them. Lower the "
                                "learning rate; the last good checkpoint is kept.")
        save_checkpoint(mngr, index, meta, state, masks_now)
        if on_checkpoint is not None:
            on_checkpoint(dict(meta, index=index))

    def round_record(r: int, masks_now, raw, prev, info) -> dict:
        return round_metrics(r, masks_now, raw, prev, info, setup.concepts.tokens, truth, tied)

    def save_round_pngs(r, masks_now):
        if primary:
            outputs.save_masks(os.path.join(run_dir, "masks", f"round_{r:02d}"), names, token_names, owner_C, masks_now)

    counter = [0]  # optimisation steps done in all stages (tqdm does not count when disabled)

    def run_steps(step_fn, state, masks_lat, key, n, stage):
        for _ in range(n):
            state, m = step_fn(state, frozen_for(stage), run_data, masks_lat, key)
            counter[0] += 1
            done = counter[0]
            bar.update(1)
            if done % cfg.log_every == 0:
                mm = _check_finite(m, f"{stage} step {done}", mngr)
                bar.set_postfix({k: f"{v:.4g}" for k, v in mm.items() if k.startswith("loss")})
                record({"stage": stage, "step": done, **mm})
        return state

    joint_frozen = {} if cfg.joint.text_encoder else {"text_encoder": frozen["text_encoder"]}

    def frozen_for(stage):
        return joint_frozen if stage == "joint" else frozen

    # ---- resume?
    meta = latest_meta(mngr)
    token_state = place(steps.init_state({"rows": rows0}, token_opt))
    masks_now = raw_now = None
    if meta is not None:
        log.info("resuming from checkpoint %d (%s)", meta["index"], meta["stage"])
        if primary:
            print(f"resuming {run_dir} from checkpoint {meta['index']} ({meta['stage']}, round {meta.get('round', 0)})")
        for line in open(os.path.join(run_dir, "metrics.jsonl")):
            entry = json.loads(line)
            if "round" in entry and entry.get("index", -1) <= meta["index"]:
                history.append(entry)

    # ---- stage 1: initial tokens and masks
    if meta is None:
        if inv_steps:
            inv_cfg = dataclasses.replace(loss_cfg, attn_weight=0.0)
            inv_opt = steps.make_optimizer(cfg.init.inversion_lr, tcfg.clip, tcfg.weight_decay)
            inv_step = steps.make_train_step(b, setup.concepts.ids, inv_cfg, inv_opt, mesh, frozen_shardings=frozen_sh)
            ones = place(jnp.ones((len(owner_C),) + setup.latent_hw, jnp.float32))
            inv_state = run_steps(inv_step, place(steps.init_state({"rows": rows0}, inv_opt)), ones, k_inv,
                                  inv_steps, "inversion")
            token_state = place(steps.init_state({"rows": inv_state["params"]["rows"]}, token_opt))
        if cfg.mode == "user":  # prepare() checked that every concept has its mask
            masks_now = raw_now = np.stack(setup.inputs.user_masks)
            info = {}
        else:
            masks_now, raw_now, info = estimate_masks(setup, maps_fn, token_state["params"]["rows"], frozen,
                                                      jax.random.fold_in(k_est, 0), cfg)
        entry = dict(round_record(0, masks_now, raw_now, None, info), index=inv_steps, stage="init")
        history.append(entry)
        record(entry)
        save_round_pngs(0, masks_now)
        meta = {"stage": "token", "round": 0, "index": inv_steps}
        save(inv_steps, {"stage": "token", "round": 0}, token_state, masks_now)
    else:
        counter[0] = meta["index"] if meta["stage"] != "done" else total_steps
        bar.update(counter[0])

    # ---- stage 2: EM rounds
    if meta["stage"] == "token":
        if meta["index"] != inv_steps or masks_now is None:
            _, token_state, masks_now = restore_checkpoint(mngr, meta["index"], token_state,
                                                           np.zeros((len(owner_C),) + setup.images_u8.shape[1:3]))
            token_state = place(token_state)
        for r in range(meta["round"], n_rounds):
            n = min(tcfg.estep_every, tcfg.steps - r * tcfg.estep_every)
            token_state = run_steps(token_step, token_state, latent_masks(masks_now, setup.latent_hw, mesh), k_tok, n,
                                    "token")
            prev = masks_now
            if cfg.mode == "em":
                masks_now, raw_now, info = estimate_masks(setup, maps_fn, token_state["params"]["rows"], frozen,
                                                          jax.random.fold_in(k_est, r + 1), cfg, previous=prev)
            else:  # masks kept: the no-CRF figures stay those of stage 1 (unknown after a resume)
                info = {}
                raw_now = raw_now if raw_now is not None else masks_now
            index = inv_steps + r * tcfg.estep_every + n
            entry = dict(round_record(r + 1, masks_now, raw_now, prev, info), index=index, stage="token")
            history.append(entry)
            record(entry)
            save_round_pngs(r + 1, masks_now)
            save(index, {"stage": "token", "round": r + 1}, token_state, masks_now)
        if cfg.mode == "em" and n_rounds:  # the final masks: a ground-truth-free rule over the rounds (settle)
            masks_now = settle_final(run_dir, setup, n_rounds)
        meta = {"stage": "joint", "index": inv_steps + tcfg.steps}

    # ---- stage 3: joint tuning with the masks fixed
    trainable_of = lambda rows: {"rows": rows, "unet": b.params["unet"],
                                 **({"text_encoder": b.params["text_encoder"]} if cfg.joint.text_encoder else {})}
    joint_opt = steps.make_optimizer(cfg.joint.lr, tcfg.clip, tcfg.weight_decay, cfg.joint.get("optimizer", "adamw"))
    final_masks_shape = np.zeros((len(owner_C),) + setup.images_u8.shape[1:3])
    if meta["stage"] == "joint":
        if masks_now is None:
            _, token_state, masks_now = restore_checkpoint(mngr, meta["index"], token_state, final_masks_shape)
            token_state = place(token_state)
        # fresh buffers: the joint step donates its state, and the base model's params (which a caller such
        # as the benchmark reuses for its next run) must not be donated with it
        fresh = jax.tree.map(jnp.copy, trainable_of(token_state["params"]["rows"]))
        joint_state = steps.init_state(fresh, joint_opt)
        # FSDP: the UNet, its gradients and optimiser moments split over the mesh's fsdp axis
        joint_sh = sharding.fsdp_shardings(joint_state, mesh, min_size)
        joint_state = sharding.put(joint_state, joint_sh)
        if cfg.joint.steps:
            joint_cfg = dataclasses.replace(loss_cfg, remat=cfg.joint.get("remat", "none"))
            joint_frozen_sh = None if frozen_sh is None else {k: frozen_sh[k] for k in joint_frozen}
            joint_step = steps.make_train_step(b, setup.concepts.ids, joint_cfg, joint_opt, mesh,
                                               state_shardings=joint_sh, frozen_shardings=joint_frozen_sh)
            joint_state = run_steps(joint_step, joint_state, latent_masks(masks_now, setup.latent_hw, mesh), k_joint,
                                    cfg.joint.steps, "joint")
        final = {"rows": joint_state["params"]["rows"], "unet": joint_state["params"]["unet"]}
        save(total_steps, {"stage": "done", "round": n_rounds}, {"params": final}, masks_now)
        meta = {"stage": "done", "index": total_steps}
    else:  # finished before: reload the final state
        final_like = {"params": trainable_of(rows0)}
        final_like["params"].pop("text_encoder", None)
        _, got, masks_now = restore_checkpoint(mngr, meta["index"], final_like, final_masks_shape)
        final = got["params"]
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    return write_results(run_dir, setup, final, masks_now, history, truth, time.time() - t_start, cfg)


def settle_final(run_dir: str, setup: Setup, n_rounds: int) -> np.ndarray:
    """The final masks of an EM run: `settle.final_round` over the rounds' masks (read back from the
    masks/round_NN files, so a resumed run chooses as an uninterrupted one)."""
    rounds = round_masks(run_dir, setup, n_rounds)
    return rounds[settle.final_round(rounds)]


def round_masks(run_dir: str, setup: Setup, n_rounds: int) -> list[np.ndarray]:
    """The masks of rounds 0..n_rounds as the run wrote them (masks/round_NN)."""
    names, owner_C = setup.inputs.names, np.asarray(setup.inputs.owner_C)
    token_names = outputs.file_names(setup.concepts.tokens)
    return [outputs.load_masks(os.path.join(run_dir, "masks", f"round_{r:02d}"), names, token_names, owner_C)
            for r in range(n_rounds + 1)]


def write_results(run_dir, setup: Setup, final, masks_final, history, truth, seconds, cfg) -> dict:
    """The run's files (process 0 only) and its summary; `final` = {"rows", "unet" (if tuned)}."""
    names, owner_C = setup.inputs.names, np.asarray(setup.inputs.owner_C)
    token_names = outputs.file_names(setup.concepts.tokens)
    final = distributed.to_host(final)  # a collective when the UNet is split over hosts: every process gathers
    n_rounds = len([h for h in history if "round" in h])
    summary = {
        "run": os.path.abspath(run_dir), "mode": cfg.mode, "model": setup.bundle.source,
        "images": list(names), "tokens": list(setup.concepts.tokens), "seconds": round(seconds, 1),
        "rounds": n_rounds - 1,
        "mask_area": {t: float(m.mean()) for t, m in zip(setup.concepts.tokens, masks_final)},
        # what evaluation needs to find each concept's reference: its image, final mask file and kind
        "concepts": [{"token": t, "kind": k, "init_word": w, "image": f"images/{names[owner_C[c]]}.png",
                      "mask": f"masks/final/{names[owner_C[c]]}__{token_names[c]}.png"}
                     for c, (t, k, w) in enumerate(zip(setup.concepts.tokens, setup.inputs.kinds,
                                                       setup.concepts.init_words))],
        "template": cfg.template, "joiner": cfg.get("joiner", data.JOINER),
    }
    rounds_h = [h for h in history if "round" in h]
    summary["mask_change_by_round"] = [h.get("mask_change") for h in rounds_h[1:]]
    if cfg.mode == "em" and rounds_h:
        summary["final_round"] = settle.final_round(round_masks(run_dir, setup, len(rounds_h) - 1))
    tied = tied_concepts(setup)
    if tied:
        summary["warning"] = settle.tie_warning(tied, setup.concepts.tokens, setup.concepts.init_words)
    if truth is not None:
        summary["iou_final"] = dict(zip(setup.concepts.tokens, masks.matched_ious(masks_final, truth, tied)))
        if tied:
            summary["iou_matching"] = MATCHING_NOTE
        summary["iou_by_round"] = [h.get("mean_iou") for h in history if "round" in h]
        summary["iou_no_crf_by_round"] = [h.get("mean_iou_no_crf") for h in history if "round" in h]
    if not distributed.is_primary():
        return summary
    outputs.save_masks(os.path.join(run_dir, "masks", "final"), names, token_names, owner_C, masks_final)
    for i, name in enumerate(names):
        mine = np.flatnonzero(owner_C == i)
        images.save_image(outputs.color_overlay(setup.images_u8[i], masks_final[mine]),
                          os.path.join(run_dir, "overlays", f"{name}.png"))
    rounds = round_masks(run_dir, setup, n_rounds - 1)
    images.save_image(outputs.evolution_picture(setup.images_u8, owner_C, rounds, setup.concepts.tokens),
                      os.path.join(run_dir, "masks_evolution.png"))
    outputs.save_concepts(os.path.join(run_dir, "concepts.safetensors"), setup.concepts.tokens,
                          np.asarray(final["rows"]), setup.concepts.init_words)
    if cfg.joint.steps:
        adapter.save_flax_unet(os.path.join(run_dir, "unet"), setup.bundle.unet, final["unet"])
    outputs.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
