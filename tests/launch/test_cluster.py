"""The launchers against real daemons (mark ``cluster``; .ci/run runs them after the default suite).

SLURM 22.05 with two slurmd on this host (nodes ``<hostname>`` and ``momnode2``), jobs of
2 nodes x 1 task through ``sbatch launchers/slurm.sbatch`` submitted from outside the repository:
    trains and checkpoints; a SIGUSR1 to the batch shell 2 s after start (before the loop) ->
    exit 75, requeue, finished run; SIGUSR1 mid-run and a real partition preemption
    (PreemptMode=REQUEUE) -> resumed losses equal to an uninterrupted run; MAX_RESTARTS=0 ->
    job ends 75 naming the checkpoint; a SIGKILLed rank fails the job within 60 s, the rank
    named; a SIGSTOPped rank ends the job within collective_timeout_s + 30 s.
    launchers/slurm_torchrun.sbatch: trains, and a SIGUSR1 mid-run requeues and resumes; a
    SIGUSR1 (to the batch shell) or SIGTERM (to the tasks) in the first second, before any rank
    exists -> requeue -> finished; the run's exit codes 2/3/4 end the job (torchrun's own is 1).
    A requeue is never logged as failed when SLURM did requeue the job: not when scontrol returns
    late (slurmctld's SIGTERM for the requeue reaches it first), not after a preemption (SLURM
    requeues the job itself; our scontrol then says "Job is pending execution").
sshd + pdsh, ``launchers/deepspeed_multinode.sh`` over two host names of this machine: trains
    without rebuilding DeepSpeed's JIT op; a SIGKILLed rank ends the job non-zero, named.
Open MPI (apt) through ``launchers/mpirun.sh``: trains (mpi4py fallback line, MASTER_ADDR); a
    SIGKILLed rank is named.
(MPICH over two host names with the mpi4py rendezvous runs in the default suite:
test_launchers.py::test_mpirun_script.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.dist_utils import ROOT
from tests.launch.cluster_harness import Slurm, Sshd, Unavailable, apt_install
from tests.launch.launch_utils import BIN, LAUNCHERS, clean_env, train_args

pytestmark = pytest.mark.cluster
STEPS = 40  # long enough (~5-10 s of steps) to signal a run mid-loop
JOB_TIMEOUT = 300


def losses(out) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def find_rank_pid(rank: int, marker: str, timeout: float = 120,
                  keys=("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")) -> int:
    """PID of the training process of global rank ``rank`` whose command line contains ``marker``
    (the run's out_dir), from /proc (the first of ``keys`` its environment has; under torchrun
    pass ("RANK",): its agents carry SLURM_PROCID too)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                if marker not in cmd or "python" not in cmd or not ("mom_dist" in cmd or "mom-train" in cmd):
                    continue
                env = dict(x.split("=", 1) for x in open(f"/proc/{pid}/environ", "rb").read().decode(
                    errors="replace").split("\0") if "=" in x)
            except OSError:
                continue
            ids = [env.get(k) for k in keys if k in env]
            if ids and ids[0] == str(rank) and "TORCHELASTIC_AGENT" not in cmd:
                return int(pid)
        time.sleep(0.3)
    raise AssertionError(f"no process of rank {rank} for {marker}")


def wait_for(path, text: str, timeout: float = JOB_TIMEOUT, alive=lambda: True) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        assert alive(), f"ended before '{text}':\n{open(path).read()[-4000:] if os.path.exists(path) else ''}"
        time.sleep(0.3)
    raise AssertionError(f"'{text}' not in {path} after {timeout} s:\n{open(path).read()[-4000:]}")


def _running(daemons, what: str):
    """Fixture body: start the daemons (skip, saying why, where they cannot start), stop them after."""
    try:
        d = daemons()
    except Unavailable as e:
        pytest.skip(f"{what} cannot run here: {e}")
    yield d
    d.stop()


