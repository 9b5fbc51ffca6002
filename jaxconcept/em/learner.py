"""The EM concept learner (docs/method.md §1): one loop around the pure steps, for a single run and J jobs.

    stage 1  tokens from init words (or a short unmasked inversion); masks from cross-attention + CRF
    stage 2  EM rounds: token optimisation (L_mask + lambda L_attn, one compiled step), each round followed
             on the host by mask re-estimation (mode "em"); masks kept (modes "attention", "user")
    (refit)  optionally (`tokens.refit`, mode em): the token stage again from its start, on the final masks
    stage 3  joint tuning of tokens and UNet (text encoder optional) with the masks fixed

The loop drives a `Stages`, the stage functions (initial state, token and joint steps, the maps of an image,
mask placement), made by `stages.build_stages`: `stages.single_run_stages` for one run, `jobs.jobs_stages` for J
vmapped jobs. Where to start is decided once, in order, from the newest checkpoint (`resume_point`); checkpoints
after stage 1, every round, every `joint.checkpoint_every` joint steps and at the end make a run started again on
its folder end exactly as an uninterrupted one. Preparing a run: `em/prepare.py`; E-step: `masks/estep.py`;
checkpoints: `runio/checkpoints.py`; run folder: `runio/runfolder.py`. Usable from a notebook:
`learn(get_config(), specs, "runs/x")`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from .. import settings
from ..masks import estep, settle
from ..parallel import distributed, sharding
from ..runio import checkpoints, outputs, runfolder
from ..errors import JaxconceptError, ctrl_c_at_step_boundaries, raise_if_interrupted
from ..model.loading import ModelBundle
from .prepare import check_inputs, crf_where, prepare, truth_masks
from . import steps
from .stages import Job, Stages, single_run_stages, stage_keys

log = logging.getLogger(__name__)


class TrainingError(JaxconceptError):
    """Training cannot go on (e.g. the loss became NaN); what was saved is kept."""


@dataclasses.dataclass
class Loop:
    """The loop's fixed parts and its two counters (steps done, for logging and checkpoint indices)."""

    s: settings.Settings
    stages: Stages
    jobs: list
    mngr: Any
    metrics: list
    bar: Any
    keys: dict
    on_checkpoint: Callable | None
    done: int = 0


@dataclasses.dataclass(frozen=True)
class Start:
    stage: str  # "init", "token" (round `round` next), "refit", "joint", "done"
    round: int
    index: int
    state: Any = None
    masks: list | None = None


# ------------------------------------------------------------------------------------------ the loop


def resume_point(mngr, s: settings.Settings, stages: Stages, masks_shape) -> tuple[Start, list[str]]:
    """Where to start, decided once from the newest checkpoint that can be read: nothing saved -> stage 1; a
    token-stage checkpoint -> the next EM round; a joint one -> the joint step after it; the final one ->
    results. A damaged newest checkpoint is set aside for the one before (`checkpoints.restore_newest`);
    the notes say so."""
    def load(meta):
        like = {"token": stages.initial_state, "refit": stages.initial_state,
                "joint": lambda: stages.joint_state(stages.initial_state()),
                "done": lambda: {"params": stages.final_like()}}[meta["stage"]]()
        return checkpoints.restore(mngr, meta["index"], like, masks_shape)[1:]

    meta, got, notes = checkpoints.restore_newest(mngr, load)
    if meta is None:
        return Start("init", 0, 0), notes
    state, masks = got
    return Start(meta["stage"], meta.get("round", 0), meta["index"], state, list(masks)), notes


def recover_round_masks(mngr, s: settings.Settings, jobs: list, start: Start, masks_shape) -> list[str]:
    """masks/round_NN files of the rounds done that are missing or unreadable (deleted by hand), written again
    from the token-stage checkpoints, which hold every round's masks; notes saying so. Every round's masks are
    read again: by the final-round rule and the evolution picture."""
    if start.stage == "init":
        return []
    n_rounds = start.round if start.stage == "token" else s.tokens.rounds
    notes, by_round = [], None
    for j, job in enumerate(jobs):
        missing = runfolder.unreadable_rounds(job.run_dir, job.setup, n_rounds)
        if not missing:
            continue
        by_round = checkpoints.steps_by_round(mngr) if by_round is None else by_round
        lost = [r for r in missing if r not in by_round]
        if lost:
            raise runfolder.RunFolderError(
                f"the masks of round(s) {', '.join(map(str, lost))} in {os.path.join(job.run_dir, 'masks')!r} are "
                "missing, and so are the checkpoints that hold them; the final masks are chosen among every round's, "
                "so this run cannot be finished. Restore them, or give another --out to train again.")
        for r in missing:
            runfolder.save_round_masks(job.run_dir, job.setup, outputs.file_names(job.setup.concepts.tokens), r,
                                       checkpoints.restore_masks(mngr, by_round[r], masks_shape)[j])
        notes.append(f"{os.path.join(job.run_dir, 'masks')}: round(s) {', '.join(f'{r:02d}' for r in missing)} "
                     "were missing or unreadable; written again from the checkpoints, which hold them")
    return notes


