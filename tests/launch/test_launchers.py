"""Launcher-level tests: start mom-train the way users do, as real processes, and check the result.

Each launch trains the same tiny MoM (world 2, EP 2, 3 optimizer steps, synthetic data) and must
exit 0 with both ranks' work on disk: 3 train records in metrics.jsonl, a ``latest`` checkpoint
and the training-state files of both ranks (``state_rank0000{0,1}.safetensors``).
Same data, same layout, so every launcher must also give the same losses.

    deepspeed --num_gpus 2 mom_dist/cli/train.py   |  launchers/deepspeed_multinode.sh, 2 "nodes"
    torchrun --nproc_per_node 2                   |  (no ssh: one --node_rank invocation per node)
    launchers/mpirun.sh -np 2 (MPICH's PMI_*)      |  launchers/slurm.sbatch with stub srun/scontrol
                                                      (SLURM_* only) and a SIGUSR1 preemption

Plus error paths that must fail fast and clearly: ``discover_launch_env`` messages, a missing
hostfile, ``bash -n`` on every script. Tools are called by absolute path and PATH is left alone:
the venv's ninja differs from the system one and each switch rebuilds DeepSpeed's shm op (~30 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mom_dist.parallel.runtime import LaunchError, discover_launch_env
from tests.dist_utils import ROOT, free_port
from tests.launch.launch_utils import BIN, LAUNCH_TIMEOUT, LAUNCHERS, clean_env, run, train_args

LOSSES: dict[str, list[float]] = {}  # launcher -> per-step losses, compared at the end


def check_run(out_dir, log: str, name: str, steps: int = 3) -> list[float]:
    """Both EP ranks trained and wrote their share; returns the per-step losses."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1)), f"{name}: metrics {train}\n{log[-3000:]}"
    ckpt = os.path.join(out_dir, "checkpoints")
    with open(os.path.join(ckpt, "latest")) as f:
        tag = f.read().strip()
    assert tag == f"step{steps:08d}"
    files = os.listdir(os.path.join(ckpt, tag))
    # every rank writes its share of the training state (mom_dist.checkpoint.shards)
    assert {"state_rank00000.safetensors", "state_rank00001.safetensors", "rng_rank00000.pt", "rng_rank00001.pt",
            "mom_state.json"} <= set(files), (name, files)
    assert log.count("mom-train: done: 3 steps") == 1, f"{name}: expected one done line (rank 0):\n{log[-3000:]}"
    LOSSES[name] = [r["loss"] for r in train]
    return LOSSES[name]


@pytest.fixture(scope="module")
def shm_op_built():
    """Build (or load) DeepSpeed's CPU shm op once, in one process, with the launches' environment,
    so a cold cache costs its ~30 s here rather than inside a launch's timeout."""
    code = "from mom_dist.parallel.runtime import init_distributed, shutdown; init_distributed(); shutdown(0)"
    run([sys.executable, "-c", code], clean_env(), timeout=400)


# ---------------------------------------------------------------------------- real launches
def test_deepspeed_num_gpus(tmp_path, shm_op_built):
    out = tmp_path / "out"
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "mom_dist", "cli", "train.py"), *train_args(out)]
    p = run(cmd, clean_env())
    check_run(out, p.stdout, "deepspeed")
    assert "--local_rank=1" in p.stdout  # the launcher's extra argument reached mom-train and was accepted


def test_torchrun(tmp_path, shm_op_built):
    out = tmp_path / "out"
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "mom_dist.cli.train", *train_args(out)]
    check_run(out, run(cmd, clean_env()).stdout, "torchrun")


def test_mpirun_script(tmp_path, shm_op_built):
    """launchers/mpirun.sh with the mpich wheel's Hydra over two host names of this machine
    (localhost and its hostname: Hydra starts both without ssh, as two nodes of one rank each,
    MPI_LOCALNRANKS=1) and no MASTER_ADDR/MASTER_PORT: the multi-node path, where rank 0 offers
    its addresses and a free port over mpi4py and the ranks pick one they all reach."""
    out = tmp_path / "out"
    env = clean_env(MPIRUN=os.path.join(BIN, "mpirun"), MOM_TRAIN=os.path.join(BIN, "mom-train"))
    hosts = f"localhost,{socket.gethostname()}"
    p = run(["bash", os.path.join(LAUNCHERS, "mpirun.sh"), "-np", "2", "--hosts", hosts, "--", *train_args(out)], env)
    assert "hydra, 2 ranks, MASTER_ADDR=<mpi4py rendezvous>" in p.stdout and "-ppn 1" in p.stdout, p.stdout[-3000:]
    assert "not using mpi4py" not in p.stdout, p.stdout[-3000:]
    check_run(out, p.stdout, "mpirun")


