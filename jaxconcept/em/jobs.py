"""Many concept sets at once: J independent personalisation jobs in one program.

    from jaxconcept import config, inputs, jobs
    specs = [(inputs.from_toy_scene_folder(d),) for d in scene_folders]     # one job per concept set
    summaries = jobs.learn_many(config.get_config(), specs, "runs/many")   # runs/many/job_00, job_01, ...

The same loop as a single run (`learner.run`) drives a `jobs_stages`: every job's step is one vmapped
program against the one frozen UNet (the UNet's weights are read once per step for all jobs); E-steps run
per job on the host between blocks of steps; the joint stage tunes each job's own copy of the UNet in one
vmapped program whose job axis is split over the devices. Per job it computes what `learner.learn`
computes with the same config (tested), and writes the same run folder, loadable by `generate`,
`evaluate` and `export`. Checkpoints of all jobs, numbered as a single run's, are in `out_dir`.

Jobs must have the same structure (images, and concepts per image) so their data stack; their tokens may
repeat across jobs (each job's tokens get internal names; its folder uses the names given). Tuning the
text encoder (joint.text_encoder) is refused: use `learner.learn` for such a job.
Command line: `python -m jaxconcept.train --out runs/many --job IMAGE:TOKENS... --job ...`. Across hosts
the job axis spans every host's devices; rows and metrics are gathered where the host needs them, process 0
writes the run folders, all processes write the checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp

from .. import settings
from ..model import capture, conditioning, tokens
from ..parallel import distributed, sharding
from ..runio import outputs, runfolder
from . import learner, steps
from ..errors import JaxconceptError
from ..model.loading import ModelBundle, load_model
from .prepare import check_inputs, prepare, truth_masks
from .stages import (Job, Stages, joint_frozen, joint_loss_config, joint_unet, latent_masks, loss_config, stage_keys,
                     stage_optimizers)


def _internal_specs(specs, j: int):
    """Job j's specs with tokens renamed <jJ_name> (tokens may repeat across jobs; one vocabulary holds all)."""
    return tuple(dataclasses.replace(s, concepts=tuple(
        dataclasses.replace(c, token=f"<j{j}_{outputs.safe_name(c.token)}>") for c in s.concepts)) for s in specs)


def structure(specs) -> tuple:
    return tuple(len(s.concepts) for s in specs)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def prepare_jobs(s: settings.Settings, jobs, base: ModelBundle):
    """(setups with the jobs' tokens as given, bundle with every job's tokens): one vocabulary holds all jobs'
    tokens under internal names, added job after job; each job's data and initial rows are what a run of
    its own would have."""
    setups, b = [], base
    for j, specs in enumerate(jobs):
        setup = prepare(s, _internal_specs(specs, j), b)
        # initial rows as a run of its own would draw them (random rows take the *base* table's mean norm)
        _, alone = tokens.add_concept_tokens(base, setup.concepts.tokens, setup.concepts.init_words, seed=s.seed,
                                             vectors=s.tokens.vectors)
        given = tuple(c.token for spec in specs for c in spec.concepts)
        setups.append(dataclasses.replace(setup, concepts=dataclasses.replace(
            setup.concepts, init_rows=alone.init_rows, tokens=given)))
        b = setup.bundle
    counts = {st.concepts.counts for st in setups}
    if len(counts) > 1:
        raise JaxconceptError(f"jobs batched together need the same vectors per concept; these jobs have "
                              f"{' / '.join(map(str, sorted(counts)))} (tokens.vectors=0 gives each concept one per "
                              "init word): give their concepts the same number of '+'-joined init words, or set "
                              "--config.tokens.vectors to a number.")
    return setups, b


def stacked_inputs(setups, mesh):
    """Device arrays of all jobs with a leading job axis (split over the mesh when J divides): the run
    data and the concept ids J x N."""
    job_sh = steps.job_axis_sharding(mesh, len(setups))
    run_data = sharding.put(_stack([s.run_data for s in setups]), job_sh)
    ids_JxN = sharding.put(jnp.asarray([s.concepts.ids for s in setups], jnp.int32), job_sh)
    return run_data, ids_JxN