# ---------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm():
    yield from _running(Slurm, "SLURM")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per-step losses of an uninterrupted single-launch run (torchrun, same layout)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "mom_dist.cli.train", *train_args(out, f"train.steps={STEPS}", "train.save_interval=0")]
    p = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return losses(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(slurm, tmp_path, *extra_set, script="slurm.sbatch", sbatch_args=(), **env) -> tuple[str, str, str]:
    """sbatch from tmp_path (outside the repository, no MOM_DIST_HOME): (job id, log, out_dir)."""
    out = str(tmp_path / "out")
    log = str(tmp_path / "job-%j.out")
    cmd = ["sbatch", "--parsable", "-N2", "--ntasks-per-node=1", f"--output={log}", *sbatch_args,
           os.path.join(LAUNCHERS, script), *train_args(out, f"train.steps={STEPS}", *extra_set)]
    e = clean_env(VENV=sys.prefix, **slurm.env, **env)
    e.pop("MOM_DIST_HOME", None)
    p = subprocess.run(cmd, cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    return job, log.replace("%j", job), out


def test_slurm_trains_and_checkpoints(slurm, tmp_path, reference):
    job, log, out = submit(slurm, tmp_path, "train.save_interval=20")
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT)
    text = open(log).read()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert f"repo {ROOT}" in text and "2 nodes, 2 tasks" in text, text[-3000:]
    assert text.count("mom-train: done: 40 steps") == 1 and "finished" in text, text[-3000:]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step00000040"
    assert losses(out) == pytest.approx(reference, rel=1e-6)
    assert os.path.isdir(tmp_path / "logs")  # LOG_DIR created by the script


def usr1_at_2s_requeued_once(slurm, job: str, log: str) -> str:
    """USR1 to the batch script 2 s after the job starts running; the job must end COMPLETED after
    exactly one requeue. Returns the job's log."""
    slurm.wait_state(job, {"RUNNING"}, 60)
    time.sleep(2)
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    text = open(log).read()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-4000:]}"
    return text


def test_slurm_signal_before_loop_requeues_and_finishes(slurm, tmp_path):
    job, log, out = submit(slurm, tmp_path, "train.save_interval=20")
    text = usr1_at_2s_requeued_once(slurm, job, log)
    assert re.search(r"mom-train: preempted \(SIGUSR1\) (during [a-z -]+: no checkpoint yet|before)", text) \
        or "SIGUSR1 before the tasks started" in text, text[-4000:]
    assert "requeueing job" in text and text.count("mom-train: done: 40 steps") == 1, text[-4000:]


@pytest.mark.parametrize("how", ["scancel_batch_usr1", "partition_preemption"])
def test_slurm_preempted_mid_run_resumes_bitwise(slurm, tmp_path, reference, how):
    job, log, out = submit(slurm, tmp_path, "train.save_interval=100")
    slurm.wait_state(job, {"RUNNING"}, 60)
    wait_for(log, f"step      3/{STEPS}")
    if how == "scancel_batch_usr1":
        slurm.run(["scancel", "--batch", "--signal=USR1", job])
    else:  # a job in the higher-tier partition needs both nodes whole: SLURM requeues ours
        high = slurm.run(["sbatch", "--parsable", "-p", "high", "--exclusive", "-N2", "--wrap", "sleep 2",
                          f"--output={tmp_path}/high-%j.out"]).stdout.strip()
        slurm.wait_state(high, {"COMPLETED", "FAILED"}, JOB_TIMEOUT, release=False)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    text = open(log).read()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, f"{info}\n{text[-5000:]}"
    sig = "SIGUSR1" if how == "scancel_batch_usr1" else "SIGTERM"
    assert f"mom-train: preempted ({sig}) at step" in text and "resumed from step" in text, text[-5000:]
    # a preemption requeues the job itself (our own scontrol requeue then says "Job is pending
    # execution"): that is no failure
    assert "'scontrol requeue' failed" not in text, text[-5000:]
    assert text.count("mom-train: done: 40 steps") == 1, text[-5000:]
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == pytest.approx(reference, rel=1e-6), \
        f"{got}\nvs\n{reference}"


def test_slurm_max_restarts_0_ends_nonzero_naming_checkpoint(slurm, tmp_path):
    job, log, out = submit(slurm, tmp_path, "train.save_interval=100", MAX_RESTARTS="0")
    slurm.wait_state(job, {"RUNNING"}, 60)
    wait_for(log, f"step      3/{STEPS}")
    slurm.run(["scancel", "--signal=USR1", job])  # the tasks only: the batch shell learns from exit 75
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT, release=False)
    text = open(log).read()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", f"{info}\n{text[-4000:]}"
    tag = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    assert f"is NOT requeued (restarted 0 times, MAX_RESTARTS=0); checkpoint {out}/checkpoints/{tag}" in text, \
        text[-4000:]
    assert "mom-train: done" not in text


