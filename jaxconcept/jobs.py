"""Many concept sets at once: K independent personalisation jobs in one program.

    from jaxconcept import config, inputs, jobs
    specs = [(inputs.from_toy_scene_folder(d),) for d in scene_folders]     # one job per concept set
    summaries = jobs.learn_many(config.get_config(), specs, "runs/many")   # runs/many/job_00, job_01, ...

The token/EM stage runs every job's step as one vmapped program against the one frozen UNet (the UNet's
weights are read once per step for all jobs); E-steps run per job on the host between blocks of steps,
as in `learner.learn`; the joint stage tunes each job's own copy of the UNet in one vmapped program whose
job axis is split over the devices. Per job it computes what `learner.learn` computes with the same config
(tested), and writes the same run folder, loadable by `generate`, `evaluate` and `export`. A checkpoint of
all jobs after every round makes the whole set resumable.

Jobs must have the same structure (images, and concepts per image) so their data stack; their tokens may
repeat across jobs (each job's tokens get internal names; its folder uses the names given).
Command line: `python -m jaxconcept.train --out runs/many --job IMAGE:TOKENS... --job ...`. Across hosts
the job axis spans every host's devices; rows and metrics are gathered where the host needs them, process 0
writes the run folders, all processes write the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import capture, distributed, learner, outputs, sharding, steps, tokens
from .errors import JaxconceptError
from .model import ModelBundle, load_model


def _internal_specs(specs, j: int):
    """Job j's specs with tokens renamed <jJ_name> (tokens may repeat across jobs; one vocabulary holds all)."""
    return tuple(dataclasses.replace(s, concepts=tuple(
        dataclasses.replace(c, token=f"<j{j}_{outputs.safe_name(c.token)}>") for c in s.concepts)) for s in specs)


def structure(specs) -> tuple:
    return tuple(len(s.concepts) for s in specs)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _unstack(tree, k: int):
    return jax.tree.map(lambda x: x[k], tree)


def prepare_jobs(cfg, jobs, base: ModelBundle):
    """(setups, bundle with every job's tokens, each job's tokens as given): one vocabulary holds all jobs'
    tokens under internal names, added job after job; each job's data and initial rows are what a run of
    its own would have."""
    setups, b = [], base
    for j, specs in enumerate(jobs):
        setup = learner.prepare(cfg, _internal_specs(specs, j), b)
        # initial rows as a run of its own would draw them (random rows take the *base* table's mean norm)
        _, alone = tokens.add_concept_tokens(base, setup.concepts.tokens, setup.concepts.init_words, seed=cfg.seed)
        setups.append(dataclasses.replace(setup, concepts=dataclasses.replace(setup.concepts,
                                                                              init_rows=alone.init_rows)))
        b = setup.bundle
    return setups, b, [[c.token for s in specs for c in s.concepts] for specs in jobs]


def stacked_inputs(setups, mesh):
    """Device arrays of all jobs with a leading job axis (split over the mesh when K divides): the run
    data and the concept ids K x N."""
    job_sh = steps.job_axis_sharding(mesh, len(setups))
    run_data = sharding.put(_stack([s.run_data for s in setups]), job_sh)
    ids_KxN = sharding.put(jnp.asarray([s.concepts.ids for s in setups], jnp.int32), job_sh)
    return run_data, ids_KxN


