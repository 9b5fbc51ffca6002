#!/usr/bin/env bash
# Run jaxconcept on one machine with NVIDIA GPUs (CUDA 12 driver): a venv, JAX for CUDA, the package, a run.
# Run it from anywhere inside the repository checkout on that machine; configured by environment variables.
#
#   launch/gpu_box.sh all                    # install, then the toy default into runs/gpu
#   RUN_ARGS='--config configs/em_sd.py --concepts "dog.jpg:<dog>=dog,<room>=room/background"' \
#       OUT=runs/dog launch/gpu_box.sh run
#   DRY_RUN=1 launch/gpu_box.sh all          # print the commands only
#
# A long run survives a closed terminal inside tmux (tmux new -s jc, then the command; Ctrl-b d detaches).

set -euo pipefail

SCRIPT_DIR=${BASH_SOURCE[0]%/*}
[[ "$SCRIPT_DIR" != "${BASH_SOURCE[0]}" ]] || SCRIPT_DIR=.  # started as "bash gpu_box.sh" inside launch/
SCRIPT_DIR=$(cd "$SCRIPT_DIR" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

VENV=${VENV:-$REPO_ROOT/.venv}
PYTHON=${PYTHON:-python3}
JAX_PIP=${JAX_PIP:-jax[cuda12]}
RUN_ARGS=${RUN_ARGS:-}
OUT=${OUT:-runs/gpu}
LOG=${LOG:-$OUT.log}
DRY_RUN=${DRY_RUN:-0}

usage() {
    cat <<EOF
usage: launch/gpu_box.sh COMMAND [COMMAND ...]

Commands:
  install   make the venv (Python >= 3.11), pip install -U "$JAX_PIP", then pip install -e the repository
  check     print JAX's devices (expect CudaDevice entries)
  run       python -m jaxconcept.train \$RUN_ARGS --out \$OUT in the repository root, output also in LOG
  all       install check run

Environment (current value):
  VENV      the virtual environment        ($VENV)
  PYTHON    Python that creates the venv   ($PYTHON)
  JAX_PIP   JAX requirement: jax[cuda12] (pip-installed CUDA), jax[cuda12-local] (the machine's CUDA),
            jax[cuda13]                    ($JAX_PIP)
  RUN_ARGS  arguments of jaxconcept.train (shell syntax); empty: the toy default (${RUN_ARGS:-none})
  OUT       run folder, relative to the repository root ($OUT)
  LOG       log file                       ($LOG)
  DRY_RUN   1: print the commands, run nothing ($DRY_RUN)
EOF
}

# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"  # die, show, run

cmd_install() {
    if [[ "$DRY_RUN" != 1 ]]; then
        command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found: install Python >= 3.11 or set PYTHON"
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "$PYTHON is Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); jax needs >= 3.11: set PYTHON=python3.11 (or newer)"
        command -v nvidia-smi >/dev/null 2>&1 || echo "warning: nvidia-smi not found: is the NVIDIA driver installed? JAX would fall back to the CPU" >&2
    fi
    [[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/python" -m pip install -q -U pip
    run "$VENV/bin/python" -m pip install -q -U "$JAX_PIP"
    run "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT"
}

cmd_check() {
    run "$VENV/bin/python" -c "import jax; print(jax.devices()); assert jax.default_backend() == 'gpu', 'no GPU: JAX runs on ' + jax.default_backend()"
}

cmd_run() {
    local args=()
    eval "args=($RUN_ARGS)"  # RUN_ARGS is shell syntax: quotes group words as on a command line
    cd "$REPO_ROOT"
    local cmd=("$VENV/bin/python" -m jaxconcept.train ${args[@]+"${args[@]}"} --out "$OUT")
    show "${cmd[@]}"
    [[ "$DRY_RUN" == 1 ]] && return 0
    mkdir -p "$(dirname -- "$LOG")"
    echo "# log: $LOG"
    set +e
    "${cmd[@]}" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    set -e
    [[ $rc == 0 ]] || die "jaxconcept.train failed (exit $rc); starting the same command again resumes from the last checkpoint"
    echo "# results in $REPO_ROOT/$OUT"
}

main() {
    [[ $# -gt 0 ]] || { usage >&2; exit 2; }
    case "$1" in -h | --help | help) usage; exit 0 ;; esac
    local commands=() c
    for c in "$@"; do
        case "$c" in
            all) commands+=(install check run) ;;
            install | check | run) commands+=("$c") ;;
            *) die "unknown command '$c' (see launch/gpu_box.sh --help)" ;;
        esac
    done
    [[ "$DRY_RUN" != 1 ]] || echo "# DRY_RUN=1: the commands, none run"
    for c in "${commands[@]}"; do
        echo "# == $c"
        "cmd_$c"
    done
}

main "$@"
