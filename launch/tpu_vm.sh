#!/usr/bin/env bash
# Run jaxconcept on a Cloud TPU VM (one host, e.g. v4-8, v5litepod-8, v6e-8) or a TPU pod slice (several
# hosts, e.g. v4-32): create it, install, run the learner on every host at once, copy the results back.
# Configured by environment variables; `launch/tpu_vm.sh --help` lists them with their values.
#
#   TPU_NAME=my-tpu ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 launch/tpu_vm.sh all
#   RUN_ARGS='--config configs/em_sd.py --concepts "dog.jpg:<dog>=dog,<room>=room/background"' \
#       DATA=dog.jpg OUT=runs/dog launch/tpu_vm.sh install run fetch
#   DRY_RUN=1 launch/tpu_vm.sh all          # print every gcloud command instead of running it
#   launch/tpu_vm.sh delete                 # a TPU bills until it is deleted
#
# See launch/README.md.

set -euo pipefail

SCRIPT_DIR=${BASH_SOURCE[0]%/*}
[[ "$SCRIPT_DIR" != "${BASH_SOURCE[0]}" ]] || SCRIPT_DIR=.  # started as "bash tpu_vm.sh" inside launch/
SCRIPT_DIR=$(cd "$SCRIPT_DIR" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

TPU_NAME=${TPU_NAME:-jaxconcept-tpu}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
SRC_DIR=${SRC_DIR:-$REPO_ROOT}
DATA=${DATA:-}
REMOTE_DIR=${REMOTE_DIR:-jaxconcept}
VENV=${VENV:-jaxconcept-venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
JAX_PIP=${JAX_PIP:-jax[tpu]}
RUN_CMD=${RUN_CMD:-python -m jaxconcept.train}
RUN_ARGS=${RUN_ARGS:-}
OUT=${OUT:-runs/tpu}
LOCAL_DIR=${LOCAL_DIR:-runs/$TPU_NAME}
FETCH_CHECKPOINTS=${FETCH_CHECKPOINTS:-0}
WORKER=${WORKER:-0}
DRY_RUN=${DRY_RUN:-0}
GCLOUD=${GCLOUD:-gcloud}

usage() {
    cat <<EOF
usage: launch/tpu_vm.sh COMMAND [COMMAND ...]

Commands (run in the order given):
  create    create the TPU VM (gcloud compute tpus tpu-vm create; QUEUED=1: a queued resource)
  install   on every worker (--worker=all): copy the source (SRC_DIR, or clone REPO_URL), make a
            Python $PYTHON_VERSION venv, pip install -U "$JAX_PIP", then pip install -e the source; copy DATA
  upload    copy DATA (local files/folders) into REMOTE_DIR on every worker (install does this too)
  run       start '\$RUN_CMD \$RUN_ARGS --out \$OUT' on every worker at once, detached
            (nohup: a dropped connection does not stop it), one log per worker, then wait for it
  wait      wait for a started run again (streams worker 0's log), then check every worker's exit status
  logs      the last lines of every worker's log
  fetch     copy \$OUT (without checkpoints/ unless FETCH_CHECKPOINTS=1) and worker 0's log from worker 0
            into LOCAL_DIR (gcloud compute tpus tpu-vm scp --recurse)
  ssh       a shell on worker WORKER, or 'ssh -- CMD...' runs CMD there
  delete    delete the TPU VM (it bills until deleted)
  all       create install run fetch (does not delete)

Environment (current value):
  TPU_NAME          TPU VM name                                      ($TPU_NAME)
  ZONE              zone that has ACCELERATOR_TYPE                   ($ZONE)
  ACCELERATOR_TYPE  v4-8, v5litepod-8, v6e-8 (one host); v4-32, v5litepod-16, ... (a pod slice: several
                    hosts, every one runs the same program)         ($ACCELERATOR_TYPE)
  RUNTIME_VERSION   TPU software version; empty: from the type (v2-v4: tpu-ubuntu2204-base,
                    v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
                                                                     (${RUNTIME_VERSION:-auto: $(runtime_version_or_unknown)})
  PROJECT           Google Cloud project; empty: gcloud's default   (${PROJECT:-gcloud config default})
  SPOT              1: a spot TPU (cheaper, can be preempted)       ($SPOT)
  QUEUED            1: create through 'queued-resources create' and wait until ACTIVE ($QUEUED)
  REPO_URL          git URL cloned on every worker; empty: SRC_DIR is copied instead (${REPO_URL:-none})
  REPO_REF          branch or tag of REPO_URL                       (${REPO_REF:-default branch})
  SRC_DIR           local source folder copied to the workers       ($SRC_DIR)
  DATA              local files/folders (space separated) copied into REMOTE_DIR, e.g. your images (${DATA:-none})
  REMOTE_DIR        source folder on the workers, relative to home  ($REMOTE_DIR)
  VENV              venv on the workers, relative to home           ($VENV)
  PYTHON_VERSION    Python of the venv (jax needs >= 3.11; fetched with uv if missing) ($PYTHON_VERSION)
  JAX_PIP           JAX requirement installed first                 ($JAX_PIP)
  RUN_CMD           the program run on every worker, in REMOTE_DIR   ($RUN_CMD)
  RUN_ARGS          its arguments before --out (shell syntax); empty: the toy default (${RUN_ARGS:-none})
  OUT               run folder on the workers, relative to REMOTE_DIR ($OUT)
  LOCAL_DIR         where fetch puts the run folder                 ($LOCAL_DIR)
  FETCH_CHECKPOINTS 1: fetch checkpoints/ too (large with a real model) ($FETCH_CHECKPOINTS)
  WORKER            worker for ssh                                   ($WORKER)
  DRY_RUN           1: print every gcloud command, run nothing      ($DRY_RUN)
  GCLOUD            the gcloud executable                           ($GCLOUD)

Before the first run: gcloud auth login; gcloud config set project PROJECT_ID;
gcloud services enable tpu.googleapis.com. On a pod slice, ssh-add ~/.ssh/google_compute_engine first
(gcloud connects to all workers at once).
EOF
}

# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"  # die, show, run

runtime_version_or_unknown() {
    case "$ACCELERATOR_TYPE" in
        v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
        v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v6e-*) echo v2-alpha-tpuv6e ;;
        *) echo unknown ;;
    esac
}

runtime_version() {
    if [[ -n "$RUNTIME_VERSION" ]]; then
        echo "$RUNTIME_VERSION"
        return
    fi
    local v
    v=$(runtime_version_or_unknown)
    [[ "$v" != unknown ]] || die "no default runtime version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE: set RUNTIME_VERSION (see https://cloud.google.com/tpu/docs/runtimes)"
    echo "$v"
}

note() {
    printf '# %s\n' "$*"
}

check_gcloud() {
    [[ "$DRY_RUN" == 1 ]] && return 0
    command -v "$GCLOUD" >/dev/null 2>&1 || die "'$GCLOUD' (the Google Cloud CLI) is not on PATH. Install it \
(https://cloud.google.com/sdk/docs/install), then: gcloud auth login; gcloud config set project PROJECT_ID. \
Or set DRY_RUN=1 to print the commands without running them."
}

# gcloud ARGS...: shown, then run (not in DRY_RUN)
gc() {
    run "$GCLOUD" "$@"
}

# sets the array `flags` (works in bash 3.2, macOS's)
common_flags() {
    flags=("--zone=$ZONE")
    [[ -z "$PROJECT" ]] || flags+=("--project=$PROJECT")
}

tpu_ssh() {  # tpu_ssh WORKER SCRIPT
    local flags
    common_flags
    gc compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--worker=$1" "--command=$2"
}

# A line for remote scripts that enters REMOTE_DIR (relative to the remote home unless absolute).
cd_remote() {
    # shellcheck disable=SC2016  # $HOME expands on the worker
    printf 'cd "$HOME" || exit 1\ncd %q || { echo "$(hostname): no %q: run launch/tpu_vm.sh install first" >&2; exit 1; }\n' \
        "$REMOTE_DIR" "$REMOTE_DIR"
}

queued_name() { echo "$TPU_NAME-qr"; }

cmd_create() {
    local flags version
    common_flags
    version=$(runtime_version)
    local extra=()
    [[ "$SPOT" != 1 ]] || extra+=(--spot)
    if [[ "$QUEUED" == 1 ]]; then
        gc compute tpus queued-resources create "$(queued_name)" "--node-id=$TPU_NAME" "${flags[@]}" \
            "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$version" ${extra[@]+"${extra[@]}"}
        note "waiting for the queued resource $(queued_name) to become ACTIVE (can take long when capacity is short)"
        local state=""
        while true; do
            if [[ "$DRY_RUN" == 1 ]]; then
                show "$GCLOUD" compute tpus queued-resources describe "$(queued_name)" "${flags[@]}" "--format=value(state.state)"
                note "(dry run: taken as ACTIVE)"
                break
            fi
            state=$("$GCLOUD" compute tpus queued-resources describe "$(queued_name)" "${flags[@]}" \
                "--format=value(state.state)")
            note "state: $state"
            case "$state" in
                ACTIVE) break ;;
                FAILED | SUSPENDED) die "queued resource $(queued_name) is $state; delete it with: launch/tpu_vm.sh delete" ;;
            esac
            sleep 30
        done
    else
        gc compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" "--accelerator-type=$ACCELERATOR_TYPE" \
            "--version=$version" ${extra[@]+"${extra[@]}"}
    fi
}

cmd_upload() {
    [[ -n "$DATA" ]] || { note "DATA is empty: nothing to upload"; return 0; }
    local flags items=()
    common_flags
    read -r -a items <<<"$DATA"
    local item
    for item in "${items[@]}"; do
        [[ "$DRY_RUN" == 1 || -e "$item" ]] || die "DATA names '$item', which does not exist here"
    done
    gc compute tpus tpu-vm scp --recurse "${items[@]}" "$TPU_NAME:$REMOTE_DIR/" "${flags[@]}" --worker=all
}

cmd_install() {
    local flags script source_step
    common_flags
    if [[ -n "$REPO_URL" ]]; then
        local branch=""
        [[ -z "$REPO_REF" ]] || branch="--branch $(printf %q "$REPO_REF")"
        source_step=$(cat <<EOF
if [ -d $(printf %q "$REMOTE_DIR")/.git ]; then git -C $(printf %q "$REMOTE_DIR") pull --ff-only;
else git clone --depth 1 $branch $(printf %q "$REPO_URL") $(printf %q "$REMOTE_DIR"); fi
EOF
)
    else
        [[ -f "$SRC_DIR/pyproject.toml" ]] || die "SRC_DIR=$SRC_DIR is not the jaxconcept source (no pyproject.toml); set SRC_DIR or REPO_URL"
        local tarball
        tarball="${TMPDIR:-/tmp}/jaxconcept-src-$TPU_NAME.tar.gz"
        run tar -C "$SRC_DIR" -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./venv \
            --exclude=./runs --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache .
        gc compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxconcept-src.tar.gz" "${flags[@]}" --worker=all
        run rm -f "$tarball"
        source_step="mkdir -p $(printf %q "$REMOTE_DIR") && tar -xzf jaxconcept-src.tar.gz -C $(printf %q "$REMOTE_DIR") && rm jaxconcept-src.tar.gz"
    fi
    script=$(cat <<EOF
set -euo pipefail
cd "\$HOME"
$source_step
VENV=$(printf %q "$VENV")
PY=$(printf %q "$PYTHON_VERSION")
if [ ! -x "\$VENV/bin/python" ]; then
  if command -v "python\$PY" >/dev/null && "python\$PY" -m venv "\$VENV" 2>/dev/null; then :
  else
    # the image's Python is older than jax needs: a standalone Python through uv
    export PATH="\$HOME/.local/bin:\$PATH"
    command -v uv >/dev/null || python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh
    rm -rf "\$VENV"
    uv venv --seed --python "\$PY" "\$VENV"
  fi
fi
"\$VENV/bin/python" -m pip install -q -U pip
"\$VENV/bin/python" -m pip install -q -U $(printf %q "$JAX_PIP")
"\$VENV/bin/python" -m pip install -q -e $(printf %q "$REMOTE_DIR")
"\$VENV/bin/python" -c "import jax, jaxconcept; print('worker', '\$(hostname)', 'jax', jax.__version__, 'ready')"
EOF
)
    tpu_ssh all "$script"
    [[ -z "$DATA" ]] || cmd_upload
}

cmd_run() {
    local script
    # The run script goes to the workers verbatim (a quoted here-document), so RUN_ARGS keeps its shell quoting.
    script=$(cat <<EOF
set -euo pipefail
$(cd_remote)
mkdir -p logs
if [ -f logs/train.pid ] && kill -0 "\$(cat logs/train.pid)" 2>/dev/null; then
  echo "\$(hostname): a run is still going (pid \$(cat logs/train.pid)); wait for it (launch/tpu_vm.sh wait) or kill it" >&2
  exit 1
fi
W=\$(curl -s -m 5 -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || true)
case "\$W" in ''|*[!0-9]*) W=\$(hostname) ;; esac
cat > logs/run.sh <<'JAXCONCEPT_RUN_EOF'
source "\$HOME"/$(printf %q "$VENV")/bin/activate
$(cd_remote)
export PYTHONUNBUFFERED=1
$RUN_CMD $RUN_ARGS --out $(printf %q "$OUT")
echo \$? > logs/train.rc
JAXCONCEPT_RUN_EOF
rm -f logs/train.rc
ln -sf "train-w\$W.log" logs/train.log
nohup setsid bash logs/run.sh > "logs/train-w\$W.log" 2>&1 < /dev/null &
echo \$! > logs/train.pid
echo "worker \$W (\$(hostname)): started pid \$(cat logs/train.pid), log $(printf %q "$REMOTE_DIR")/logs/train-w\$W.log"
EOF
)
    tpu_ssh all "$script"
    cmd_wait
}

cmd_wait() {
    local follow check
    follow=$(cat <<EOF
$(cd_remote)
[ -f logs/train.pid ] || { echo "no run was started on this worker (launch/tpu_vm.sh run)" >&2; exit 1; }
tail -n +1 -F logs/train.log --pid="\$(cat logs/train.pid)" 2>/dev/null || true
EOF
)
    check=$(cat <<EOF
$(cd_remote)
while kill -0 "\$(cat logs/train.pid)" 2>/dev/null; do sleep 10; done
rc=\$(cat logs/train.rc 2>/dev/null || echo "none (the process was killed)")
echo "\$(hostname): exit status \$rc"
if [ "\$rc" != 0 ]; then tail -n 20 logs/train.log; exit 1; fi
EOF
)
    note "following worker 0's log (Ctrl-C stops following, not the run; 'launch/tpu_vm.sh wait' resumes)"
    tpu_ssh 0 "$follow" || true
    tpu_ssh all "$check" || die "the run failed on at least one worker (see above; launch/tpu_vm.sh logs)"
    [[ "$DRY_RUN" == 1 ]] || note "run finished on every worker; next: launch/tpu_vm.sh fetch"
}

cmd_logs() {
    tpu_ssh all "$(cd_remote)
echo \"== \$(hostname)\"; tail -n 30 logs/train.log"
}

cmd_fetch() {
    local flags name stage
    common_flags
    name=$(basename -- "$OUT")
    stage=".jaxconcept-fetch"
    local drop
    drop="rm -rf $(printf %q "$stage/$name")/checkpoints"
    [[ "$FETCH_CHECKPOINTS" != 1 ]] || drop=":"
    # hard links: a staging copy of the run folder costs no space; checkpoints/ left out unless asked for
    tpu_ssh 0 "set -euo pipefail
$(cd_remote)
rm -rf $stage && mkdir -p $stage
cp -al $(printf %q "$OUT") $(printf %q "$stage/$name")
$drop
cp logs/train.log $(printf %q "$stage/$name")/train-worker0.log 2>/dev/null || true"
    run mkdir -p "$LOCAL_DIR"
    local remote_path="$REMOTE_DIR/$stage/$name"
    gc compute tpus tpu-vm scp --recurse "$TPU_NAME:$remote_path" "$LOCAL_DIR/" "${flags[@]}" --worker=0
    [[ "$DRY_RUN" == 1 ]] || note "fetched into $LOCAL_DIR/$name (masks_evolution.png, overlays/, concepts.safetensors, unet/, summary.json)"
}

cmd_ssh() {
    local flags
    common_flags
    if [[ $# -gt 0 ]]; then
        tpu_ssh "$WORKER" "$*"
    else
        gc compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--worker=$WORKER"
    fi
}

cmd_delete() {
    local flags
    common_flags
    if [[ "$QUEUED" == 1 ]]; then
        gc compute tpus queued-resources delete "$(queued_name)" "${flags[@]}" --force --quiet
    else
        gc compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" --quiet
    fi
}

main() {
    if [[ $# -eq 0 ]]; then
        usage >&2
        exit 2
    fi
    case "$1" in -h | --help | help) usage; exit 0 ;; esac
    [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "TPU_NAME='$TPU_NAME': use lower-case letters, digits and hyphens, starting with a letter"
    local commands=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            all) commands+=(create install run fetch) ;;
            create | install | upload | run | wait | logs | fetch | delete) commands+=("$1") ;;
            ssh)
                shift
                [[ "${1:-}" != -- ]] || shift
                commands+=(ssh)
                SSH_ARGS=("$@")
                break
                ;;
            *) die "unknown command '$1' (see launch/tpu_vm.sh --help)" ;;
        esac
        shift
    done
    check_gcloud
    [[ "$DRY_RUN" != 1 ]] || note "DRY_RUN=1: the commands, none run (this output is a shell script)"
    local c
    for c in "${commands[@]}"; do
        note "== $c ($TPU_NAME, $ACCELERATOR_TYPE, $ZONE)"
        case "$c" in
            ssh) cmd_ssh ${SSH_ARGS[@]+"${SSH_ARGS[@]}"} ;;
            *) "cmd_$c" ;;
        esac
    done
}

SSH_ARGS=()
main "$@"
