"""Launching the scale rehearsal's runs (``benchmarks/scale_rehearsal.py``): our own launchers and
commands only - ``sbatch launchers/slurm.sbatch`` on the harness's SLURM, one
``launchers/deepspeed_multinode.sh --node_rank K`` per node (DeepSpeed's no-ssh multi-node mode),
and plain ``mom-train`` for one process - with ``MOM_DIST_RANK_STATS`` set so every rank records
its start-up marks, collective counts and held bytes (``mom_dist/train/rank_stats.py``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.launch.launch_utils import BIN, LAUNCHERS, clean_env  # noqa: E402  (the cluster tests' env)

CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
JOB_TIMEOUT = 1800  # s: a world-32 job on 2 shared cores takes minutes


def model_set(batch: int, steps: int) -> list[str]:
    """The rehearsal's tiny MoM: 16 attention and 16 FFN modules (EP up to 16), d_model 32, one
    sequence of 16 tokens per micro-batch, ``batch`` sequences per step (a multiple of every world);
    clipping active (grad_clip 0.3), telemetry every step."""
    return ["data={synthetic: {seed: 7}}", "model.vocab_size=64", "model.max_seq_len=16", "model.d_model=32",
            "model.n_heads=2", "model.n_steps=2", "model.n_attn_modules=16", "model.n_ffn_modules=16",
            "model.attn_router.dim=16", "model.ffn_router.dim=16", "model.attn_router.top_k=1",
            "model.ffn_router.top_k=2", "train.seq_len=16", f"train.global_batch_size={batch}",
            "train.micro_batch_size=1", f"train.steps={steps}", "train.lr=1e-2", "train.warmup_steps=1",
            "train.grad_clip=0.3", "train.eval_batches=2", "train.log_interval=1", "train.telemetry_interval=1",
            "train.tensorboard=false", "train.keep_last=10", "parallel.collective_timeout_s=120"]


@dataclass
class Run:
    """One launch: what ran, where its outputs are, and what came back."""

    name: str
    launcher: str  # slurm | deepspeed | local
    world: int
    nodes: int
    ep: int
    zero: int
    dispatcher: str
    sets: list[str]
    out_dir: str
    stats_dir: str
    log: str = ""
    t0: float = 0.0  # when the launch command was issued
    wall: float = 0.0  # until the job ended
    rc: int | None = None
    state: str = ""
    command: str = ""
    extra: dict = field(default_factory=dict)

    def train_args(self) -> list[str]:
        args = ["--config", CONFIG]
        for item in self.sets + [f"parallel.ep_size={self.ep}", f"parallel.zero_stage={self.zero}",
                                 f"parallel.dispatcher={self.dispatcher}", f"train.out_dir={self.out_dir}"]:
            args += ["--set", item]
        return args

    def env(self, **extra) -> dict:
        return clean_env(MOM_DIST_RANK_STATS=self.stats_dir, PYTHONUNBUFFERED="1", **extra)

    def stats(self) -> list[dict]:
        out = []
        for path in sorted(glob.glob(os.path.join(self.stats_dir, "rank*.json"))):
            with open(path) as f:
                out.append(json.load(f))
        return sorted(out, key=lambda r: r["rank"])

    def records(self, kind: str) -> list[dict]:
        path = os.path.join(self.out_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [r for r in map(json.loads, f) if r.get("kind") == kind]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records("train")}

    def text(self) -> str:
        return open(self.log, errors="replace").read() if self.log and os.path.exists(self.log) else ""


def _short(cmd: list[str]) -> str:
    """The command as a user would type it (repository-relative paths, --set values quoted)."""
    parts = []
    for x in cmd:
        x = x.replace(ROOT + "/", "")
        parts.append(f"'{x}'" if any(c in x for c in " {}:") else x)
    return " ".join(parts)


# ------------------------------------------------------------------------------------ local
def run_local(run: Run, timeout: int = JOB_TIMEOUT) -> Run:
    """``mom-train`` as one process."""
    cmd = [os.path.join(BIN, "mom-train"), *run.train_args()]
    run.command, run.log = _short(cmd), os.path.join(os.path.dirname(run.out_dir), f"{run.name}.log")
    run.t0 = time.time()
    with open(run.log, "w") as log:
        p = subprocess.run(cmd, env=run.env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    run.wall, run.rc = time.time() - run.t0, p.returncode
    run.state = "COMPLETED" if p.returncode == 0 else f"exit {p.returncode}"
    return run


# ------------------------------------------------------------------------------------ SLURM
def submit_slurm(slurm, run: Run, **env) -> str:
    """``sbatch -N nodes --ntasks-per-node world/nodes launchers/slurm.sbatch ...`` from the run's
    directory (outside the repository, as a user would); returns the job id."""
    work = os.path.dirname(run.out_dir)
    log = os.path.join(work, f"{run.name}-%j.out")
    cmd = ["sbatch", "--parsable", f"-N{run.nodes}", f"--ntasks-per-node={run.world // run.nodes}",
           f"--output={log}", os.path.join(LAUNCHERS, "slurm.sbatch"), *run.train_args()]
    e = run.env(VENV=sys.prefix, **slurm.env, **env)
    run.command = _short(cmd)
    run.t0 = time.time()
    p = subprocess.run(cmd, cwd=work, env=e, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"sbatch failed: {p.stderr.strip()}")
    job = p.stdout.strip().split(";")[0]
    run.log, run.extra["job"] = log.replace("%j", job), job
    return job


def run_slurm(slurm, run: Run, timeout: int = JOB_TIMEOUT) -> Run:
    job = submit_slurm(slurm, run)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    run.wall, run.state = time.time() - run.t0, info.get("JobState", "?")
    run.rc = 0 if run.state == "COMPLETED" else 1
    return run


def killed_rank_named(slurm, run: Run, rank: int, limit: float = 60.0) -> dict:
    """Start a long run, SIGKILL ``rank`` (its PID from its rank-stats record) after its first step,
    and time until the job's output names it (srun's ``task R: Killed`` or the survivors'
    ``rank(s) ... R``)."""
    job = submit_slurm(slurm, run)
    record = os.path.join(run.stats_dir, f"rank{rank}.json")
    deadline = time.time() + JOB_TIMEOUT
    while not os.path.exists(record):
        if time.time() > deadline or slurm.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            raise RuntimeError(f"rank {rank} never reached its first step; see {run.log}")
        time.sleep(0.5)
    pid = json.load(open(record))["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    named = re.compile(rf"task {rank}: Killed|rank\(s\) [0-9, ]*\b{rank}\b")
    seen = None
    while time.time() - killed < limit + 30:
        if seen is None and named.search(run.text()):
            seen = time.time() - killed
        state = slurm.job(job).get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED") and seen is not None:
            break
        time.sleep(0.2)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 120, release=False)
    run.wall, run.state = time.time() - run.t0, info.get("JobState", "?")
    line = next((x for x in run.text().splitlines() if named.search(x)), "")
    return {"pid": pid, "named_after_s": seen, "line": line.strip(), "job_state": run.state}


# ------------------------------------------------------------------------------------ deepspeed
def run_deepspeed(run: Run, hosts: list[str], timeout: int = JOB_TIMEOUT) -> Run:
    """``launchers/deepspeed_multinode.sh --hostfile H --node_rank K`` once per node (DeepSpeed's
    --no_ssh mode: every node starts its own slots and they meet at MASTER_ADDR)."""
    work = os.path.dirname(run.out_dir)
    hostfile = os.path.join(work, f"{run.name}.hostfile")
    per_node = run.world // run.nodes
    with open(hostfile, "w") as f:
        f.writelines(f"{h} slots={per_node}\n" for h in hosts[:run.nodes])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = ["bash", os.path.join(LAUNCHERS, "deepspeed_multinode.sh"), "--hostfile", hostfile,
            "--master_addr", "127.0.0.1", "--master_port", str(port)]
    env = run.env(DEEPSPEED=os.path.join(BIN, "deepspeed"))
    run.command = _short(base + ["--node_rank", "K", "--", *run.train_args()]) + f"   (K = 0..{run.nodes - 1})"
    run.log = os.path.join(work, f"{run.name}.log")
    run.t0 = time.time()
    procs, logs = [], []
    for k in range(run.nodes):
        logs.append(open(os.path.join(work, f"{run.name}-node{k}.log"), "w"))
        procs.append(subprocess.Popen(base + ["--node_rank", str(k), "--", *run.train_args()], cwd=work, env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    run.wall = time.time() - run.t0
    with open(run.log, "w") as out:
        for k in range(run.nodes):
            out.write(f"===== node {k} =====\n" + open(os.path.join(work, f"{run.name}-node{k}.log")).read())
    run.rc = max(codes)
    run.state = "COMPLETED" if run.rc == 0 else f"exit {codes}"
    return run