def test_slurm_killed_rank_fails_the_job_naming_it(slurm, tmp_path):
    job, log, out = submit(slurm, tmp_path, "train.save_interval=0", "train.steps=100000")
    slurm.wait_state(job, {"RUNNING"}, 60)
    wait_for(log, "step      3/")
    os.kill(find_rank_pid(1, out), signal.SIGKILL)
    killed = time.time()
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60, release=False)
    text = open(log).read()
    assert time.time() - killed <= 60 and info["JobState"] == "FAILED", f"{info}\n{text[-4000:]}"
    assert re.search(r"srun: error: \S+: task 1: Killed", text), text[-4000:]
    assert "mom-train: done" not in text


def test_slurm_stopped_rank_ends_the_job_within_timeout(slurm, tmp_path):
    timeout_s = 15
    job, log, out = submit(slurm, tmp_path, "train.save_interval=0", "train.steps=100000",
                           f"parallel.collective_timeout_s={timeout_s}")
    slurm.wait_state(job, {"RUNNING"}, 60)
    wait_for(log, "step      3/")
    os.kill(find_rank_pid(1, out), signal.SIGSTOP)
    stopped = time.time()
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s + 30, release=False)
    text = open(log).read()
    assert info["JobState"] == "FAILED" and time.time() - stopped <= timeout_s + 30, f"{info}\n{text[-4000:]}"
    assert "failed: a collective timed out" in text and "from rank(s) 1" in text, text[-4000:]


def test_slurm_torchrun_variant_trains_and_requeues(slurm, tmp_path, reference):
    job, log, out = submit(slurm, tmp_path, "train.save_interval=100", script="slurm_torchrun.sbatch")
    slurm.wait_state(job, {"RUNNING"}, 60)
    wait_for(log, f"step      3/{STEPS}")
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    text = open(log).read()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, f"{info}\n{text[-5000:]}"
    assert "2 nodes x 1 ranks (torchrun" in text and "mom-train: preempted (SIGUSR1) at step" in text, text[-5000:]
    assert text.count("mom-train: done: 40 steps") == 1, text[-5000:]
    assert losses(out) == pytest.approx(reference, rel=1e-6)


def _signal_in_first_seconds(slurm, job: str, how: str) -> None:
    """SIGUSR1 to the batch shell 0.5 s after the job starts (it passes it on to srun), or SIGTERM
    to the tasks as soon as the job step exists (what a preemption sends): both while torchrun
    still imports and meets its peers, before any rank exists."""
    slurm.wait_state(job, {"RUNNING"}, 60)
    if how == "USR1":
        time.sleep(0.5)
        slurm.run(["scancel", "--batch", "--signal=USR1", job])
        return
    deadline = time.time() + 60
    while f"{job}.0" not in slurm.run(["squeue", "-h", "-s", "-j", job, "-o", "%i"], check=False).stdout:
        assert time.time() < deadline, "the job step never started"
        time.sleep(0.1)
    slurm.run(["scancel", "--signal=TERM", job])


@pytest.mark.parametrize("how", ["USR1", "TERM"])
def test_slurm_torchrun_signal_at_start_requeues_and_finishes(slurm, tmp_path, how):
    job, log, out = submit(slurm, tmp_path, "train.save_interval=20", script="slurm_torchrun.sbatch")
    _signal_in_first_seconds(slurm, job, how)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    text = open(log).read()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-5000:]}"
    assert re.search(rf"mom-train: preempted \(SIG{how}\) during [a-z -]+: no checkpoint yet", text) \
        or f"SIG{how} before the tasks started" in text, text[-5000:]
    assert "requeueing job" in text and text.count("mom-train: done: 40 steps") == 1, text[-5000:]


