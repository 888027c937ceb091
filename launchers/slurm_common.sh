# Shared by launchers/slurm.sbatch and launchers/slurm_torchrun.sbatch (sourced after they found
# REPO; they set LAUNCHER, die and SIGNALLED first): the signal handlers, venv and mom-train,
# environment, rendezvous address/port, log dir and exit record, `run_step CMD...` (starts the
# job step unless a signal came first, waits for it) and `finish_job STATUS`, which maps the
# run's exit status to requeue / success / failure.
# shellcheck shell=bash

# --- signals. USR1 (`--signal=B:USR1@120`: time limit close, or `scancel --batch --signal=USR1`)
# comes to this shell only: pass it on to srun, which signals every task. TERM (preemption,
# scancel) reaches every task from SLURM itself: wait for their checkpoint. A signal that came
# before these were installed was noted in SIGNALLED by the script's first lines.
SRUN_PID=""
REQUEUED=""
on_usr1() {
    SIGNALLED=USR1
    echo "$LAUNCHER: SIGUSR1 (time limit close or scancel --batch): the tasks save and leave" >&2
    if [[ -n "$SRUN_PID" ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
on_term() {
    if [[ -n "$REQUEUED" ]]; then return; fi   # SLURM ending this run of a job we requeued ourselves
    SIGNALLED=TERM
    echo "$LAUNCHER: SIGTERM: waiting for the tasks to save" >&2
}
trap on_usr1 USR1
trap on_term TERM
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


# requeue_job: ask SLURM to requeue this job; succeeds when it is requeued (by us, or already by
# SLURM itself), else sets REQUEUE_ERROR. Two ways a requeue that worked was reported failed:
# - a partition preemption (PreemptMode=REQUEUE): SLURM requeues the job itself when it sends
#   the SIGTERM, so our own `scontrol requeue` then fails ("Job is pending execution"): one more
#   restart in the job's record is the answer that counts;
# - as soon as slurmctld accepts our requeue it signals every process of this batch step (then
#   kills it): a scontrol that had not exited yet died of that SIGTERM (143). It runs with TERM
#   ignored, and the record is parsed here in bash (no sed to be killed).
REQUEUE_ERROR=""
requeue_job() {
    REQUEUED=1   # the SIGTERM SLURM now sends this run is the requeue at work, not a preemption
    if REQUEUE_ERROR="$( (trap '' TERM; exec scontrol requeue "$SLURM_JOB_ID") 2>&1 )"; then return 0; fi
    local record
    record="$( (trap '' TERM; exec scontrol -o show job "$SLURM_JOB_ID") 2>/dev/null || true)"
    if [[ "$record" =~ \ Restarts=([0-9]+) && "${BASH_REMATCH[1]}" -gt "$RESTARTS" ]]; then
        echo "$LAUNCHER: job $SLURM_JOB_ID is requeued (restart ${BASH_REMATCH[1]})${REQUEUE_ERROR:+; scontrol said: $REQUEUE_ERROR}" >&2
        return 0
    fi
    REQUEUED=""
    REQUEUE_ERROR="${REQUEUE_ERROR:-no message}"
    return 1
}


# finish_job STATUS: rank 0's exit record and srun's status -> requeue, success or failure.
finish_job() {
    local STATUS="$1"
    # Rank 0's own record of a failure wins over srun's status: srun reports the code of a task
    # killed on the way out (a peer, or torchrun's 1 whatever its ranks' codes), not why the run
    # ended. A record of 0 with a failed step keeps the failure.
    RECORD_CODE=""
    CKPT=""
    if [[ -s "$MOM_DIST_EXIT_FILE" ]]; then read -r RECORD_CODE CKPT < "$MOM_DIST_EXIT_FILE" || true; fi
    if [[ "$STATUS" != 0 && "$RECORD_CODE" =~ ^[1-9][0-9]*$ ]]; then STATUS="$RECORD_CODE"; fi
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
            if requeue_job; then exit 0; fi
            echo "$LAUNCHER: error: job $SLURM_JOB_ID was preempted and 'scontrol requeue' failed ($REQUEUE_ERROR)${SIGNALLED:+ (SIG$SIGNALLED: SLURM may be cancelling it)}; $WHERE; resubmit the same command to resume" >&2
            exit 75 ;;
        2) echo "$LAUNCHER: error: job $SLURM_JOB_ID: bad input (exit 2; the mom-train error line above says what to fix); not requeued" >&2; exit 2 ;;
        3) echo "$LAUNCHER: error: job $SLURM_JOB_ID: training diverged (exit 3); not requeued" >&2; exit 3 ;;
        4) echo "$LAUNCHER: error: job $SLURM_JOB_ID: a rank stopped answering (exit 4; named above); not requeued" >&2; exit 4 ;;
        *) echo "$LAUNCHER: error: job $SLURM_JOB_ID: mom-train failed with exit status $STATUS; not requeued" >&2
           exit "$STATUS" ;;
    esac
}
