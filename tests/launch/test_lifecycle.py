"""How mom-train starts and ends, tested with real processes: signals from the first second,
exit codes that tell the truth, one line naming a failing rank, and a rank that stops answering.

    signal at start (rank 1 only, blocked by `env --block-signal` as the launchers start it)
        -> every rank leaves with 75 at the first safe point, no checkpoint, no `done` line
    SIGSTOP of rank 1 mid-run -> rank 0 exits 4 within collective_timeout_s + 30 s naming rank 1
    SIGHUP mid-run -> one line naming rank and host, then death by SIGHUP
    bad config / launch environment -> 2; an unexpected error -> 1 with the rank's line
    torchrun_task.py (slurm_torchrun.sbatch's task) signalled before torchrun has any rank
        -> the ranks it starts later get the signal and leave with 75
    the mpich-built mpi4py under Open MPI's variables -> no crash, one line saying why, exit 2

Ranks are started the way torchrun would (RANK/WORLD_SIZE/MASTER_*), as separate processes, so
each one's exit status and output can be checked on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.dist_utils import ROOT, free_port
from tests.launch.launch_utils import LAUNCH_TIMEOUT, clean_env, run, train_args

TRAIN = [sys.executable, "-m", "mom_dist.cli.train"]


def start_ranks(out, world: int, *extra, block: bool = False, **env) -> tuple[list, list]:
    port = str(free_port())
    procs, logs = [], []
    for rank in range(world):
        log = open(os.path.join(str(out) + f".rank{rank}.log"), "w+")
        prefix = ["env", "--block-signal=USR1", "--block-signal=TERM"] if block else []
        procs.append(subprocess.Popen(prefix + TRAIN + train_args(out, *extra), cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT,
                                      env=clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                                    LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                                    MASTER_PORT=port, **env)))
        logs.append(log)
    return procs, logs


def _wait_until_term_is_blocked_or_caught(proc, timeout: float = 30.0) -> None:
    """Popen returns once ``env`` is exec'd; ``env`` blocks the signals a moment later. A signal
    in between kills the process by default, as it would any program: what the launchers and
    this test promise starts once the signal is blocked (then caught by mom-train's handler)."""
    term = 1 << (signal.SIGTERM - 1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                masks = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except FileNotFoundError:
            break
        if (int(masks.get("SigBlk", "0"), 16) | int(masks.get("SigCgt", "0"), 16)) & term:
            return
        time.sleep(0.001)
    raise AssertionError(f"rank process {proc.pid} never blocked or caught SIGTERM")


def read(log) -> str:
    log.flush()
    with open(log.name) as f:
        return f.read()


def wait_all(procs, timeout=LAUNCH_TIMEOUT) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_signal_at_start_every_rank_leaves_with_75(tmp_path):
    """SIGTERM to rank 1 the moment it is started (before Python runs a line; the launchers
    start ranks with the signals blocked, as here): rank 1 records it once armed, both ranks
    agree at the first safe point and leave with 75 - no checkpoint, no `done` line."""
    out = tmp_path / "out"
    procs, logs = start_ranks(out, 2, "train.steps=50", block=True)
    _wait_until_term_is_blocked_or_caught(procs[1])
    procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs)
    text = [read(f) for f in logs]
    assert codes == [75, 75], f"{codes}\n{text[0][-3000:]}\n{text[1][-3000:]}"
    assert "rank 1/2" in text[1] and "SIGTERM received" in text[1], text[1][-2000:]
    assert text[0].count("mom-train: preempted (a signal on another rank) during ") == 1, text[0][-2000:]
    assert "no checkpoint yet; the requeued job starts over" in text[0], text[0][-2000:]
    assert "mom-train: preempted" not in text[1]  # the closing line comes from rank 0 only
    assert not any("mom-train: done" in t for t in text)
    assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")


def test_torchrun_task_hands_an_early_signal_to_ranks_started_later(tmp_path):
    """launchers/slurm_torchrun.sbatch's task, without SLURM: torchrun_task.py around torchrun,
    started with USR1/TERM blocked, gets SIGUSR1 before torchrun has started any rank. Both ranks
    still receive it once they exist (held until mom-train is armed), leave with 75 at the first
    safe point, rank 0's exit record says 75 (torchrun itself exits 1), nothing is trained."""
    from tests.launch.launch_utils import BIN

    out, record = tmp_path / "out", tmp_path / "exit"
    task = os.path.join(ROOT, "mom_dist", "parallel", "torchrun_task.py")
    cmd = ["env", "--block-signal=USR1", "--block-signal=TERM", sys.executable, task, os.path.join(BIN, "torchrun"),
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--max_restarts=0", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", "-m", "mom_dist.cli.train",
           *train_args(out, "train.steps=50")]
    log = open(tmp_path / "task.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=clean_env(MOM_DIST_EXIT_FILE=str(record)))
    _wait_until_term_is_blocked_or_caught(proc)
    proc.send_signal(signal.SIGUSR1)
    code = wait_all([proc])[0]
    text = read(log)
    assert code == 1 and record.read_text().split() == ["75"], f"{code}\n{text[-4000:]}"
    received = text.index("torchrun_task: SIGUSR1 received")
    assert received < text.index("[mom_dist] rank 0/2") and received < text.index("[mom_dist] rank 1/2"), text[-4000:]
    assert text.count("SIGUSR1 received: saving and leaving at the next safe point") == 2, text[-4000:]
    assert "mom-train: preempted (SIGUSR1) during process-group start: no checkpoint yet" in text, text[-4000:]
    assert "mom-train: done" not in text and not (out / "checkpoints").exists()


def test_rank_that_stops_answering_ends_the_job_with_4(tmp_path):
    """SIGSTOP of rank 1 mid-run (a hang, not a death): rank 0's next collective times out after
    parallel.collective_timeout_s, it exits 4 and names rank 1 from the heartbeats."""
    out = tmp_path / "out"
    timeout_s = 10
    procs, logs = start_ranks(out, 2, "train.steps=500", "train.save_interval=0",
                              f"parallel.collective_timeout_s={timeout_s}")
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while "step      3/500" not in read(logs[0]):
            assert procs[0].poll() is None and time.time() < deadline, read(logs[0])[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        code = procs[0].wait(timeout=timeout_s + 30)
        took = time.time() - stopped
    finally:
        procs[1].kill()
        wait_all(procs, timeout=30)
    text = read(logs[0])
    assert code == 4, f"exit {code}\n{text[-3000:]}"
    assert took <= timeout_s + 30
    line = [x for x in text.splitlines() if "failed: a collective timed out" in x]
    assert len(line) == 1 and "rank 0/2 on host" in line[0] and "from rank(s) 1" in line[0], text[-3000:]
    assert "mom-train: done" not in text


def test_fatal_signal_names_the_rank(tmp_path):
    """A catchable fatal signal (SIGHUP: the terminal or ssh session went away) writes the
    rank/host line, then the process dies by that very signal (what launchers report)."""
    out = tmp_path / "out"
    procs, logs = start_ranks(out, 1, "train.steps=500", "train.save_interval=0", "parallel.ep_size=1")
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while "step      2/500" not in read(logs[0]):
            assert procs[0].poll() is None and time.time() < deadline, read(logs[0])[-3000:]
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGHUP)
        code = procs[0].wait(timeout=60)
    finally:
        wait_all(procs, timeout=10)
    text = read(logs[0])
    assert code == -signal.SIGHUP, f"exit {code}\n{text[-3000:]}"
    assert f"mom-train: rank 0/1 on host {os.uname().nodename} (pid {procs[0].pid}) failed: killed by SIGHUP" in text


def test_bad_input_exits_2_and_unexpected_errors_exit_1(tmp_path):
    out = tmp_path / "out"
    p = run(TRAIN + train_args(out, "train.steps=0"), clean_env(), timeout=120, check=False)
    assert p.returncode == 2 and "mom-train: config error: train.steps=0 must be >= 1" in p.stdout, p.stdout[-2000:]
    p = run(TRAIN + train_args(out), clean_env(RANK="2", WORLD_SIZE="2"), timeout=120, check=False)
    assert p.returncode == 2 and "mom-train: error: rank 2 is outside the world of 2" in p.stdout, p.stdout[-2000:]
    assert not out.exists()  # nothing was written for a run that could not start
    blocker = tmp_path / "a-file"  # train.out_dir names an existing file: refused up front (bad input)
    blocker.write_text("user data\n")
    p = run(TRAIN + train_args(blocker, "parallel.ep_size=1"), clean_env(), timeout=LAUNCH_TIMEOUT, check=False)
    assert p.returncode == 2 and "mom-train: error: train.out_dir" in p.stdout and "cannot be used" in p.stdout, \
        p.stdout[-3000:]
    assert blocker.read_text() == "user data\n"
    out.mkdir()  # <out_dir>/checkpoints is a file: its makedirs fails inside the run (unexpected OSError)
    (out / "checkpoints").write_text("user data\n")
    p = run(TRAIN + train_args(out, "parallel.ep_size=1"), clean_env(), timeout=LAUNCH_TIMEOUT, check=False)
    assert p.returncode == 1, p.stdout[-3000:]
    assert "Traceback" in p.stdout and "mom-train: rank 0/1 on host" in p.stdout, p.stdout[-3000:]
    assert "failed: NotADirectoryError" in p.stdout and (out / "checkpoints").read_text() == "user data\n"


def test_mpi4py_of_another_mpi_falls_back_with_one_line(tmp_path):
    """The venv's mpi4py is built for the mpich wheel; under Open MPI's mpirun initialising it
    aborts the process ("unsupported PMI version"). With Open MPI's variables and no MASTER_ADDR
    on a 2-node job, mom-train must not touch MPI: one line says why, then the usual MASTER_ADDR
    error (exit 2)."""
    env = clean_env(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="0",
                    OMPI_COMM_WORLD_LOCAL_SIZE="1")
    p = run(TRAIN + train_args(tmp_path / "out"), env, timeout=120, check=False)
    assert p.returncode == 2, p.stdout[-3000:]
    assert p.stdout.count("mom-train: note: not using mpi4py for the rendezvous: the installed mpi4py loads "
                          "mpich's libmpi but openmpi started this job") == 1, p.stdout[-3000:]
    assert "mom-train: error: MASTER_ADDR is not set for a multi-node mpi job (2 ranks, 1 per node)" in p.stdout
