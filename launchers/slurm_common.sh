# Shared by launchers/slurm.sbatch and launchers/slurm_torchrun.sbatch (sourced after they found
# REPO): venv and mom-train, environment, rendezvous address/port, log dir and exit record, and
# `finish_job STATUS`, which maps mom-train's exit status to requeue / success / failure.
# shellcheck shell=bash
VENV="${VENV:-$REPO/.venv}"
if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
# MOM_TRAIN: the command each task runs (slurm.sbatch: mom-train; slurm_torchrun.sbatch: torchrun)
if [[ -z "${MOM_TRAIN:-}" ]]; then
    if [[ -x "$VENV/bin/$MOM_TRAIN_DEFAULT" ]]; then MOM_TRAIN="$VENV/bin/$MOM_TRAIN_DEFAULT"
    elif command -v "$MOM_TRAIN_DEFAULT" >/dev/null 2>&1; then MOM_TRAIN="$(command -v "$MOM_TRAIN_DEFAULT")"
    else die "$MOM_TRAIN_DEFAULT not found: no venv at '$VENV' (set VENV=/path/to/venv, or run 'make venv' in $REPO) and none on PATH"
    fi
fi
read -r -a MOM_TRAIN_CMD <<< "$MOM_TRAIN"
command -v "${MOM_TRAIN_CMD[0]}" >/dev/null 2>&1 || die "MOM_TRAIN='$MOM_TRAIN': '${MOM_TRAIN_CMD[0]}' not found"
PYTHON="$(command -v python3 || command -v python || true)"
[[ -x "$VENV/bin/python" ]] && PYTHON="$VENV/bin/python"

export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# --- rendezvous. `sed -n 1p` rather than `head -n 1`: head closes the pipe early, scontrol gets
# SIGPIPE, and with pipefail + set -e the script would die silently (141) on a multi-node job.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
[[ -n "$MASTER_ADDR" ]] || die "'scontrol show hostnames $SLURM_JOB_NODELIST' listed no host"
if [[ -z "${MASTER_PORT:-}" ]]; then
    MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' 2>/dev/null || true)"
    [[ -n "$MASTER_PORT" ]] || MASTER_PORT=$((15000 + SLURM_JOB_ID % 30000))
fi
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT='$MASTER_PORT' must be a port number"
export MASTER_ADDR MASTER_PORT

LOG_DIR="${LOG_DIR:-${SLURM_SUBMIT_DIR:-$REPO}/logs}"
mkdir -p "$LOG_DIR" || die "cannot create LOG_DIR='$LOG_DIR'"
export MOM_DIST_EXIT_FILE="$LOG_DIR/mom-train-$SLURM_JOB_ID.exit"
rm -f "$MOM_DIST_EXIT_FILE"

RESTARTS="${SLURM_RESTART_COUNT:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
echo "$LAUNCHER: job $SLURM_JOB_ID (restart $RESTARTS of at most $MAX_RESTARTS)," \
     "${SLURM_JOB_NUM_NODES:-?} nodes, ${SLURM_NTASKS:-?} tasks, MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT," \
     "repo $REPO, $MOM_TRAIN" >&2
for v in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG; do
    if [[ -n "${!v:-}" ]]; then echo "$LAUNCHER: $v=${!v}" >&2; fi
done


# run_step CMD...: start the job step unless a signal came first; wait for it; set STATUS.
run_step() {
    if [[ -n "$SIGNALLED" ]]; then   # signalled before anything started: nothing to save
        echo "$LAUNCHER: SIG$SIGNALLED before the tasks started" >&2
        STATUS=75
        return
    fi
    "$@" &
    SRUN_PID=$!
    # `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for srun.
    set +e
    while true; do
        wait "$SRUN_PID"
        STATUS=$?
        if ! kill -0 "$SRUN_PID" 2>/dev/null; then break; fi
    done
    set -e
}


# finish_job STATUS: rank 0's exit record and srun's status -> requeue, success or failure.
finish_job() {
    local STATUS="$1"
    # rank 0's own record wins over srun's status (srun reports a signal-killed peer's code instead)
    RECORD_CODE=""
    CKPT=""
    if [[ -s "$MOM_DIST_EXIT_FILE" ]]; then read -r RECORD_CODE CKPT < "$MOM_DIST_EXIT_FILE" || true; fi
    if [[ "$STATUS" != 0 && "$RECORD_CODE" == 75 ]]; then STATUS=75; fi
    rm -f "$MOM_DIST_EXIT_FILE"

    case "$STATUS" in
        0) echo "$LAUNCHER: job $SLURM_JOB_ID: mom-train finished" >&2; exit 0 ;;
        75)
            WHERE="${CKPT:+checkpoint $CKPT}"
            WHERE="${WHERE:-no checkpoint yet (the run starts over)}"
            if [[ "$RESTARTS" -ge "$MAX_RESTARTS" ]]; then
                echo "$LAUNCHER: error: job $SLURM_JOB_ID was preempted and is NOT requeued (restarted $RESTARTS times, MAX_RESTARTS=$MAX_RESTARTS); $WHERE; resubmit the same command to resume" >&2
                exit 75
            fi
            echo "$LAUNCHER: requeueing job $SLURM_JOB_ID; it resumes from $WHERE" >&2
            if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
            echo "$LAUNCHER: error: job $SLURM_JOB_ID was preempted and 'scontrol requeue' failed${SIGNALLED:+ (SIG$SIGNALLED: SLURM may be requeueing or cancelling it itself)}; $WHERE; resubmit the same command to resume" >&2
            exit 75 ;;
        3) echo "$LAUNCHER: error: job $SLURM_JOB_ID: training diverged (exit 3); not requeued" >&2; exit 3 ;;
        *) echo "$LAUNCHER: error: job $SLURM_JOB_ID: mom-train failed with exit status $STATUS; not requeued" >&2
           exit "$STATUS" ;;
    esac
}