@pytest.mark.parametrize("code", [2, 3, 4])
def test_slurm_torchrun_job_ends_with_the_runs_exit_code(slurm, tmp_path, code):
    """torchrun exits 1 whatever its ranks did: the job still ends 2 (bad config), 3 (diverged) or
    4 (a SIGSTOPped rank: the others time out), from rank 0's exit record."""
    extra = {2: ["model.n_heads=3"], 3: ["train.lr=1e6", "train.max_nonfinite_steps=2", "train.save_interval=0"],
             4: ["train.steps=100000", "train.save_interval=0", "parallel.collective_timeout_s=15"]}[code]
    job, log, out = submit(slurm, tmp_path, *extra, script="slurm_torchrun.sbatch")
    if code == 4:
        slurm.wait_state(job, {"RUNNING"}, 60)
        wait_for(log, "step      3/")
        os.kill(find_rank_pid(1, out, keys=("RANK",)), signal.SIGSTOP)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT, release=False)
    text = open(log).read()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{code}:0", f"{info}\n{text[-4000:]}"
    assert {2: "mom-train: config error: model.n_heads=3", 3: "mom-train: diverged:",
            4: "failed: a collective timed out"}[code] in text, text[-4000:]
    assert f"(exit {code}" in text and "mom-train: done" not in text, text[-4000:]


# `requeue`: do what scontrol does, then return late: slurmctld accepts the requeue and signals
# this batch step before a busy node lets scontrol exit (what made the launcher report
# "'scontrol requeue' failed" for a requeue that had worked); everything else: the real scontrol.
SLOW_SCONTROL = """#!/bin/bash
{real} "$@"
rc=$?
if [[ "$1" == requeue ]]; then sleep 3; fi
exit $rc
"""


def test_slurm_requeue_with_a_late_scontrol_is_not_reported_failed(slurm, tmp_path):
    import shutil

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(SLOW_SCONTROL.format(real=shutil.which("scontrol")))
    (fake / "scontrol").chmod(0o755)
    job, log, out = submit(slurm, tmp_path, "train.save_interval=20", PATH=f"{fake}:{os.environ['PATH']}")
    text = usr1_at_2s_requeued_once(slurm, job, log)
    assert "requeueing job" in text and "'scontrol requeue' failed" not in text, text[-4000:]
    assert "SIGTERM: waiting for the tasks to save" not in text, text[-4000:]  # the requeue's own TERM is quiet
    assert text.count("mom-train: done: 40 steps") == 1, text[-4000:]


# ---------------------------------------------------------------------------- ssh + pdsh
@pytest.fixture(scope="module")
def sshd():
    yield from _running(Sshd, "sshd/pdsh")


def _ds_launch(tmp_path, *extra):
    out = str(tmp_path / "out")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"localhost slots=1\n{socket.gethostname()} slots=1\n")
    env = clean_env(DEEPSPEED=os.path.join(BIN, "deepspeed"), MASTER_PORT=str(_free_port()))
    # A remote shell's PATH lacks the venv: the launcher must carry it (.deepspeed_env)
    cmd = ["bash", os.path.join(LAUNCHERS, "deepspeed_multinode.sh"), "--hostfile", str(hostfile),
           "--master_addr", "127.0.0.1", "--", *train_args(out, *extra)]
    return subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True), out


def built_ops() -> dict[str, float]:
    """mtime of every JIT-built DeepSpeed op: a rebuild (another ninja on PATH) rewrites them."""
    root = clean_env()["TORCH_EXTENSIONS_DIR"]
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files if f.endswith(".so")}


def test_deepspeed_pdsh_trains_without_jit_rebuild(sshd, tmp_path, reference):
    ops = built_ops()
    job, out = _ds_launch(tmp_path, f"train.steps={STEPS}", "train.save_interval=0")
    text = job.communicate(timeout=JOB_TIMEOUT)[0]
    assert job.returncode == 0, text[-5000:]
    assert ops and built_ops() == ops, "DeepSpeed rebuilt its JIT op on a remote rank"
    assert "DS_ENV_FILE=" in text and "PATH" in text.split("DS_ENV_FILE=")[1].splitlines()[0], text[-3000:]
    assert "Building extension module" not in text and "Emitting ninja build file" not in text, text[-5000:]
    assert text.count("mom-train: done: 40 steps") == 1
    assert losses(out) == pytest.approx(reference, rel=1e-6)


