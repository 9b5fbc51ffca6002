#!/usr/bin/env bash
# Wheels for a lent accelerator machine that cannot reach a package index (the `device` tool's machines: their
# image has jax with CUDA, flax, optax, orbax, torch and peft, but transformers 5, whose Flax models are gone).
# Run here, in the repository root, where pip reaches PyPI; the wheels land in .whl/ (ignored by git), for
# launch/gpu_check.sh to install there. PY: the device's Python version (3.12 on the lent H100 / H200).
set -euo pipefail
PY=${PY:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# the versions pyproject.toml pins, and what transformers 4.57 needs in versions the image does not have
for req in diffusers==0.39.0 transformers==4.57.6 huggingface_hub==0.36.0 tokenizers==0.22.1 ml-collections==1.1.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
        "${platforms[@]}" -d .whl "$req"
done
# pydensecrf2 has no wheel for every Python: its source, built there (gpu_check.sh falls back to the device CRF)
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl pydensecrf2==1.1
du -sh .whl && ls .whl
