"""A run never destroys a good checkpoint (issue 7, part 2): real ``mom-train`` / ``mom-convert``
processes, their exit codes and messages, and what is left on disk.

One rule per test: non-finite steps -> exit 3 with the good checkpoint as ``latest``; a model
change is refused with nothing written or pruned (``config.json`` included); recipe changes are
applied and logged; one run per out_dir (a concurrent run refused, a stale lock taken over, a
directory other ranks cannot see refused); a pickle that would run code is refused on resume,
``init_from`` and ``mom-convert export``; a full disk names the path and keeps ``latest``.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mom_dist.parallel.deepspeed_engine import lr_lambda
from tests.dist_utils import ROOT, free_port, worker_env
from tests.parallel.test_layout_invariance import BASE
from tests.payloads import CreatesFile

OVR = [o for o in BASE if not o.startswith(("train.save_interval", "train.log_interval"))] + [
    "model.attn_router.top_k=2", "model.ffn_router.top_k=2", "parallel.zero_stage=0",
    "train.save_interval=1", "train.keep_last=1", "train.log_interval=1"]
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def cmd(out, *extra):
    args = [sys.executable, "-m", "mom_dist.cli.train", "--config", "configs/tiny.yaml"]
    for o in OVR + [f"train.out_dir={out}"] + list(extra):
        args += ["--set", o]
    return args


def mom_train(out, *extra, timeout=240):
    return subprocess.run(cmd(out, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith(("mom-train: error:", "mom-train: diverged:"))]


def snapshot(d) -> dict:
    """Every file under ``d`` with its size, mtime and content (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns, open(p, "rb").read())
    return out


