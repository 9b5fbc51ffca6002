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
import os
import time

import jax
import jax.numpy as jnp

from .. import settings
from ..model import capture, tokens
from ..parallel import distributed, sharding
from ..runio import outputs, runfolder
from . import learner, steps
from ..errors import JaxconceptError
from ..model.loading import ModelBundle, load_model
from .prepare import check_inputs, prepare, truth_masks
from .stages import Job, Stages, build_stages, frozen_weights, latent_masks


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


class JobsPlacement:
    """The `Placement` of J jobs: states, run data and masks with a leading job axis, split over the devices when
    J divides; one replicated copy of the frozen weights for all jobs; each job's joint stage tunes its own copy
    of the UNet (or of the fresh adapters on the shared frozen UNet)."""

    batched = True

    def __init__(self, s: settings.Settings, setups, b: ModelBundle, mesh):
        self.jobs, self.b, self.mesh = len(setups), b, mesh
        self.downsample, self.rows_ema = s.tokens.mask_downsample, s.tokens.ema > 0
        self.job_sh = steps.job_axis_sharding(mesh, self.jobs)
        self.frozen = self._place(frozen_weights(b.params))
        self.setups = [dataclasses.replace(st, run_data=self._place(st.run_data)) for st in setups]
        self.run_data, self.ids_JxN = stacked_inputs(self.setups, mesh)
        self.maps_any = steps.make_concept_maps(b, None, capture.LayerSelector(resolutions=s.masks.resolutions),
                                                s.masks.num_timesteps, self.setups[0].latent_hw, mesh,
                                                chunk=s.masks.timestep_chunk)
        self.rows0 = [jnp.asarray(st.concepts.init_rows) for st in self.setups]

    def _place(self, tree):
        return sharding.put_replicated(tree, self.mesh)

    def _per_job(self, key):
        return sharding.put(jnp.stack([key] * self.jobs), self.job_sh)  # each job's key as its run alone draws it

    def _step(self, cfg, opt, key, frozen):
        return steps.make_jobs_step(self.b, cfg, opt, self.mesh, self.jobs).bind(frozen, self.run_data,
                                                                                 self._per_job(key), self.ids_JxN)

    def token_step(self, cfg, opt, key):
        return self._step(cfg, opt, key, self.frozen)

    def joint_step(self, cfg, opt, key, frozen_names, state):
        return self._step(cfg, opt, key, {k: self.frozen[k] for k in frozen_names})

    def states(self, rows_list, opt):
        return sharding.put(_stack([steps.init_state({"rows": r}, opt, self.rows_ema) for r in rows_list]), self.job_sh)

    def inverted_rows(self, inversion_state):
        return list(distributed.to_host(inversion_state["params"]["rows"]))

    def joint_state(self, rows, tuned, opt):
        # every job starts from its own copy of what it tunes, made on the devices that hold the job
        copies = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (self.jobs,) + x.shape), tree)  # noqa: E731
        return jax.jit(lambda r, t: jax.vmap(lambda p: steps.init_state(p, opt))({"rows": r, **copies(t)}),
                       out_shardings=self.job_sh)(rows, self._place(tuned))

    def rows(self, state):
        return list(distributed.to_host(state["params"]["rows"]))  # job-split: every host gathers

    def maps(self, job, rows, image, key):
        st = self.setups[job]
        return self.maps_any(rows, self.frozen, st.run_data["latents"][image, 0], jnp.asarray(st.image_ids_IxT[image]),
                             jnp.asarray(st.image_positions_IxC[image]), key, jnp.asarray(st.concepts.ids, jnp.int32))

    def place_masks(self, masks):
        hw, windows = self.setups[0].latent_hw, self.setups[0].zoom_windows  # one config: the same windows
        return sharding.put(jnp.stack([latent_masks(m, hw, self.mesh, self.downsample, windows) for m in masks]),
                            self.job_sh)

    def job_metrics(self, metrics):
        host = distributed.to_host(metrics)  # host sync only at logging steps (a gather when jobs span hosts)
        return [{k: float(v[j]) for k, v in host.items()} for j in range(self.jobs)]

    def final_like(self, tuned):
        like = {"rows": _stack(self.rows0)}
        if tuned is not None:
            like.update(jax.tree.map(lambda x: jnp.zeros((self.jobs,) + x.shape, x.dtype),
                                     jax.eval_shape(tuned, self.b.params)))
        return like


def jobs_stages(s: settings.Settings, setups, b: ModelBundle, mesh) -> tuple[Stages, list]:
    """The stage functions of J jobs (`JobsPlacement`), and their setups with the run data on the devices."""
    place = JobsPlacement(s, setups, b, mesh)
    return build_stages(s, b, place), place.setups


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