def jobs_stages(s: settings.Settings, setups, b: ModelBundle, mesh) -> tuple[Stages, list]:
    """The stage functions of J jobs: states with a leading job axis, split over the devices when J divides."""
    num_jobs = len(setups)
    place = lambda tree: sharding.put_replicated(tree, mesh)  # noqa: E731
    job_sh = steps.job_axis_sharding(mesh, num_jobs)
    frozen = place({**conditioning.text_params(b.params), "unet": b.params["unet"]})
    setups = [dataclasses.replace(st, run_data=place(st.run_data)) for st in setups]
    run_data, ids_JxN = stacked_inputs(setups, mesh)
    loss_cfg = loss_config(s)
    keys = stage_keys(s.seed)
    per_job = lambda key: sharding.put(jnp.stack([key] * num_jobs), job_sh)  # noqa: E731  (each as run alone)
    maps_any = steps.make_concept_maps(b, None, capture.LayerSelector(resolutions=s.masks.resolutions),
                                       s.masks.num_timesteps, setups[0].latent_hw, mesh,
                                       chunk=s.masks.timestep_chunk)
    opts = stage_optimizers(s)
    token_opt, joint_opt = opts["token"], opts["joint"]
    rows0 = [jnp.asarray(st.concepts.init_rows) for st in setups]

    def stage_step(cfg, opt, frozen_part, key):
        return steps.make_jobs_step(b, cfg, opt, mesh, num_jobs).bind(frozen_part, run_data, per_job(key), ids_JxN)

    def states(rows_list, opt):
        return sharding.put(_stack([steps.init_state({"rows": r}, opt) for r in rows_list]), job_sh)

    def inversion():
        inv_opt = opts["inversion"]
        step = stage_step(dataclasses.replace(loss_cfg, attn_weight=0.0), inv_opt, frozen, keys["inversion"])
        to_token = lambda inv: states(list(distributed.to_host(inv["params"]["rows"])), token_opt)  # noqa: E731
        return states(rows0, inv_opt), step, to_token

    def joint_state(token_state):
        # every job starts from its own copy of the base UNet (or of the fresh adapters on the shared frozen
        # UNet), made on the devices that hold the job
        copies = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_jobs,) + x.shape), tree)  # noqa: E731
        return jax.jit(lambda r, unet: jax.vmap(lambda p: steps.init_state(p, joint_opt))(
            {"rows": r, **copies(unet)}), out_shardings=job_sh)(token_state["params"]["rows"],
                                                                  place(joint_unet(s, b.params["unet"])))

    def maps(j, rows, i, key):
        st = setups[j]
        return maps_any(rows, frozen, st.run_data["latents"][i, 0], jnp.asarray(st.image_ids_IxT[i]),
                        jnp.asarray(st.image_positions_IxC[i]), key, jnp.asarray(st.concepts.ids, jnp.int32))

    def final_like():
        like = {"rows": _stack(rows0)}
        if s.joint.steps:
            like.update(jax.tree.map(lambda x: jnp.zeros((num_jobs,) + x.shape, x.dtype),
                                     jax.eval_shape(functools.partial(joint_unet, s), b.params["unet"])))
        return like

    def job_metrics(m):
        host = distributed.to_host(m)  # host sync only at logging steps (a gather when jobs span hosts)
        return [{k: float(v[j]) for k, v in host.items()} for j in range(num_jobs)]

    stages = Stages(
        jobs=num_jobs, batched=True, initial_state=lambda: states(rows0, token_opt),
        inversion=inversion if s.init.steps else None,
        token_step=stage_step(loss_cfg, token_opt, frozen, keys["token"]), joint_state=joint_state,
        joint_step=lambda state: stage_step(joint_loss_config(s), joint_opt, joint_frozen(s, frozen), keys["joint"]),
        rows=lambda state: list(distributed.to_host(state["params"]["rows"])),  # job-split: every host gathers
        maps=maps,
        place_masks=lambda masks: sharding.put(jnp.stack([latent_masks(m, setups[0].latent_hw, mesh)
                                                          for m in masks]), job_sh),
        job_metrics=job_metrics, final_like=final_like)
    return stages, setups


def check_jobs(s: settings.Settings, jobs) -> None:
    """What batched jobs cannot do, refused before any work."""
    if not jobs:
        raise JaxconceptError("no jobs given: pass at least one concept set.")
    shapes = {structure(j) for j in jobs}
    if len(shapes) > 1:
        raise JaxconceptError(f"jobs differ in structure (concepts per image: {sorted(shapes)}); jobs batched "
                              "in one program need the same number of images and of concepts per image. Group "
                              "them by structure, or run them one by one with python -m jaxconcept.train.")
    if s.joint.text_encoder:
        raise JaxconceptError("batched jobs do not tune the text encoder (joint.text_encoder=True): each job "
                              "would need its own copy; run such jobs one by one with learner.learn "
                              "(python -m jaxconcept.train --concepts ...).")


def checked_jobs(jobs) -> list[tuple]:
    """Each job's specs checked (`check_inputs`), a problem named with its job's number."""
    out = []
    for j, specs in enumerate(jobs):
        try:
            out.append(check_inputs(tuple(specs)))
        except JaxconceptError as e:
            raise type(e)(f"job {j} (job_{j:02d}): {e}") from None
    return out


def learn_many(cfg, jobs, out_dir: str, *, bundle: ModelBundle | None = None, mesh=None, ground_truths=None,
               progress: bool = True, retrain: bool = False) -> list[dict]:
    """Learn every job (a sequence of ImageSpecs each) into out_dir/job_NN; returns their summaries.
    retrain: train again from scratch a finished batch whose checkpoints were deleted (refused otherwise)."""
    t_start = time.time()
    s = settings.resolve(cfg)
    jobs = checked_jobs(jobs)
    check_jobs(s, jobs)
    with learner.guarded_folder(out_dir):
        fp = learner.start_folder(s, [spec for j in jobs for spec in j], out_dir, retrain)
        with runfolder.locked(out_dir):
            base = bundle or load_model(s.model, s.dtype, seed=s.seed)
            setups, b = prepare_jobs(s, jobs, base)
            stages, setups = jobs_stages(s, setups, b, mesh or sharding.make_mesh())
            run_dirs = [os.path.join(out_dir, f"job_{j:02d}") for j in range(len(jobs))]
            job_list = [Job(d, st, truth_masks(st, None if ground_truths is None else ground_truths[j]))
                        for j, (d, st) in enumerate(zip(run_dirs, setups))]
            return learner.run(s, stages, job_list, out_dir, fp, progress=progress, t_start=t_start)
