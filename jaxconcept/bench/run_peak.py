"""A compiled training program run once, in a process of its own, for the device allocator's own peak.

`bench.memory` reads what XLA's buffer assignment plans (`compiled.memory_analysis()`); a GPU or TPU process also
holds what that plan leaves out (the runtime's workspaces, fragmentation, the allocator's rounding). With
`python -m jaxconcept.bench.memory --execute` each entry is compiled and *run* once on placeholder arguments (zeros
of the program's own shapes and dtypes, placed as the compiled program expects them: no weights are needed, and the
values do not change what is allocated), and the device's `memory_stats()` is read: `peak_bytes_in_use` is the most
the allocator held at once. The allocator's peak counts from the process's start, so each entry runs in a fresh
process (spawned), with XLA's preallocation off (`XLA_PYTHON_CLIENT_PREALLOCATE=false`), so that the figure is that
program's alone. The CPU backend keeps no allocator statistics: there the run is done (the program runs on its
inputs) and the peak is left out, with the reason.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time

import jax
import jax.numpy as jnp

NO_STATS = "the {platform} backend keeps no allocator statistics (device.memory_stats() is None)"


def placeholder(info, sharding):
    """Zeros of an argument's shape and dtype (a PRNG key: key 0), on the device(s) the program expects."""
    if jax.dtypes.issubdtype(info.dtype, jax.dtypes.prng_key):
        x = jnp.broadcast_to(jax.random.key(0), info.shape)
    else:
        x = jnp.zeros(info.shape, info.dtype)
    return jax.device_put(x, sharding)


def placeholder_args(lowered, compiled) -> tuple:
    """Positional arguments for `compiled`, built from `lowered.args_info` and `compiled.input_shardings`."""
    infos, _ = lowered.args_info
    shardings, _ = compiled.input_shardings
    flat_infos, tree = jax.tree.flatten(infos)
    return jax.tree.unflatten(tree, [placeholder(i, s) for i, s in zip(flat_infos, jax.tree.leaves(shardings))])


def run_once(lowered, compiled, device) -> dict:
    """Run the compiled program once on placeholder arguments: the seconds it took and the device allocator's
    peak (None on a backend without statistics, with `run_note` saying why)."""
    args = placeholder_args(lowered, compiled)
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    out = {"executed": True, "run_s": round(time.perf_counter() - t0, 3)}
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return dict(out, run_peak_bytes=None, run_bytes_limit=None,
                    run_note=NO_STATS.format(platform=device.platform))
    return dict(out, run_peak_bytes=int(stats["peak_bytes_in_use"]),
                run_bytes_limit=int(stats["bytes_limit"]) if "bytes_limit" in stats else None)


def _measure_executed(preset: str, program: str, option: str, target_name: str) -> dict:
    """In the child: build, lower, compile and run one entry (`bench.memory.measure(..., execute=True)`)."""
    from . import memory

    target = memory.make_target(target_name)
    st = memory.make_setup(memory.PRESETS[preset], option, target)
    return memory.measure(st, program, option, target, memory.fingerprint(st, program, target), execute=True)


def no_preallocation() -> None:
    """XLA's GPU client takes 75% of the device at start unless told not to: a parent holding that would starve
    the children, and the children's peaks would read the pool's size."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def measure_in_fresh_process(preset: str, program: str, option: str, target_name: str) -> dict:
    """One entry measured with its run, in a spawned process of its own (its allocator's peak is its own)."""
    no_preallocation()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # a pool per entry: a process each
        return pool.submit(_measure_executed, preset, program, option, target_name).result()
