"""Noise schedulers: DDPM for training, and the sampling schedulers (DDIM, PNDM, DPM-Solver++) by name, each built
from a model's scheduler config."""

from __future__ import annotations

import inspect

from diffusers import FlaxDDIMScheduler, FlaxDDPMScheduler, FlaxDPMSolverMultistepScheduler, FlaxPNDMScheduler


def _accepted(cls, config: dict) -> dict:
    # SD folders ship e.g. a PNDM config; keep the keys this class takes (betas, steps, prediction type)
    names = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in dict(config or {}).items() if k in names and k != "dtype"}


def ddpm_scheduler(config: dict | None = None):
    """(scheduler, state) for the training noise schedule."""
    sched = FlaxDDPMScheduler(**_accepted(FlaxDDPMScheduler, config))
    return sched, sched.create_state()


def ddim_scheduler(config: dict):
    sched = FlaxDDIMScheduler(**_accepted(FlaxDDIMScheduler, config))
    return sched, sched.create_state()


def pndm_scheduler(config: dict):
    # SD's own pipelines run PNDM as PLMS without the Runge-Kutta warm-up (skip_prk_steps=True)
    sched = FlaxPNDMScheduler(**{"skip_prk_steps": True, **_accepted(FlaxPNDMScheduler, config)})
    return sched, sched.create_state()


def dpm_solver_scheduler(config: dict):
    """DPM-Solver++ (2nd order, multistep), as diffusers' SD pipelines configure it."""
    kwargs = {**_accepted(FlaxDPMSolverMultistepScheduler, config), "algorithm_type": "dpmsolver++",
              "solver_order": 2}
    sched = FlaxDPMSolverMultistepScheduler(**kwargs)
    return sched, sched.create_state()


_INFERENCE = {"ddim": ddim_scheduler, "pndm": pndm_scheduler, "dpm++": dpm_solver_scheduler}


INFERENCE_SCHEDULERS = tuple(_INFERENCE)


_ALIASES = {"dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpm": "dpm++", "plms": "pndm"}


def scheduler_name(name: str) -> str:
    """The canonical name of a sampling scheduler (aliases accepted); ValueError for an unknown one."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _INFERENCE:
        raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(INFERENCE_SCHEDULERS)}")
    return key


def inference_scheduler(name: str, config: dict):
    """(scheduler, state) of a sampling scheduler built from a model's scheduler config."""
    return _INFERENCE[scheduler_name(name)](config)