def recover_round_entries(loop: Loop, start: Start) -> list[str]:
    """Round entries of metrics.jsonl missing for rounds the checkpoint has done (a line cut off by a crash or a
    full disk), rebuilt from the round masks: the summary counts and reports the rounds from them. What the masks
    cannot give again (timings, the no-CRF IoU) is left out; "rebuilt": true marks them. Notes saying so."""
    if start.stage == "init":
        return []
    n_rounds = start.round if start.stage == "token" else loop.s.tokens.rounds
    notes, by_round = [], None
    for j, job in enumerate(loop.jobs):
        m = loop.metrics[j]
        have = {e.get("round") for e in m.rounds}
        missing = [r for r in range(n_rounds + 1) if r not in have]
        if not missing:
            continue
        by_round = checkpoints.steps_by_round(loop.mngr) if by_round is None else by_round
        rounds = runfolder.round_masks(job.run_dir, job.setup, n_rounds)
        tied = estep.tied_concepts(job.setup)
        entries = []
        for r in missing:
            e = estep.round_metrics(r, rounds[r], rounds[r], rounds[r - 1] if r else None, {},
                                    job.setup.concepts.tokens, job.truth, tied)
            for key in ("iou_no_crf", "mean_iou_no_crf", "crf_seconds", "attention_seconds"):
                e.pop(key, None)
            entries.append(dict(e, index=by_round.get(r, 0), stage="init" if r == 0 else "token", rebuilt=True))
        m.add_rounds(entries)
        notes.append(f"{m.path}: the entries of round(s) {', '.join(map(str, missing))} were missing; rebuilt from "
                     "the round masks (without timings or the no-CRF IoU)")
    return notes


def _say(notes) -> None:
    if distributed.is_primary():
        for note in notes:
            if note:
                print(f"note: {note}", flush=True)


def _check_stop(loop: Loop) -> None:
    """Stop here when Ctrl-C asked to (`errors.ctrl_c_at_step_boundaries`): a KeyboardInterrupt, cleanly."""
    raise_if_interrupted()


def run(s: settings.Settings, stages: Stages, jobs: list, folder: str, fingerprint: dict, *,
        progress: bool = True, on_checkpoint=None, t_start: float | None = None) -> list[dict]:
    """Every stage into the jobs' folders (checkpoints and run.json in `folder`); one summary per job."""
    t_start = time.time() if t_start is None else t_start
    with ctrl_c_at_step_boundaries():  # Ctrl-C stops at the next step, never swallowed (errors.py)
        return _run(s, stages, jobs, folder, fingerprint, progress, on_checkpoint, t_start)


