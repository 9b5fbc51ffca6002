#!/usr/bin/env bash
# Issue 29's GPU figures in one short run on a lent GPU machine (no index reachable there):
#   1. the speed of the four steps on SD 1.5 in bfloat16, ours beside PyTorch diffusers' on the same GPU;
#   2. the device allocator's own peak while each real step runs once (token step, E-step pass, joint step: full
#      fp32 AdamW, LoRA rank 4, bf16), beside XLA's planned figures (`bench.memory --target gpu --execute`).
# Here first: launch/device_wheels.sh (fills .whl/). Then, through the `device` tool, from the repository root:
#   run(command="bash launch/gpu_check.sh", carry=[".whl"], timeout_s=600)
# What it writes lands in $OUT (speed.json, memory.json, memory.md and the logs). Each part has its own time limit
# and keeps what it finished: memory.json is written after every entry, most wanted first.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    ls .whl/pydensecrf2-*.tar.gz > /dev/null 2>&1 && { python3 -m pip install -q --no-index --no-deps \
        --no-build-isolation --target /tmp/site .whl/pydensecrf2-*.tar.gz || echo "pydensecrf not built here"; }
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, diffusers, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
crf=host
python3 -c "import pydensecrf.densecrf" 2> /dev/null || crf=device-latent  # the exact CRF in JAX instead
timeout "${SPEED_S:-270}" python3 -m jaxconcept.bench.speed --config sd15 --dtype bfloat16 --crf "$crf" \
    --out "$OUT" 2>&1 | tee "$OUT/speed.log"
timeout "${MEMORY_S:-240}" python3 -m jaxconcept.bench.memory --presets sd15 --target gpu --execute \
    --programs joint:fp32+lora4,token:fp32,estep:fp32,joint:bf16_lora4+bf16,token:bf16,estep:bf16 \
    --out "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log"
ls -la "$OUT"
