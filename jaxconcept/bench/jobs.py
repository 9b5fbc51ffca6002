"""How the token/EM stage's throughput scales with K concept sets learned in one program.

    python -m jaxconcept.bench.jobs --model tiny --k 1,2,4,8 --iters 10
    python -m jaxconcept.bench.jobs --model toy --k 1,2,4,8,16 --out runs/bench_jobs

For each K: K toy scenes (two objects and a background each), one vmapped token step for all of them
(`steps.make_jobs_step`), timed after its compile (median of --iters calls). The reference, measured in
the same run, is the one-job program called K times. Prints job-steps per second and the speed-up over
K separate calls; writes jobs.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import jax
import numpy as np

from .. import config, settings
from ..em import jobs, steps
from ..parallel import sharding
from ..runio import inputs
from ..errors import JaxconceptError
from ..model.loading import load_model
from ..toy import scene
from .speed import time_calls


def scene_jobs(k: int, size: int, folder: str):
    """K one-image jobs from toy scenes (seeds the toy model never trained on), same tokens in each."""
    out = []
    for j in range(k):
        d = os.path.join(folder, f"scene_{j}")
        scene.write_scene(scene.make_scene(30_000_000 + j, size, 2), d)
        out.append((inputs.from_toy_scene_folder(d),))
    # the same structure in every job: rename each job's tokens <o1>, <o2>, <background>
    names = ["<o1>", "<o2>", "<background>"]
    return [(dataclasses.replace(spec, concepts=tuple(
        dataclasses.replace(c, token=n, init_word="background" if c.kind == "background" else None, mask=None)
        for n, c in zip(names, spec.concepts))),) for (spec,) in out]


def measure(model: str, ks, iters: int) -> dict:
    cfg = config.get_config()
    cfg.model = model
    base = load_model(model)
    mesh = sharding.make_mesh()
    tcfg = cfg.tokens
    loss_cfg = steps.LossConfig(batch_size=tcfg.batch_size, attn_weight=tcfg.attn_weight,
                                attn_resolution=tcfg.attn_resolution)
    opt = steps.make_optimizer(tcfg.lr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        all_jobs = scene_jobs(max(ks), base.resolution, tmp)
        setups, b = jobs.prepare_jobs(settings.resolve(cfg), all_jobs, base)
        frozen = sharding.put_replicated({"text_encoder": b.params["text_encoder"], "unet": b.params["unet"]}, mesh)
        hw = setups[0].latent_hw
        masks = [sharding.put_replicated(jax.numpy.asarray(np.ones((len(s.inputs.owner_C),) + hw, np.float32)), mesh)
                 for s in setups]
        # the reference: one job's program (its own tokens), called K times
        one = steps.make_train_step(b, setups[0].concepts.ids, loss_cfg, opt, mesh)
        state1 = sharding.put_replicated(steps.init_state({"rows": jax.numpy.asarray(setups[0].concepts.init_rows)},
                                                          opt), mesh)
        data1 = sharding.put_replicated(setups[0].run_data, mesh)
        key = jax.random.key(0)
        holder = {"s": state1}

        def call_one():
            holder["s"], m = one(holder["s"], frozen, data1, masks[0], key)
            return m["loss"]

        single = time_calls(lambda: jax.block_until_ready(call_one()), iters)
        single_ms, compile_one = single["ms"], single["first_call_s"]
        for k in ks:
            sub = setups[:k]
            run_data, ids = jobs.stacked_inputs(sub, mesh)
            job_sh = steps.job_axis_sharding(mesh, k)
            state = jax.device_put(jobs._stack([steps.init_state({"rows": jax.numpy.asarray(s.concepts.init_rows)}, opt)
                                                for s in sub]), job_sh)
            masks_k = jax.device_put(jax.numpy.stack(masks[:k]), job_sh)
            keys = jax.device_put(jax.numpy.stack([key] * k), job_sh)
            step = steps.make_jobs_step(b, loss_cfg, opt, mesh, k)
            box = {"s": state}

            def call():
                box["s"], m = step(box["s"], frozen, run_data, masks_k, keys, ids)
                return m["loss"]

            timed = time_calls(lambda: jax.block_until_ready(call()), iters)
            ms, compile_s = timed["ms"], timed["first_call_s"]
            rows.append({"k": k, "step_ms": ms, "ms_per_job": ms / k, "job_steps_per_s": 1e3 * k / ms,
                         "separate_ms": single_ms * k, "speedup_vs_separate": single_ms * k / ms,
                         "compile_s": compile_s})
            print(f"K={k:<3} {ms:9.1f} ms/step  {ms / k:8.1f} ms per job  {1e3 * k / ms:7.1f} job-steps/s  "
                  f"x{single_ms * k / ms:5.2f} vs {k} separate calls", flush=True)
    return {"model": model, "devices": [str(d) for d in jax.devices()], "single_job_ms": single_ms,
            "single_compile_s": compile_one, "iters": iters, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.bench.jobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny', 'toy', a folder or a hub id")
    p.add_argument("--k", default="1,2,4,8", help="comma-separated job counts")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="runs/bench_jobs")
    args = p.parse_args(argv)
    try:
        ks = sorted({int(x) for x in args.k.split(",") if x.strip()})
        if not ks or ks[0] < 1:
            raise ValueError
    except ValueError:
        print(f"error: --k takes positive integers separated by commas, got {args.k!r}", file=sys.stderr)
        return 2
    try:
        result = measure(args.model, ks, max(1, args.iters))
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "jobs.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"one job alone: {result['single_job_ms']:.1f} ms/step on {len(result['devices'])} device(s); "
          f"details in {os.path.join(args.out, 'jobs.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