def learn_many(cfg, jobs, out_dir: str, *, bundle: ModelBundle | None = None, mesh=None, ground_truths=None,
               progress: bool = True) -> list[dict]:
    """Learn every job (a sequence of ImageSpecs each) into out_dir/job_NN; returns their summaries."""
    jobs = [tuple(j) for j in jobs]
    if not jobs:
        raise JaxconceptError("no jobs given: pass at least one concept set.")
    shapes = {structure(j) for j in jobs}
    if len(shapes) > 1:
        raise JaxconceptError(f"jobs differ in structure (concepts per image: {sorted(shapes)}); jobs batched "
                              "in one program need the same number of images and of concepts per image. Group "
                              "them by structure, or run them one by one with python -m jaxconcept.train.")
    if cfg.init.method == "inversion" or cfg.prior.folder:
        raise JaxconceptError("learn_many does not support init.method='inversion' or prior preservation yet: "
                              "use learner.learn for those jobs.")
    outputs.check_writable(out_dir)
    t_start = time.time()
    k_jobs = len(jobs)
    run_dirs = [os.path.join(out_dir, f"job_{j:02d}") for j in range(k_jobs)]
    base = bundle or load_model(cfg.model, cfg.dtype, seed=cfg.seed)
    setups, b, user_tokens = prepare_jobs(cfg, jobs, base)
    mesh = mesh or sharding.make_mesh()
    place = lambda tree: sharding.put_replicated(tree, mesh)  # noqa: E731
    job_sh = steps.job_axis_sharding(mesh, k_jobs)
    frozen = place({"text_encoder": b.params["text_encoder"], "unet": b.params["unet"]})
    setups = [dataclasses.replace(s, run_data=place(s.run_data)) for s in setups]
    run_data, ids_KxN = stacked_inputs(setups, mesh)
    tcfg = cfg.tokens
    loss_cfg = steps.LossConfig(batch_size=tcfg.batch_size, attn_weight=tcfg.attn_weight,
                                attn_resolution=tcfg.attn_resolution, flip_prob=cfg.flip_prob)
    token_opt = steps.make_optimizer(tcfg.lr, tcfg.clip, tcfg.weight_decay)
    token_step = steps.make_jobs_step(b, loss_cfg, token_opt, mesh, k_jobs)
    maps_any = steps.make_concept_maps(b, None, capture.LayerSelector(resolutions=tuple(cfg.masks.resolutions)),
                                       cfg.masks.num_timesteps, setups[0].latent_hw, mesh)
    # every job draws what `learner.learn` draws with this config's seed
    k_inv, k_tok, k_est, k_joint = jax.random.split(jax.random.key(cfg.seed), 4)
    keys_tok = sharding.put(jnp.stack([k_tok] * k_jobs), job_sh)
    mngr = learner.checkpoint_manager(out_dir)
    n_rounds = -(-tcfg.steps // tcfg.estep_every) if tcfg.steps else 0
    total = tcfg.steps + cfg.joint.steps
    truths = [learner.truth_masks(s, None if ground_truths is None else ground_truths[j])
              for j, s in enumerate(setups)]
    primary = distributed.is_primary()  # multi-host: process 0 writes the files, all write checkpoints
    files = [learner.start_run_folder(run_dir, cfg, s) for run_dir, s in zip(run_dirs, setups)]
    histories: list[list[dict]] = [[] for _ in jobs]
    bar = tqdm(total=total * k_jobs, desc=f"learning {k_jobs} jobs", unit="job-step", dynamic_ncols=True,
               disable=not (progress and primary))

    def record(j: int, entry: dict) -> None:
        if primary:
            files[j].write(json.dumps(entry) + "\n")
            files[j].flush()

    def maps_for(j):
        ids = jnp.asarray(setups[j].concepts.ids, jnp.int32)
        return lambda rows, fr, lat, ids_l, pos, key: maps_any(rows, fr, lat, ids_l, pos, key, ids)

    def e_step(rows_KxNxD, r: int, prev=None):
        rows_KxNxD = distributed.to_host(rows_KxNxD)  # job-split over hosts: every host gathers all jobs' rows
        got = [learner.estimate_masks(s, maps_for(j), rows_KxNxD[j], frozen, jax.random.fold_in(k_est, r), cfg,
                                      previous=None if prev is None else prev[j])
               for j, s in enumerate(setups)]
        return [g[0] for g in got], [g[1] for g in got], [g[2] for g in got]

    def round_entry(j, r, masks_now, raw, prev, info, index, stage):
        entry = dict(learner.round_metrics(r, masks_now, raw, prev, info, user_tokens[j], truths[j],
                                           learner.tied_concepts(setups[j])),
                     index=index, stage=stage)
        histories[j].append(entry)
        record(j, entry)
        s = setups[j]
        if primary:
            outputs.save_masks(os.path.join(run_dirs[j], "masks", f"round_{r:02d}"), s.inputs.names,
                               outputs.file_names(user_tokens[j]), np.asarray(s.inputs.owner_C), masks_now)

    def latent_masks(masks_list):
        lat = [learner.latent_masks(m, setups[0].latent_hw, mesh) for m in masks_list]
        return sharding.put(jnp.stack(lat), job_sh)

    def run_steps(step_fn, state, frozen_part, masks_lat, keys, ids, n, stage, done):
        for _ in range(n):
            state, m = step_fn(state, frozen_part, run_data, masks_lat, keys, ids)
            done += 1
            bar.update(k_jobs)
            if done % cfg.log_every == 0:
                host = distributed.to_host(m)  # host sync only at logging steps (a gather when jobs span hosts)
                for j in range(k_jobs):
                    mm = {k: float(v[j]) for k, v in host.items()}
                    if not all(np.isfinite(v) for v in mm.values()):
                        raise learner.TrainingError(f"job {j}: the loss became {mm['loss']} during {stage} step "
                                                    f"{done}; the last round's checkpoint in {out_dir} is kept.")
                    record(j, {"stage": stage, "step": done, **mm})
                bar.set_postfix(loss=f"{float(np.mean(host['loss'])):.4g}")
        return state, done

    # ---- state: stage 1, or resume from the last round's checkpoint
    state = sharding.put(_stack([steps.init_state({"rows": jnp.asarray(s.concepts.init_rows)}, token_opt)
                                   for s in setups]), job_sh)
    size = setups[0].images_u8.shape[1:3]
    n_c = len(setups[0].inputs.owner_C)
    last = mngr.latest_step()
    if last is None:
        if cfg.mode == "user":
            masks_now = [np.stack(s.inputs.user_masks) for s in setups]
            raws, infos = masks_now, [{}] * k_jobs
        else:
            masks_now, raws, infos = e_step(state["params"]["rows"], 0)
        for j in range(k_jobs):
            round_entry(j, 0, masks_now[j], raws[j], None, infos[j], 0, "init")
        learner.save_checkpoint(mngr, 0, {"stage": "token", "round": 0}, state, np.stack(masks_now))
        start_round, done = 0, 0
    else:
        meta = learner.latest_meta(mngr)
        if meta["stage"] == "done":  # finished before: write the results again from the final checkpoint
            return _finish_from_checkpoint(cfg, mngr, meta, state, b, k_jobs, n_c, size, run_dirs, setups,
                                           user_tokens, truths, t_start, files)
        meta, state, masks_all = learner.restore_checkpoint(mngr, last, state, np.zeros((k_jobs, n_c) + size))
        state = sharding.put(state, job_sh)
        masks_now = list(masks_all)
        start_round, done = meta["round"], meta["round"] * tcfg.estep_every
        for j, run_dir in enumerate(run_dirs):  # the rounds already recorded
            for line in open(os.path.join(run_dir, "metrics.jsonl")):
                e = json.loads(line)
                if "round" in e and e["round"] <= meta["round"]:
                    histories[j].append(e)
        print(f"resuming {k_jobs} jobs in {out_dir} after round {meta['round']}")
        bar.update(min(done, tcfg.steps) * k_jobs)

    # ---- stage 2: EM rounds, all jobs in one program per step
    for r in range(start_round, n_rounds):
        n = min(tcfg.estep_every, tcfg.steps - r * tcfg.estep_every)
        state, done = run_steps(token_step, state, frozen, latent_masks(masks_now), keys_tok, ids_KxN, n, "token",
                                done)
        prev = masks_now
        if cfg.mode == "em":
            masks_now, raws, infos = e_step(state["params"]["rows"], r + 1, prev)
        else:
            raws, infos = masks_now, [{}] * k_jobs
        for j in range(k_jobs):
            round_entry(j, r + 1, masks_now[j], raws[j], prev[j], infos[j], done, "token")
        learner.save_checkpoint(mngr, r + 1, {"stage": "token", "round": r + 1}, state, np.stack(masks_now))
    if cfg.mode == "em" and n_rounds:  # the final masks, as learner.learn chooses them
        named = [dataclasses.replace(s, concepts=dataclasses.replace(s.concepts, tokens=tuple(user_tokens[j])))
                 for j, s in enumerate(setups)]
        masks_now = [learner.settle_final(run_dir, s, n_rounds) for run_dir, s in zip(run_dirs, named)]

    # ---- stage 3: joint tuning, each job its own UNet copy, the job axis over the devices
    rows = state["params"]["rows"]
    if cfg.joint.steps:
        joint_opt = steps.make_optimizer(cfg.joint.lr, tcfg.clip, tcfg.weight_decay,
                                         cfg.joint.get("optimizer", "adamw"))
        joint_cfg = dataclasses.replace(loss_cfg, remat=cfg.joint.get("remat", "none"))
        # every job starts from its own copy of the base UNet, made on the devices that hold the job
        copies = lambda unet: jax.tree.map(lambda x: jnp.broadcast_to(x, (k_jobs,) + x.shape), unet)  # noqa: E731
        joint_state = jax.jit(lambda r, unet: jax.vmap(lambda p: steps.init_state(p, joint_opt))(
            {"rows": r, "unet": copies(unet)}), out_shardings=job_sh)(rows, place(b.params["unet"]))
        joint_step = steps.make_jobs_step(b, joint_cfg, joint_opt, mesh, k_jobs)
        keys_joint = sharding.put(jnp.stack([k_joint] * k_jobs), job_sh)
        joint_state, _ = run_steps(joint_step, joint_state, place({"text_encoder": b.params["text_encoder"]}),
                                   latent_masks(masks_now), keys_joint, ids_KxN, cfg.joint.steps, "joint", 0)
        final = joint_state["params"]
    else:
        final = {"rows": rows}
    learner.save_checkpoint(mngr, n_rounds + 1, {"stage": "done", "round": n_rounds}, {"params": final},
                            np.stack(masks_now))
    bar.close()
    return _write_all(cfg, final, masks_now, run_dirs, setups, user_tokens, histories, truths, t_start, files)


def _histories(run_dirs) -> list[list[dict]]:
    out = []
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            out.append([e for e in map(json.loads, f) if "round" in e])
    return out


def _finish_from_checkpoint(cfg, mngr, meta, state, b, k_jobs, n_c, size, run_dirs, setups, user_tokens, truths,
                            t_start, files):
    like = {"rows": state["params"]["rows"]}
    if cfg.joint.steps:
        like["unet"] = jax.tree.map(lambda x: jnp.zeros((k_jobs,) + x.shape, x.dtype), b.params["unet"])
    _, got, masks_all = learner.restore_checkpoint(mngr, meta["index"], {"params": like},
                                                   np.zeros((k_jobs, n_c) + size))
    return _write_all(cfg, got["params"], list(masks_all), run_dirs, setups, user_tokens, _histories(run_dirs),
                      truths, t_start, files)


def _write_all(cfg, final, masks_now, run_dirs, setups, user_tokens, histories, truths, t_start, files):
    for f in files:
        if f is not None:  # process 0's metrics files
            f.close()
    final = distributed.to_host(final)  # a collective when jobs span hosts: every process gathers all jobs
    summaries = []
    for j, (run_dir, s) in enumerate(zip(run_dirs, setups)):
        named = dataclasses.replace(s, concepts=dataclasses.replace(s.concepts, tokens=tuple(user_tokens[j])))
        final_j = {"rows": final["rows"][j]}
        if "unet" in final:
            final_j["unet"] = _unstack(final["unet"], j)
        summaries.append(learner.write_results(run_dir, named, final_j, masks_now[j], histories[j], truths[j],
                                               time.time() - t_start, cfg))
    return summaries