def test_deepspeed_pdsh_killed_rank_is_named(sshd, tmp_path):
    job, out = _ds_launch(tmp_path, "train.steps=100000", "train.save_interval=0")
    try:
        wait_for(os.path.join(out, "metrics.jsonl"), '"step": 3,', alive=lambda: job.poll() is None)
        os.kill(find_rank_pid(1, out), signal.SIGKILL)
        text = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, text[-4000:]
    assert "mom-train: rank 0/2" in text and "rank(s) 1" in text, text[-4000:]


# ---------------------------------------------------------------------------- Open MPI
@pytest.fixture(scope="module")
def openmpi():
    try:
        apt_install({"/usr/bin/mpirun.openmpi": "openmpi-bin"})
    except Unavailable as e:
        pytest.skip(f"Open MPI cannot be installed here: {e}")
    return "/usr/bin/mpirun.openmpi"


def _ompi_launch(mpirun, tmp_path, *extra):
    out = str(tmp_path / "out")
    # No MASTER_ADDR: the ranks try the mpi4py rendezvous, find the venv's mpi4py is MPICH's, say
    # so and fall back to 127.0.0.1 (Open MPI puts both host names on one node here).
    env = clean_env(MPIRUN=mpirun, MOM_TRAIN=os.path.join(BIN, "mom-train"), MASTER_PORT=str(_free_port()))
    cmd = ["bash", os.path.join(LAUNCHERS, "mpirun.sh"), "-np", "2", "--", *train_args(out, *extra)]
    return subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True), out


def test_openmpi_trains(openmpi, tmp_path, reference):
    ops = built_ops()
    job, out = _ompi_launch(openmpi, tmp_path, f"train.steps={STEPS}", "train.save_interval=0")
    text = job.communicate(timeout=JOB_TIMEOUT)[0]
    assert job.returncode == 0, text[-5000:]
    assert ops and built_ops() == ops, "DeepSpeed rebuilt its JIT op (Open MPI's prefix on PATH?)"
    assert "--noprefix" in text and "Building extension module" not in text, text[-5000:]
    assert text.count("mom-train: note: not using mpi4py for the rendezvous: the installed mpi4py loads "
                      "mpich's libmpi but openmpi started this job") == 1, text[-5000:]
    assert text.count("mom-train: done: 40 steps") == 1
    assert losses(out) == pytest.approx(reference, rel=1e-6)


def test_openmpi_killed_rank_is_named(openmpi, tmp_path):
    job, out = _ompi_launch(openmpi, tmp_path, "train.steps=100000", "train.save_interval=0")
    try:
        wait_for(os.path.join(out, "metrics.jsonl"), '"step": 3,', alive=lambda: job.poll() is None)
        os.kill(find_rank_pid(1, out), signal.SIGKILL)
        text = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, text[-4000:]
    assert re.search(r"rank 1 .*(signal 9|Killed)|rank\(s\) 1", text, re.S), text[-4000:]


# ---------------------------------------------------------------------------- MPICH (the wheel's Hydra)
def test_mpich_two_hosts_killed_rank_is_named(tmp_path):
    """mpirun.sh under the mpich wheel over two host names of this machine, no MASTER_ADDR (the
    mpi4py rendezvous): Hydra names only the killed PID (and kills the others at once, before
    they can say anything); every rank's start-up line maps that PID to rank 1."""
    out = str(tmp_path / "out")
    env = clean_env(MPIRUN=os.path.join(BIN, "mpirun"), MOM_TRAIN=os.path.join(BIN, "mom-train"))
    cmd = ["bash", os.path.join(LAUNCHERS, "mpirun.sh"), "-np", "2", "--hosts", f"localhost,{socket.gethostname()}",
           "--", *train_args(out, "train.steps=100000", "train.save_interval=0")]
    job = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        wait_for(os.path.join(out, "metrics.jsonl"), '"step": 3,', alive=lambda: job.poll() is None)
        pid = find_rank_pid(1, out)
        os.kill(pid, signal.SIGKILL)
        text = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, text[-4000:]
    assert re.search(rf"PID {pid} RUNNING AT", text), text[-4000:]  # Hydra's line
    assert f"[mom_dist] rank 1/2 on host {socket.gethostname()} (pid {pid})" in text, text[-4000:]