def _run(s, stages, jobs, folder, fingerprint, progress, on_checkpoint, t_start) -> list[dict]:
    runfolder.write_record(folder, fingerprint, finished=False)
    mngr = checkpoints.manager(folder)
    first = jobs[0].setup
    masks_shape = (len(jobs), len(first.inputs.owner_C)) + first.images_u8.shape[1:3]
    start, notes = resume_point(mngr, s, stages, masks_shape)
    _say(notes)
    if start.stage != "init" and distributed.is_primary():
        print(f"{folder} is finished (checkpoint {start.index}): writing its results again" if start.stage == "done"
              else f"resuming {folder} from checkpoint {start.index} ({start.stage}, round {start.round})")
    for job in jobs:
        runfolder.start(job.run_dir, s, job.setup)
        warning = settle.tie_warning(estep.tied_concepts(job.setup), job.setup.concepts.tokens,
                                     job.setup.concepts.init_words)
        if warning and distributed.is_primary():
            log.warning(warning)
    _say(recover_round_masks(mngr, s, jobs, start, masks_shape))
    keys = stage_keys(s.seed)
    loop = Loop(s, stages, jobs, mngr, [runfolder.Metrics(j.run_dir, None if start.stage == "init" else start.index)
                                         for j in jobs], None, keys, on_checkpoint)
    _say(m.note for m in loop.metrics)
    _say(recover_round_entries(loop, start))
    bar = loop.bar = tqdm(total=s.total_steps * stages.jobs, dynamic_ncols=True,
                          desc="learning" + (f" {stages.jobs} jobs" * (stages.jobs > 1)),
                          disable=not (progress and distributed.is_primary()))
    loop.done = min(start.index, s.total_steps)
    bar.update(loop.done * stages.jobs)
    state, masks, raws = start.state, start.masks, None
    try:
        if start.stage == "init":
            state, masks, raws = stage_initial(loop)
        if start.stage in ("init", "token"):
            state, masks = stage_rounds(loop, state, masks, start.round, raws)
        if start.stage in ("init", "token", "refit") and s.refit_steps:
            state = stage_refit(loop, state, masks, resumed=start.stage == "refit")
        if start.stage != "done":
            state = stage_joint(loop, state, masks, resumed=start.stage == "joint")
    finally:  # the bar as it stands when the run stops (not redrawn "100%" under the message at exit)
        bar.close()
        for m in loop.metrics:
            m.close()
    _check_stop(loop)  # a Ctrl-C after the final checkpoint: the results are written when started again
    final = distributed.to_host(state["params"])  # a collective when split over hosts: every process gathers
    part = (lambda j: jax.tree.map(lambda x: x[j], final)) if stages.batched else (lambda j: final)
    out = [runfolder.write_results(job.run_dir, s, job.setup, part(j), masks[j], loop.metrics[j].rounds,
                                   job.truth, time.time() - t_start) for j, job in enumerate(jobs)]
    runfolder.write_record(folder, fingerprint, finished=True)
    return out


def stage_initial(loop: Loop):
    """Stage 1: the initial rows (after the optional inversion) and the first masks; checkpoint."""
    s, stages = loop.s, loop.stages
    state = stages.initial_state()
    if stages.inversion is not None:
        inv_state, inv_step, to_token_state = stages.inversion()
        ones = [np.ones((len(j.setup.inputs.owner_C),) + j.setup.images_u8.shape[1:3], bool) for j in loop.jobs]
        inv_state = run_steps(loop, inv_step, inv_state, stages.place_masks(ones), s.init.steps, "inversion")
        state = to_token_state(inv_state)
    if s.mode == "user":  # setup.prepare checked that every concept has its mask
        masks = [np.stack(j.setup.inputs.user_masks) for j in loop.jobs]
        raws, infos = masks, [{}] * len(masks)
    else:
        masks, raws, infos = e_step(loop, state, 0)
    record_round(loop, 0, masks, raws, [None] * len(masks), infos, "init")
    save(loop, loop.done, {"stage": "token", "round": 0}, state, masks)
    return state, masks, raws


def stage_rounds(loop: Loop, state, masks, first_round: int, raws=None):
    """Stage 2: EM rounds from `first_round`: token steps with the masks fixed, then (mode em) new masks.
    Masks kept (modes attention, user): the no-CRF figures stay stage 1's (its masks after a resume)."""
    s = loop.s
    raws, infos = raws or masks, [{}] * len(masks)
    for r in range(first_round, s.tokens.rounds):
        state = run_steps(loop, loop.stages.token_step, state, loop.stages.place_masks(masks),
                          s.tokens.round_steps(r), "token")
        prev = masks
        if s.mode == "em":
            masks, raws, infos = e_step(loop, state, r + 1, prev)
        record_round(loop, r + 1, masks, raws, prev, infos, "token")
        save(loop, loop.done, {"stage": "token", "round": r + 1}, state, masks)
    if s.mode == "em" and s.tokens.rounds:  # the final masks: a ground-truth-free rule over the rounds (settle)
        masks = [settled_masks(job, s.tokens.rounds) for job in loop.jobs]
    return state, masks


def settled_masks(job, n_rounds: int) -> np.ndarray:
    """The masks `settle.final_round` picks among rounds 0..n_rounds, read back from the round PNGs (so a
    resumed run chooses as an uninterrupted one)."""
    rounds = runfolder.round_masks(job.run_dir, job.setup, n_rounds)
    return rounds[settle.final_round(rounds)]


