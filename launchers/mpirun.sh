#!/usr/bin/env bash
# Launch mom-train under MPI: MPICH / Intel MPI (Hydra) or Open MPI, one node or several.
#
#   launchers/mpirun.sh -np 2 -- --config configs/tiny.yaml --set parallel.ep_size=2
#   launchers/mpirun.sh -np 16 --hosts node01,node02 --ppn 8 -- --config configs/mom-small.yaml
#   MASTER_ADDR=10.0.0.11 launchers/mpirun.sh -np 16 --hosts node01,node02 -- --config ...
#
# mom_dist does not use MPI for communication: mpirun only starts the processes. Each rank reads
# its place from the MPI launcher's variables (MPICH: PMI_RANK/PMI_SIZE/MPI_LOCALRANKID; Open MPI:
# OMPI_COMM_WORLD_*; see mom_dist/parallel/runtime.py) and meets the others over torch.distributed
# at MASTER_ADDR:MASTER_PORT. Without them, rank 0 offers its addresses and a free port over
# mpi4py, every rank tests which it can reach, and the first reachable by all wins (no guessing
# from `hostname -I`, as DeepSpeed's MPI discovery does). Where the installed mpi4py belongs to
# another MPI than this mpirun (the mpich wheel under Open MPI), the ranks say so in one line and
# use MASTER_ADDR (127.0.0.1 on one node; required over several hosts) and MASTER_PORT (29500).
# When set, both are exported to every rank (-genv for Hydra, -x for Open MPI).
#
# Open MPI gets --noprefix: called by an absolute path it would otherwise put its own prefix
# (/usr/bin) first on every rank's PATH, and DeepSpeed rebuilds its JIT op for the other ninja.
# Ranks start with USR1/TERM blocked until mom-train has its handlers, and unbuffered output.
#
# Options (before `--`):   -np N          total ranks (or NP=N)
#                          --hosts LIST   comma-separated hosts (or HOSTS=...); default: this node
#                          --ppn K        ranks per host (or PPN=K); default N / number of hosts
# Everything after `--` goes to the training command (default `mom-train`; set MOM_TRAIN to e.g.
# "python tools/train.py"). Environment: MPIRUN (default: `mpirun` on PATH), MASTER_ADDR,
# MASTER_PORT, MPI_EXTRA_ARGS (extra mpirun flags), DRY_RUN=1 (print, do not run).
set -euo pipefail

die() { echo "launchers/mpirun.sh: error: $*" >&2; exit 2; }

NP="${NP:-}"
HOSTS="${HOSTS:-}"
PPN="${PPN:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -np|-n|--np) [[ $# -ge 2 ]] || die "$1 needs a value"; NP="$2"; shift 2 ;;
        --hosts|-hosts) [[ $# -ge 2 ]] || die "$1 needs a value"; HOSTS="$2"; shift 2 ;;
        --ppn|-ppn) [[ $# -ge 2 ]] || die "$1 needs a value"; PPN="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (training arguments go after '--'; see --help)" ;;
    esac
done
[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "-np N is required and must be a positive integer (got '${NP}')"
[[ $# -gt 0 ]] || die "no training arguments after '--' (e.g. -- --config configs/tiny.yaml)"

# Distinct hosts decide single- vs multi-node.
IFS=',' read -r -a HOST_LIST <<< "$HOSTS"
N_HOSTS=$(printf '%s\n' "${HOST_LIST[@]}" | sed '/^$/d' | sort -u | wc -l)
if [[ "$N_HOSTS" -gt 1 && -z "$PPN" ]]; then
    (( NP % N_HOSTS == 0 )) || die "-np $NP does not divide evenly over $N_HOSTS hosts; pass --ppn"
    PPN=$(( NP / N_HOSTS ))
fi
[[ -z "$PPN" || "$PPN" =~ ^[1-9][0-9]*$ ]] || die "--ppn must be a positive integer (got '$PPN')"
[[ -z "${MASTER_PORT:-}" || "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT='$MASTER_PORT' must be a port number"
export PYTHONUNBUFFERED=1

MPIRUN="${MPIRUN:-mpirun}"
command -v "$MPIRUN" >/dev/null 2>&1 || die "'$MPIRUN' not found; install MPI (pip install mpich) or set MPIRUN=/path/to/mpirun"

# Which MPI? Hydra (MPICH, Intel MPI, MVAPICH) and Open MPI spell every flag differently.
VERSION_TEXT="$("$MPIRUN" --version 2>&1 || true)"
CMD=("$MPIRUN" -np "$NP")
if grep -qi "open mpi\|open-rte\|openrte" <<< "$VERSION_TEXT"; then
    FLAVOR=openmpi
    CMD+=(--noprefix)
    [[ "$(id -u)" -ne 0 ]] || CMD+=(--allow-run-as-root)
    if [[ -n "$HOSTS" ]]; then
        OMPI_HOSTS=""
        for h in "${HOST_LIST[@]}"; do
            if [[ -n "$h" ]]; then OMPI_HOSTS+="${OMPI_HOSTS:+,}$h:${PPN:-$NP}"; fi
        done
        CMD+=(--host "$OMPI_HOSTS")
    fi
    # Open MPI forwards no environment to remote nodes unless named with -x.
    for v in MASTER_ADDR MASTER_PORT PATH LD_LIBRARY_PATH PYTHONPATH PYTHONUNBUFFERED OMP_NUM_THREADS \
             TORCH_EXTENSIONS_DIR MPI4PY_LIBMPI MPI4PY_MPIABI NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG; do
        if [[ -n "${!v:-}" ]]; then CMD+=(-x "$v"); fi
    done
elif grep -qi "hydra\|mpich\|intel" <<< "$VERSION_TEXT"; then
    FLAVOR=hydra
    [[ -z "$HOSTS" ]] || CMD+=(-hosts "$HOSTS")
    [[ -z "$PPN" ]] || CMD+=(-ppn "$PPN")
    if [[ -n "${MASTER_ADDR:-}" ]]; then CMD+=(-genv MASTER_ADDR "$MASTER_ADDR"); fi
    if [[ -n "${MASTER_PORT:-}" ]]; then CMD+=(-genv MASTER_PORT "$MASTER_PORT"); fi
else
    die "cannot tell which MPI '$MPIRUN' is (neither Hydra/MPICH nor Open MPI in its --version output)"
fi
# Signals blocked from exec until mom-train's handlers are in place (it unblocks them).
BLOCK=()
if env --block-signal=USR1 true 2>/dev/null; then BLOCK=(env --block-signal=USR1 --block-signal=TERM); fi
# shellcheck disable=SC2206  # MPI_EXTRA_ARGS and MOM_TRAIN are deliberately word-split
CMD+=(${MPI_EXTRA_ARGS:-} "${BLOCK[@]}" ${MOM_TRAIN:-mom-train} "$@")

echo "launchers/mpirun.sh: $FLAVOR, $NP ranks, MASTER_ADDR=${MASTER_ADDR:-<mpi4py rendezvous>}" \
     "MASTER_PORT=${MASTER_PORT:-<mpi4py rendezvous>}" >&2
echo "launchers/mpirun.sh: ${CMD[*]}" >&2
if [[ "${DRY_RUN:-0}" == 1 ]]; then exit 0; fi
exec "${CMD[@]}"
