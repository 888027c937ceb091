#!/usr/bin/env bash
# Launch mom-train on several nodes with DeepSpeed's own launcher (`deepspeed --hostfile ...`).
#
#   launchers/deepspeed_multinode.sh --hostfile launchers/hostfile -- --config configs/mom-small.yaml
#   MASTER_ADDR=10.0.0.11 launchers/deepspeed_multinode.sh --hostfile hosts --num_nodes 2 -- --config ...
#
# DeepSpeed reaches every node over passwordless ssh (pdsh by default) and starts
# `python -u <repo>/mom_dist/cli/train.py --local_rank=K ...` once per slot; each rank gets
# RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which mom_dist/parallel/runtime.py reads.
# The repository and its venv must exist at the same path on every node.
#
# We pass --master_addr explicitly (default: the first host of the hostfile) instead of letting
# DeepSpeed ssh to that host and take the first address of `hostname -I`, which may be an
# interface the other nodes cannot reach. The hostfile is checked here, before anything starts.
#
# Options (before `--`):  --hostfile FILE  DeepSpeed hostfile, lines `host slots=N` (or HOSTFILE=)
#                         --master_addr A  rendezvous address (or MASTER_ADDR=); default: first host
#                         --master_port P  rendezvous port (or MASTER_PORT=); default 29500
#                         --node_rank K    no-ssh mode: run this command on every node yourself
#                                          (K = the node's line in the hostfile, from 0); each
#                                          starts only its own ranks (deepspeed --no_ssh)
#                         any other DeepSpeed launcher option is passed through unchanged:
#                           --ssh_port P, --include/-i H:S, --exclude/-e H:S, --num_nodes N,
#                           --num_gpus K, --launcher pdsh|openmpi|mvapich|slurm, --launcher_args A,
#                           --no_ssh_check, --force_multi, --enable_each_rank_log DIR, ...
# Everything after `--` goes to mom-train. Environment: DEEPSPEED (default: `deepspeed` on PATH),
# TRAIN_SCRIPT (default: <repo>/mom_dist/cli/train.py), DRY_RUN=1 (print the command, do not run).
#
# Remote ranks get only the variables DeepSpeed forwards (PYTHON*, NCCL*/accelerator ones, and
# those in .deepspeed_env). We write a .deepspeed_env for this launch (DS_ENV_FILE, in a temporary
# directory) holding your ~/.deepspeed_env and ./.deepspeed_env lines plus PATH, LD_LIBRARY_PATH,
# TORCH_EXTENSIONS_DIR, OMP_NUM_THREADS and *_SOCKET_IFNAME as set here: a remote shell's
# minimal PATH finds the system ninja instead of the venv's, and DeepSpeed then rebuilds its JIT
# op on every node (+166 s measured). PYTHONUNBUFFERED=1 keeps every rank's log line-buffered.
set -euo pipefail