def stage_refit(loop: Loop, state, masks, resumed: bool):
    """`tokens.refit`: the token stage once more, from its start (the round-0 checkpoint: the rows after stage 1
    with a fresh optimiser, so the same draws as the first time), on the final masks, fixed; a checkpoint every
    `tokens.estep_every` steps. Returns the token state the joint stage starts from."""
    s = loop.s
    first = s.init.steps + s.tokens.steps
    if not resumed:
        masks_shape = (len(loop.jobs),) + np.shape(masks[0])
        index = checkpoints.steps_by_round(loop.mngr)[0]
        state = checkpoints.restore(loop.mngr, index, loop.stages.initial_state(), masks_shape)[1]
    placed = loop.stages.place_masks(masks)
    while loop.done < first + s.refit_steps:
        n = min(s.tokens.estep_every - (loop.done - first) % s.tokens.estep_every, first + s.refit_steps - loop.done)
        state = run_steps(loop, loop.stages.token_step, state, placed, n, "refit")
        save(loop, loop.done, {"stage": "refit", "round": s.tokens.rounds}, state, masks)
    return state


def stage_joint(loop: Loop, state, masks, resumed: bool):
    """Stage 3: tokens and UNet (and text encoder) tuned with the masks fixed; checkpoints every
    `joint.checkpoint_every` steps and a final one holding the results. Returns the final state."""
    s, stages = loop.s, loop.stages
    if s.joint.steps:
        state = state if resumed else stages.joint_state(state)
        step, placed = stages.joint_step(state), stages.place_masks(masks)
        every = s.joint.checkpoint_every or s.joint.steps
        while loop.done < s.total_steps:
            n = min(every - (loop.done - s.init.steps - s.tokens.steps - s.refit_steps) % every,
                    s.total_steps - loop.done)
            state = run_steps(loop, step, state, placed, n, "joint")
            if loop.done < s.total_steps:
                save(loop, loop.done, {"stage": "joint", "round": s.tokens.rounds}, state, masks)
    # without a joint stage the result is what the token stage hands on (its rows' average with tokens.ema)
    final = {"params": dict(state["params"], rows=steps.handed_rows(state))}
    save(loop, s.total_steps + 1, {"stage": "done", "round": s.tokens.rounds}, final, masks)
    return final


def run_steps(loop: Loop, step_fn, state, masks_placed, n: int, stage: str):
    """n steps; every `log_every`-th (counted over all stages) is checked and written to the metrics."""
    for _ in range(n):
        _check_stop(loop)
        state, m = step_fn(state, masks_placed)
        loop.done += 1
        loop.bar.update(loop.stages.jobs)
        if loop.done % loop.s.log_every == 0:
            per_job = loop.stages.job_metrics(m)  # the host reads the device only here
            for j, mm in enumerate(per_job):
                if not all(np.isfinite(v) for v in mm.values()):
                    last = loop.mngr.latest_step()
                    raise TrainingError(
                        f"{f'job {j}: ' if len(per_job) > 1 else ''}the loss became {mm.get('loss')} during "
                        f"{stage} step {loop.done}. Stopped; the last good checkpoint "
                        f"({'none' if last is None else f'index {last}'}) is kept. Lower the learning rate "
                        "and start again on the same --out to resume from it.")
                loop.metrics[j].write({"stage": stage, "step": loop.done, **mm})
            loop.bar.set_postfix({k: f"{np.mean([mm[k] for mm in per_job]):.4g}" for k in per_job[0]
                                  if k.startswith("loss")})
    return state


def e_step(loop: Loop, state, r: int, prevs=None):
    """Masks of every job from its current rows: ([masks C x H x W], [without CRF], [info]); `prevs`, the
    last round's masks per job, feed the settling rules (`settle`)."""
    s, stages = loop.s, loop.stages
    rows = stages.rows(state)
    key = jax.random.fold_in(loop.keys["estep"], 0 if s.masks.same_noise else r)
    got = []
    for j, job in enumerate(loop.jobs):
        _check_stop(loop)
        st = job.setup
        rules = estep.MaskRules.of(s.masks, crf_where(s, st.images_u8.shape[1:3], st.latent_hw))
        got.append(estep.estimate_masks(lambda i, k, j=j: stages.maps(j, rows[j], i, k), st, key, rules,
                                        previous=None if prevs is None else prevs[j]))
    return [g[0] for g in got], [g[1] for g in got], [g[2] for g in got]


def record_round(loop: Loop, r: int, masks, raws, prevs, infos, stage: str) -> None:
    for j, job in enumerate(loop.jobs):
        entry = estep.round_metrics(r, masks[j], raws[j], prevs[j], infos[j], job.setup.concepts.tokens, job.truth,
                                    estep.tied_concepts(job.setup))
        loop.metrics[j].write(dict(entry, index=loop.done, stage=stage))
        runfolder.save_round_masks(job.run_dir, job.setup, outputs.file_names(job.setup.concepts.tokens), r, masks[j])