def test_deepspeed_multinode_script_no_ssh(tmp_path, shm_op_built):
    """Two "nodes" of one slot each on this machine: launchers/deepspeed_multinode.sh --node_rank K
    runs `deepspeed --hostfile ... --no_ssh --node_rank K` per node, as one would on a cluster
    without passwordless ssh. World 2 = 2 nodes x 1 rank."""
    out = tmp_path / "out"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one rank each\nnodeA slots=1\nnodeB slots=1\n")
    env = clean_env(DEEPSPEED=os.path.join(BIN, "deepspeed"), MASTER_PORT=str(free_port()))
    base = ["bash", os.path.join(LAUNCHERS, "deepspeed_multinode.sh"), "--hostfile", str(hostfile),
            "--master_addr", "127.0.0.1"]
    procs = [subprocess.Popen(base + ["--node_rank", str(k), "--", *train_args(out)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for k, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {k} exited {p.returncode}:\n{log[-5000:]}"
    assert "2 hosts, 2 slots, MASTER_ADDR=127.0.0.1" in logs[0]
    assert "--no_ssh --node_rank 1" in logs[1]
    for k, log in enumerate(logs):  # each node's one rank is local rank 0 of 1, started by deepspeed
        assert f"[mom_dist] rank {k}/2 on host" in log and "local rank 0/1, deepspeed launch" in log, log[-3000:]
    check_run(out, "".join(logs), "deepspeed_multinode")


FAKE_SRUN = """#!/bin/bash
# Test stub for srun: start SLURM_NTASKS copies of the command on this node with only the
# variables srun gives each task (SLURM_PROCID, SLURM_LOCALID, ...); forward USR1/TERM to them.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS_PER_NODE=$SLURM_NTASKS "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do wait "$pid"; s=$?; kill -0 "$pid" 2>/dev/null || break; done
    [[ $s -eq 0 ]] || status=$s
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
# Test stub for scontrol: the allocation's hosts, and a record of requeue requests.
case "$1" in
    show) printf '127.0.0.1\\nfake-node-2\\n' ;;
    requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""


def test_slurm_sbatch_preempted_and_requeued(tmp_path, shm_op_built):
    """launchers/slurm.sbatch as SLURM would run it (stub srun/scontrol; tasks see only SLURM_*
    and MASTER_*): MASTER_ADDR is the allocation's first host; a SIGUSR1 to the batch shell
    (--signal=B:USR1@120) reaches every task, the trainer checkpoints and leaves with 0, the
    script requeues the job, and the rerun resumes from the checkpoint."""
    out = tmp_path / "out"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log_path, requeue_log = tmp_path / "job.log", tmp_path / "scontrol.log"
    env = clean_env(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="2",
                    SLURM_JOB_NODELIST="fake[1-2]", SLURM_JOB_NUM_NODES="1", SLURM_SUBMIT_DIR=ROOT,
                    VENV=str(tmp_path / "no-venv"), MOM_TRAIN=os.path.join(BIN, "mom-train"),
                    MASTER_PORT=str(free_port()), SCONTROL_LOG=str(requeue_log), LOG_DIR=str(tmp_path / "logs"))
    args = train_args(out, "train.steps=500", "train.save_interval=1000")  # runs until signalled
    with open(log_path, "w") as log_f:
        job = subprocess.Popen(["bash", os.path.join(LAUNCHERS, "slurm.sbatch"), *args], env=env, cwd=ROOT,
                               stdout=log_f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while "step      2/500" not in log_path.read_text():  # both ranks are past their signal set-up
            assert job.poll() is None and time.time() < deadline, f"job ended or stalled:\n{log_path.read_text()[-5000:]}"
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=LAUNCH_TIMEOUT) == 0, log_path.read_text()[-5000:]  # requeued: the job ends 0
    finally:
        if job.poll() is None:
            job.kill()
    log = log_path.read_text()
    assert "MASTER_ADDR=127.0.0.1" in log and "requeueing job 4242" in log, log[-3000:]
    assert requeue_log.read_text().strip() == "requeue 4242"
    assert log.count("preemption signal") >= 1 and "mom-train: done" not in log, log[-3000:]
    assert log.count("mom-train: preempted (SIGUSR1) at step") == 1, log[-3000:]  # rank 0's line, exit 75
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    state = json.loads((ckpt / tag / "mom_state.json").read_text())
    assert 2 <= state["step"] < 500 and (state["layout"]["world_size"], state["layout"]["ep_size"]) == (2, 2)
    assert (ckpt / tag / "state_rank00000.safetensors").exists() and (ckpt / tag / "state_rank00001.safetensors").exists()
    with open(out / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    LOSSES["slurm"] = losses[:3]  # steps 1-3 are inside the 30-step warmup: same lr as a 3-step run

    # The requeued job runs the same script again: it resumes from `latest` (one more step here).
    env["SLURM_RESTART_COUNT"] = "1"
    p = run(["bash", os.path.join(LAUNCHERS, "slurm.sbatch"), *args, "--set", "train.stop_after=1"], env)
    assert f"resumed from step {state['step']}" in p.stdout and "(restart 1 of at most 20)" in p.stdout, p.stdout[-3000:]
    assert "mom-train: stopped at step" in p.stdout and "mom-train: done" not in p.stdout, p.stdout[-3000:]
    assert (ckpt / "latest").read_text().strip() == f"step{state['step'] + 1:08d}"
    assert requeue_log.read_text().strip() == "requeue 4242"  # no second requeue: it left by stop_after


def test_launchers_agree():
    """Same data and layout through every launcher: the same losses (bitwise, in practice)."""
    if len(LOSSES) < 2:
        pytest.skip("needs at least two launches from this file")
    ref_name, ref = next(iter(LOSSES.items()))
    for name, losses in LOSSES.items():
        assert len(losses) == 3 and losses == pytest.approx(ref, rel=1e-6), f"{name} vs {ref_name}: {losses} vs {ref}"


# ---------------------------------------------------------------------------- fast error paths
@pytest.mark.parametrize("env, words", [
    ({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}, ["MASTER_ADDR", "multi-node mpi"]),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, ["MASTER_ADDR"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "8"}, ["MASTER_ADDR"]),
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["rank 2", "world of 2"]),
    ({"PMI_RANK": "-1", "PMI_SIZE": "2"}, ["rank -1"]),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, ["SLURM_PROCID", "not an integer"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "zero"}, ["LOCAL_RANK", "not an integer"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, ["MASTER_PORT"]),
])
def test_discover_launch_env_errors(env, words):
    with pytest.raises(LaunchError) as e:
        discover_launch_env(env)
    for w in words:
        assert w.lower() in str(e.value).lower(), str(e.value)


def test_discover_launch_env_single_node_defaults():
    mpi = discover_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (mpi.launcher, mpi.rank, mpi.world_size, mpi.master_addr) == ("mpi", 1, 2, "127.0.0.1")
    slurm = discover_launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                                 "SLURM_NTASKS_PER_NODE": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "12345"})
    assert (slurm.launcher, slurm.rank, slurm.local_rank, slurm.local_size, slurm.master_addr,
            slurm.master_port) == ("slurm", 3, 1, 2, "node1", 12345)


def test_discover_launch_env_names_the_real_launcher():
    """DeepSpeed's launcher sets LOCAL_SIZE/CROSS_RANK (not LOCAL_WORLD_SIZE): a rank of a 2-node x
    1-slot job is local rank 0 of 1, under deepspeed; torchrun's ranks say torchrun."""
    ds = discover_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
                              "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert (ds.launcher, ds.rank, ds.local_rank, ds.local_size) == ("deepspeed", 1, 0, 1)
    tr = discover_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "j", "MASTER_ADDR": "node0"})
    assert (tr.launcher, tr.local_rank, tr.local_size) == ("torchrun", 1, 2)
    plain = discover_launch_env({"RANK": "0", "WORLD_SIZE": "2"})  # set by hand (or by a test harness)
    assert (plain.launcher, plain.local_rank, plain.local_size) == ("env", 0, 2)


def test_slurm_multinode_without_ntasks_per_node_needs_master_addr():
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        discover_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                             "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "8(x2)"})


@pytest.mark.parametrize("script", ["deepspeed_multinode.sh", "mpirun.sh", "slurm.sbatch", "slurm_torchrun.sbatch",
                                    "slurm_common.sh"])
def test_scripts_parse(script):
    p = subprocess.run(["bash", "-n", os.path.join(LAUNCHERS, script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_deepspeed_multinode_missing_hostfile_fails_before_starting(tmp_path):
    marker = tmp_path / "started"
    fake_ds = tmp_path / "deepspeed"  # would record that anything was launched
    fake_ds.write_text(f"#!/bin/bash\ntouch {marker}\n")
    fake_ds.chmod(0o755)
    env = clean_env(DEEPSPEED=str(fake_ds))
    missing = tmp_path / "no-such-hostfile"
    p = run(["bash", os.path.join(LAUNCHERS, "deepspeed_multinode.sh"), "--hostfile", str(missing), "--",
             "--config", "configs/tiny.yaml"], env, timeout=30, check=False)
    assert p.returncode == 2 and f"hostfile '{missing}' does not exist" in p.stdout, p.stdout
    bad = tmp_path / "bad-hostfile"
    bad.write_text("node01 slots=8\nnode02 eight-gpus\n")
    p = run(["bash", os.path.join(LAUNCHERS, "deepspeed_multinode.sh"), "--hostfile", str(bad), "--",
             "--config", "configs/tiny.yaml"], env, timeout=30, check=False)
    assert p.returncode == 2 and "line 2" in p.stdout and "hostname slots=N" in p.stdout, p.stdout
    assert not marker.exists(), "deepspeed was started despite a bad hostfile"
    p = run(["bash", os.path.join(LAUNCHERS, "deepspeed_multinode.sh"), "--hostfile",
             os.path.join(LAUNCHERS, "hostfile.example"), "--", "--config", "configs/tiny.yaml"],
            clean_env(DEEPSPEED=str(fake_ds), DRY_RUN="1"), timeout=30)
    assert "--master_addr node01" in p.stdout and "2 hosts, 16 slots" in p.stdout and not marker.exists()


def test_mpirun_script_commands(tmp_path):
    """What mpirun.sh runs (DRY_RUN): MASTER_ADDR/PORT forwarded only when set (else the ranks'
    mpi4py rendezvous), signals blocked until mom-train arms, and Open MPI called with --noprefix
    (else it puts /usr/bin first on PATH and DeepSpeed rebuilds its JIT op)."""
    env = clean_env(MPIRUN=os.path.join(BIN, "mpirun"), DRY_RUN="1")
    script = ["bash", os.path.join(LAUNCHERS, "mpirun.sh"), "-np", "4", "--hosts", "n1,n2", "--", "--config", "x"]
    p = run(script, env, timeout=30)
    assert "-hosts n1,n2 -ppn 2 env --block-signal=USR1 --block-signal=TERM mom-train --config x" in p.stdout, p.stdout
    assert "MASTER_ADDR=<mpi4py rendezvous>" in p.stdout and "-genv" not in p.stdout, p.stdout
    env["MASTER_ADDR"] = "10.1.2.3"
    p = run(script, env, timeout=30)
    assert "-hosts n1,n2 -ppn 2 -genv MASTER_ADDR 10.1.2.3" in p.stdout, p.stdout
    fake = tmp_path / "mpirun"  # answers --version like Open MPI 4.1
    fake.write_text("#!/bin/bash\necho 'mpirun (Open MPI) 4.1.4'\n")
    fake.chmod(0o755)
    p = run(script, clean_env(MPIRUN=str(fake), DRY_RUN="1", MASTER_ADDR="10.1.2.3"), timeout=30)
    assert f"{fake} -np 4 --noprefix" in p.stdout and "--host n1:2,n2:2" in p.stdout, p.stdout
    assert "-x MASTER_ADDR" in p.stdout and "-x PATH" in p.stdout and "-x PYTHONUNBUFFERED" in p.stdout, p.stdout