die() { echo "launchers/deepspeed_multinode.sh: error: $*" >&2; exit 2; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

HOSTFILE="${HOSTFILE:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
NODE_RANK="${NODE_RANK:-}"
PASS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile|-H) [[ $# -ge 2 ]] || die "$1 needs a value"; HOSTFILE="$2"; shift 2 ;;
        --master_addr) [[ $# -ge 2 ]] || die "$1 needs a value"; MASTER_ADDR="$2"; shift 2 ;;
        --master_port) [[ $# -ge 2 ]] || die "$1 needs a value"; MASTER_PORT="$2"; shift 2 ;;
        --node_rank) [[ $# -ge 2 ]] || die "$1 needs a value"; NODE_RANK="$2"; shift 2 ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
        --) shift; break ;;
        --module|--no_python) die "$1 is not supported here: this script runs mom_dist/cli/train.py" ;;
        --no_ssh|--no_ssh_check|--force_multi|--save_pid|--bind_cores_to_rank|--no_local_rank|--elastic_training)
            PASS+=("$1"); shift ;;
        --*=*) PASS+=("$1"); shift ;;
        -i|-e|--include|--exclude|--num_nodes|--num_gpus|--launcher|--launcher_args|--ssh_port|--enable_each_rank_log|\
        --bind_core_list|--venv_script|--log_level|--autotuning|--min_elastic_nodes|--max_elastic_nodes|--comment|--account)
            [[ $# -ge 2 ]] || die "$1 needs a value"; PASS+=("$1" "$2"); shift 2 ;;
        *) die "unknown option '$1' (training arguments go after '--'; see --help)" ;;
    esac
done

# --- the hostfile: present, readable, well-formed (DeepSpeed would fall back to "local resources
# only" on a missing one and train on this node alone, which is easy to miss in a log).
[[ -n "$HOSTFILE" ]] || die "no hostfile: pass --hostfile FILE (lines 'hostname slots=N'; see launchers/hostfile.example)"
[[ -e "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' does not exist (see launchers/hostfile.example for the format)"
[[ -f "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' is not a regular file"
[[ -r "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' is not readable by $(id -un)"
FIRST_HOST=""
N_HOSTS=0
N_SLOTS=0
LINE_NO=0
while IFS= read -r line || [[ -n "$line" ]]; do
    LINE_NO=$((LINE_NO + 1))
    line="${line%%#*}"
    [[ -z "${line//[[:space:]]/}" ]] && continue
    if [[ ! "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]]; then
        die "hostfile '$HOSTFILE' line $LINE_NO: '$line' is not 'hostname slots=N'"
    fi
    [[ -n "$FIRST_HOST" ]] || FIRST_HOST="${BASH_REMATCH[1]}"
    N_HOSTS=$((N_HOSTS + 1))
    N_SLOTS=$((N_SLOTS + BASH_REMATCH[2]))
done < "$HOSTFILE"
[[ "$N_HOSTS" -gt 0 ]] || die "hostfile '$HOSTFILE' lists no hosts (lines 'hostname slots=N')"
MASTER_ADDR="${MASTER_ADDR:-$FIRST_HOST}"
if [[ -n "$NODE_RANK" ]]; then
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$N_HOSTS" ]] \
        || die "--node_rank $NODE_RANK must be 0..$((N_HOSTS - 1)) (the node's line in '$HOSTFILE')"
    PASS+=(--no_ssh --node_rank "$NODE_RANK")
fi
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT='$MASTER_PORT' must be a port number"
[[ $# -gt 0 ]] || die "no training arguments after '--' (e.g. -- --config configs/mom-small.yaml)"

DEEPSPEED="${DEEPSPEED:-deepspeed}"
command -v "$DEEPSPEED" >/dev/null 2>&1 || die "'$DEEPSPEED' not found; activate the venv or set DEEPSPEED=/path/to/deepspeed"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-$REPO/mom_dist/cli/train.py}"
[[ -f "$TRAIN_SCRIPT" ]] || die "training script '$TRAIN_SCRIPT' does not exist"

export PYTHONUNBUFFERED=1
# This launch's .deepspeed_env (see the header): the user's lines first, then ours win.
DS_ENV_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mom-ds-env.XXXXXX")"
export DS_ENV_FILE="$DS_ENV_DIR/.deepspeed_env"
for f in "$HOME/.deepspeed_env" "./.deepspeed_env"; do
    if [[ -f "$f" ]]; then grep -v '^\(PATH\|LD_LIBRARY_PATH\|TORCH_EXTENSIONS_DIR\|OMP_NUM_THREADS\)=' "$f" >> "$DS_ENV_FILE" || true; fi
done
for v in PATH LD_LIBRARY_PATH TORCH_EXTENSIONS_DIR OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME \
         TORCH_NCCL_ASYNC_ERROR_HANDLING; do
    if [[ -n "${!v:-}" ]]; then printf '%s=%s\n' "$v" "${!v}" >> "$DS_ENV_FILE"; fi
done
touch "$DS_ENV_FILE"

CMD=("$DEEPSPEED" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     "${PASS[@]}" "$TRAIN_SCRIPT" "$@")
echo "launchers/deepspeed_multinode.sh: $N_HOSTS hosts, $N_SLOTS slots, MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" >&2
echo "launchers/deepspeed_multinode.sh: ${CMD[*]}" >&2
echo "launchers/deepspeed_multinode.sh: DS_ENV_FILE=$DS_ENV_FILE: $(cut -d= -f1 "$DS_ENV_FILE" | tr '\n' ' ')" >&2
if [[ "${DRY_RUN:-0}" == 1 ]]; then rm -rf "$DS_ENV_DIR"; exit 0; fi
# Not exec: remove the temporary env file afterwards and keep deepspeed's exit status. INT/TERM
# go on to deepspeed, which stops every rank (it sends them SIGINT, then SIGTERM).
set +e
"${CMD[@]}" &
CHILD=$!
trap 'kill -TERM "$CHILD" 2>/dev/null' TERM
trap 'kill -INT "$CHILD" 2>/dev/null' INT
while true; do
    wait "$CHILD"
    STATUS=$?
    if ! kill -0 "$CHILD" 2>/dev/null; then break; fi
done
rm -rf "$DS_ENV_DIR"
exit "$STATUS"