def save(loop: Loop, index: int, meta: dict, state, masks) -> None:
    if not np.all(np.isfinite(np.asarray(distributed.to_host(state["params"]["rows"])))):
        raise TrainingError("the concept embeddings are no longer finite; not saving them. Lower the "
                            "learning rate; the last good checkpoint is kept.")
    checkpoints.save(loop.mngr, index, meta, state, np.stack(masks))
    if loop.on_checkpoint is not None:
        loop.on_checkpoint(dict(meta, index=index))


def start_folder(s: settings.Settings, specs, folder: str, retrain: bool = False) -> dict:
    """Checks before any model load or write: the folder a run folder (or new, or empty), the inputs present,
    the folder's fingerprint (if it holds a run) the same, a finished run not trained again unless `retrain`.
    Returns the fingerprint; prints what the user should know (masks used only for measuring, a fresh start)."""
    fp = runfolder.fingerprint(s, specs)
    note = runfolder.check_fingerprint(folder, fp, retrain)  # before check_writable writes its probe
    outputs.check_writable(folder)
    _say([note, masks_note(s, specs)])
    return fp


def masks_note(s: settings.Settings, specs) -> str | None:
    """What masks given with '@' are for outside mode "user": measuring only."""
    given = [c.token for spec in specs for c in spec.concepts if c.mask]
    if not given or s.mode == "user":
        return None
    return (f"the masks given with '@' ({', '.join(given[:6])}{', ...' if len(given) > 6 else ''}) only measure the "
            f"learned masks (IoU) in mode {s.mode!r}: the learner finds its own. To train on them, add "
            "--config.mode=user.")


def _missing_dirs(folder: str) -> list[str]:
    """`folder` and its parents that do not exist yet, deepest first."""
    out, path = [], os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        out.append(path)
        path = os.path.dirname(path)
    return out


@contextlib.contextmanager
def guarded_folder(folder: str):
    """Around a run: a folder that it made and left empty (an early error, Ctrl-C while loading) is removed;
    a full disk, wherever it shows (Orbax, a PNG, metrics), is one `checkpoints.DiskFullError` that says
    what is kept and what to do."""
    made = _missing_dirs(folder)
    try:
        yield
    except BaseException as e:
        if distributed.is_primary():
            for path in made:
                try:
                    os.rmdir(path)  # only when empty
                except OSError:
                    break
        if checkpoints.is_disk_full(e):
            raise checkpoints.DiskFullError(disk_full_message(folder, e)) from None
        raise


def disk_full_message(folder: str, e: BaseException) -> str:
    detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    try:
        last = max(checkpoints.saved_steps(folder), default=None)
    except OSError:
        last = None
    free = None if isinstance(e, checkpoints.DiskFullError) else checkpoints.free_bytes(folder)
    return (f"the disk holding {folder!r} is full ({detail}"
            + ("" if free is None else f"; {free / 2**20:.1f} MiB free") + "). "
            + ("Nothing was saved yet" if last is None else f"What was saved is kept: the last checkpoint is {last}")
            + ". Free some space and start the same command again: it resumes from there.")


def learn(cfg, specs, run_dir: str, *, bundle: ModelBundle | None = None, mesh=None,
          on_checkpoint: Callable[[dict], None] | None = None, ground_truth=None, progress: bool = True,
          retrain: bool = False) -> dict:
    """Run every stage into `run_dir` (resuming from its checkpoints) and return the summary.

    ground_truth: optional C x H x W masks, only *measured* against (benchmarks); never used for training.
    on_checkpoint(meta): called after each checkpoint (notebooks; tests interrupt a run with it).
    retrain: train again from scratch a finished run whose checkpoints were deleted (refused otherwise).
    """
    t_start = time.time()
    s = settings.resolve(cfg)
    specs = check_inputs(specs)
    with guarded_folder(run_dir):
        fp = start_folder(s, specs, run_dir, retrain)
        with runfolder.locked(run_dir):
            st = prepare(s, specs, bundle)
            stages, st = single_run_stages(s, st, mesh or sharding.make_mesh(fsdp=s.mesh.fsdp))
            return run(s, stages, [Job(run_dir, st, truth_masks(st, ground_truth))], run_dir, fp, progress=progress,
                       on_checkpoint=on_checkpoint, t_start=t_start)[0]
