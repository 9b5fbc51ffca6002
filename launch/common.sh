# Shared by launch/tpu_vm.sh and launch/gpu_box.sh (sourced; they set DRY_RUN first).

die() {
    echo "error: $*" >&2
    exit 2
}

# Print a command as a copy-pasteable shell line (multi-line arguments in single quotes), after "+ " when it is
# run; in DRY_RUN alone, so that the whole output is a shell script (every other line is a "# " comment).
show() {
    local out="" arg
    [[ "$DRY_RUN" == 1 ]] || out="+ "
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
            out+="$arg "
        else
            out+="'${arg//\'/\'\\\'\'}' "
        fi
    done
    printf '%s\n' "${out% }"
}

# a command with side effects: shown, then run (not in DRY_RUN)
run() {
    show "$@"
    [[ "$DRY_RUN" == 1 ]] && return 0
    "$@"
}