def latest(out) -> str:
    return open(os.path.join(out, "checkpoints", "latest")).read()


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """Two finite steps, a checkpoint after each (keep_last=1 keeps both: see _prune)."""
    out = tmp_path_factory.mktemp("good") / "run"
    proc = mom_train(out, "train.stop_after=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) >= ["latest", "step00000001", "step00000002"]
    return out


def copy_of(good_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(good_run, dst)
    return dst


def test_nonfinite_steps_exit_3_and_keep_the_good_checkpoint(good_run, tmp_path):
    out = copy_of(good_run, tmp_path)
    # lr 1e6 from step 3 on: step 3's update is applied (its loss was finite), steps 4.. are nan.
    proc = mom_train(out, "train.lr=1e6")
    assert proc.returncode == 3, proc.stderr[-3000:]
    (msg,) = errors(proc)
    assert "training diverged at step 6: 3 consecutive non-finite steps" in msg
    assert "non-finite losses: loss=nan" in msg and "chunks.0.ffn_router" in msg and "chunks.0.attn_pool" in msg
    assert "update skipped (1/3 consecutive)" in proc.stdout
    # step 3 was saved, but its update caused the nan: latest goes back to step 2, which stays.
    assert latest(out) == "step00000002"
    state = json.load(open(out / "checkpoints" / "step00000002" / "mom_state.json"))
    assert state["finite"] and state["step"] == 2
    assert not any(t > "step00000003" for t in os.listdir(out / "checkpoints"))
    assert not (out / "mom_train.lock").exists()
    # The kept checkpoint resumes, and the skipped updates left the weights finite.
    proc = mom_train(out, "train.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stdout and "final loss 4.1" in proc.stdout


def test_model_change_is_refused_before_anything_is_written(good_run, tmp_path):
    out = copy_of(good_run, tmp_path)
    before = snapshot(out)
    for change, expect in (("model.n_steps=4", "model.n_steps: 2 in the checkpoint, 4 now"),
                           ("model.attn_router.allow_skip=false", "model.attn_router.allow_skip: True"),
                           ("train.global_batch_size=16", "train.global_batch_size: 8 in the checkpoint, 16 now"),
                           ("train.micro_batch_size=4", "train.micro_batch_size: 2 in the checkpoint, 4 now; they "
                            "decide the balance and z losses, computed per micro-batch")):
        proc = mom_train(out, change)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (msg,) = errors(proc)
        assert expect in msg and "train.out_dir" in msg, msg
        assert snapshot(out) == before, change  # nothing pruned, config.json untouched, lock released


def test_recipe_change_is_applied_and_logged(good_run, tmp_path):
    out = copy_of(good_run, tmp_path)
    proc = mom_train(out, "train.lr=5e-3", "train.steps=5", "model.activation_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.lr changed from 0.01 to 0.005; applied from step 3 on" in proc.stdout
    assert "train.steps changed from 6 to 5" in proc.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    lr3 = [r["lr"] for r in records if r.get("kind") == "train" and r.get("step") == 3][-1]
    assert lr3 == pytest.approx(5e-3 * lr_lambda(3, 1, 5, 0.1), rel=1e-12)  # logged after the step: next lr
    state = json.load(open(out / "checkpoints" / latest(out) / "mom_state.json"))
    assert state["config"]["train"]["lr"] == 5e-3 and state["step"] == 5


def test_second_run_on_a_locked_out_dir_is_refused_and_the_lock_released(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(cmd(out, "train.steps=500", "train.save_interval=0"), cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / "mom_train.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    holder = json.load(open(lock))
    assert holder["pid"] == first.pid
    config = open(out / "config.json").read()
    second = mom_train(out)
    assert second.returncode == 2
    (msg,) = errors(second)
    assert f"is in use by another mom-train (host {holder['host']}, pid {first.pid}, started " in msg
    assert open(out / "config.json").read() == config and json.load(open(lock))["pid"] == first.pid
    first.send_signal(signal.SIGUSR1)  # preemption: leaves cleanly and releases the lock
    first.communicate(timeout=120)
    assert first.returncode == 75 and not lock.exists()  # preempted: mom_dist.exit_codes.PREEMPTED


def test_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: its run died without releasing the lock
    import socket
    json.dump({"host": socket.gethostname(), "pid": gone.pid, "start": "yesterday", "token": "x"},
              open(out / "mom_train.lock", "w"))
    proc = mom_train(out, "train.steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed the stale lock of a run that no longer exists (host {socket.gethostname()}, pid {gone.pid}" \
        in proc.stdout
    assert not (out / "mom_train.lock").exists() and latest(out) == "step00000001"


def test_out_dir_not_shared_by_all_ranks_is_refused(tmp_path):
    """A relative out_dir under two working directories stands for a node-local path."""
    port = free_port()
    procs = []
    for rank in range(2):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir()
        args = cmd("run", "train.steps=1")
        args[args.index("configs/tiny.yaml")] = os.path.join(ROOT, "configs/tiny.yaml")
        procs.append(subprocess.Popen(args, cwd=cwd, env=worker_env(rank, 2, port), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], logs
    assert "is not the same directory on every node: rank(s) 1 (" in logs[0][1]
    # nothing written: the lock is released and the directory it created removed again
    assert not (tmp_path / "node0" / "run").exists() and not (tmp_path / "node1" / "run").exists()


def _poison(path, marker):
    torch.save({"module": CreatesFile(str(marker))}, path)


def test_a_pickle_that_runs_code_is_refused_everywhere(good_run, tmp_path):
    out = copy_of(good_run, tmp_path)
    marker = tmp_path / "pwned"
    step = out / "checkpoints" / "step00000002"
    # resume: the RNG files are the checkpoint's only pickles (the state itself is safetensors).
    # A swapped file fails its checksum first; one whose checksum was forged to match (mom_state.json
    # rewritten with it) is still only read as plain data.
    _poison(step / "rng_rank00000.pt", marker)
    proc = mom_train(out)
    assert proc.returncode == 2 and "is damaged (" in errors(proc)[0], proc.stderr[-3000:]
    from mom_dist.checkpoint.integrity import file_record
    from mom_dist.checkpoint.layout import read_state, write_state
    state = read_state(str(step))
    state["files"]["rng_rank00000.pt"] = file_record(str(step / "rng_rank00000.pt"))
    write_state(str(step), state)
    before = snapshot(out)
    proc = mom_train(out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (msg,) = errors(proc)
    assert f"refusing to load '{step / 'rng_rank00000.pt'}'" in msg and "could run code" in msg
    assert not marker.exists() and snapshot(out) == before
    # init_from and mom-convert export of a checkpoint in DeepSpeed's own (earlier) format read
    # its pickled weights: make the checkpoint look like one (no format mark, DeepSpeed's file)
    with open(step / "mom_state.json") as f:
        state = json.load(f)
    for key in ("format", "files", "state_xxh3_64"):  # what those versions did not write
        state.pop(key)
    with open(step / "mom_state.json", "w") as f:
        json.dump(state, f)
    _poison(step / "mp_rank_00_model_states.pt", marker)
    proc = mom_train(tmp_path / "new", f"train.init_from={out}")
    assert proc.returncode == 2 and "could run code" in errors(proc)[0], proc.stderr[-3000:]
    exp = subprocess.run([sys.executable, "-m", "mom_dist.cli.convert", "export", str(out), "-o",
                          str(tmp_path / "exp")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert exp.returncode == 2 and "mom-convert: error: refusing to load" in exp.stderr, exp.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "exp").exists()


def test_rng_files_are_plain_tensors(tmp_path):
    import random

    from mom_dist.checkpoint.safe_load import UnsafeCheckpointFile, load_rng, save_rng

    random.seed(5)
    torch.manual_seed(5)
    save_rng(str(tmp_path / "rng.pt"))
    expect = (random.random(), torch.rand(3))
    random.seed(0)
    torch.manual_seed(0)
    load_rng(str(tmp_path / "rng.pt"))
    assert (random.random(), *torch.rand(3).tolist()) == (expect[0], *expect[1].tolist())
    _poison(tmp_path / "bad.pt", tmp_path / "pwned")
    with pytest.raises(UnsafeCheckpointFile, match=r"could run code \(it names io.open\)"):
        load_rng(str(tmp_path / "bad.pt"))
    assert not (tmp_path / "pwned").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 2.5 MiB tmpfs (root only): room for one checkpoint of this model, not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(8) for a size-limited tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_full_disk_names_the_path_and_keeps_latest(small_disk):
    out = small_disk / "run"
    proc = mom_train(out, "train.steps=8")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(errors(proc)) == 1, proc.stderr[-3000:]  # one line only
    # the disk fills during some save after the first: that save is named, the one before stays latest
    full = re.search(r"No space left on device while writing checkpoint '(.*?)/step(\d{8})'", proc.stderr)
    assert full and full.group(1) == f"{out}/checkpoints", proc.stderr[-3000:]
    failed = int(full.group(2))
    assert failed >= 2 and latest(out) == f"step{failed - 1:08d}"
    assert f"step{failed:08d}" not in os.listdir(out / "checkpoints")  # the partial one is removed
    from mom_dist.checkpoint.consolidate import consolidate
    assert consolidate(str(out))[2]["step"] == failed - 1  # the kept checkpoint is whole


def test_divergence_with_expert_parallel_zero2_ranks(tmp_path):
    """Two ranks, EP2, ZeRO-2 (DeepSpeed's own overflow path): both stop with exit code 3, rank 0
    prints the diagnosis once; the only checkpoint, written right before the divergence, is named
    suspect."""
    out, port = tmp_path / "run", free_port()
    args = cmd(out, "parallel.ep_size=2", "parallel.zero_stage=2", "train.lr=1e6", "train.max_nonfinite_steps=2")
    procs = [subprocess.Popen(args, cwd=ROOT, env=worker_env(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    logs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], logs
    msgs = [errors(subprocess.CompletedProcess([], 3, out_, err)) for out_, err in logs]
    assert len(msgs[0]) == 1 and msgs[1] == []  # one closing line, from rank 0
    assert "2 consecutive non-finite steps (train.max_nonfinite_steps=2)" in msgs[0][0]
    assert "chunks.0.ffn_pool" in msgs[0][0]  # a pool half of whose modules live on the other rank
    tag = latest(out)
    assert f"Latest checkpoint: {tag} (saved right before step" in msgs[0][0]
    assert json.load(open(out / "checkpoints" / tag / "mom_state.json"))["finite"]
    assert not (out / "mom_train.lock").exists()
