"""What a run does when its numbers go wrong or it is relaunched (issue 15), with real ``mom-train``
processes on a tiny model whose learning rate is chosen to blow up:

- a finite blow-up whose validation loss is not finite stops with exit 3 before that step is
  saved (at the final step and at a periodic evaluation); ``latest`` stays the good checkpoint;
- the opt-in loss-spike guard (``train.max_loss_ratio``) skips spiking steps like non-finite
  ones and stops after ``max_nonfinite_steps`` of them, rolling ``latest`` back;
- relaunching a finished run says that no step ran, with the checkpoint's loss;
- after a SIGKILL past the last checkpoint, the resumed run leaves one record per step in
  ``metrics.jsonl`` (the killed launch's are moved aside) and ``mom-report`` draws from them.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_utils import ROOT
from tests.parallel.test_checkpoint_safety import ENV, cmd, copy_of, errors, good_run, latest, mom_train  # noqa: F401


def tags(out):
    return sorted(t for t in os.listdir(out / "checkpoints") if t.startswith("step"))


def records(out, kind="train"):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


@pytest.mark.parametrize("where", ["final", "periodic"])
def test_nonfinite_validation_stops_before_the_step_is_saved(good_run, tmp_path, where):
    """lr 1e18 from step 3 on: step 3's training loss is finite (its weights are step 2's), its
    update makes the weights ~1e17 and the validation loss after it is not finite."""
    out = copy_of(good_run, tmp_path)
    steps = ["train.steps=3"] if where == "final" else ["train.steps=6", "train.eval_interval=3"]
    proc = mom_train(out, "train.lr=1e18", *steps)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    (msg,) = errors(proc)
    assert "training diverged at step 3: the validation loss is nan while the step's training loss was 4.1" in msg
    assert "largest |weight|" in msg and "step 3 is not saved. Latest checkpoint: step00000002" in msg
    assert "Traceback" not in proc.stderr and "done:" not in proc.stdout
    assert latest(out) == "step00000002" and "step00000003" not in tags(out)
    assert not (out / "mom_train.lock").exists()


@pytest.mark.parametrize("zero", [0, 1])
def test_loss_spikes_are_skipped_and_stop_the_run(good_run, tmp_path, zero):
    """lr 3 from step 3 on: step 3 is finite (loss ~4.1), its update makes step 4's loss ~100x:
    with max_loss_ratio=5 steps 4, 5, 6 are spikes, skipped (ZeRO 0: our step; ZeRO 1: DeepSpeed's
    overflow path), and the run stops at 6 with step 3's checkpoint - saved right before the
    first spike - no longer `latest`."""
    out = copy_of(good_run, tmp_path)
    proc = mom_train(out, "train.lr=3", "train.max_loss_ratio=5", f"parallel.zero_stage={zero}")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    (msg,) = errors(proc)
    assert "training diverged at step 6: 3 consecutive non-finite or loss-spike steps" in msg, msg
    assert "3 of them loss spikes (the last: loss " in msg and "over train.max_loss_ratio=5 x 4.1" in msg, msg
    assert "(the median loss of the last 3 accepted steps)" in msg, msg
    assert "update skipped (1/3 consecutive)" in proc.stdout and "step 4: loss " in proc.stdout
    assert latest(out) == "step00000002"
    steps = {r["step"]: r for r in records(out)}  # step 6 stops the run before it is logged
    assert [s for s in steps if steps[s].get("skipped")] == [4, 5]
    assert all(steps[s]["loss"] > 5 * 4.1 for s in (4, 5)) and steps[3]["loss"] < 4.2
    # a record's lr is the next step's: a skipped update does not move the schedule
    from mom_dist.parallel.deepspeed_engine import lr_lambda
    assert steps[5]["lr"] == steps[4]["lr"] == steps[3]["lr"] == pytest.approx(3 * lr_lambda(3, 1, 6, 0.1), rel=1e-12)
    assert lr_lambda(3, 1, 6, 0.1) != lr_lambda(4, 1, 6, 0.1)


def test_relaunching_a_finished_run_says_no_step_ran(good_run, tmp_path):
    out = copy_of(good_run, tmp_path)
    loss = json.load(open(out / "checkpoints" / "step00000002" / "mom_state.json"))["loss"]
    before = len(records(out, "valid"))
    proc = mom_train(out, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [x for x in proc.stdout.splitlines() if x.startswith("mom-train: done")]
    assert done == [f"mom-train: done: no step ran: the checkpoint in {out} is at step 2, train.steps=2; its "
                    f"recorded loss {loss:.4f}; raise train.steps to train further"], proc.stdout[-2000:]
    assert len(records(out, "valid")) == before  # nothing evaluated, nothing written


def test_metrics_hold_one_record_per_step_after_a_kill(tmp_path):
    """SIGKILL after the step-3 checkpoint and a few more steps; the relaunch resumes from step 3
    and trains the killed steps again: metrics.jsonl ends with one train and one routing record
    per step (the killed launch's later ones in metrics.superseded.jsonl) and mom-report reads it."""
    out = tmp_path / "run"
    args = cmd(out, "train.steps=500", "train.save_interval=3", "train.keep_last=5", "train.telemetry_interval=1",
               "train.eval_interval=2", "train.eval_batches=1")
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, done = time.time() + 240, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                saved = int(latest(out)[4:])
                done = max(r["step"] for r in records(out))
            except (FileNotFoundError, ValueError):
                saved = 0
            if saved >= 3 and done >= saved + 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert saved >= 3 and done >= saved + 2, (saved, done)
    resume_at = int(latest(out)[4:])
    killed = {r["step"] for r in records(out)}
    assert max(killed) > resume_at  # records of steps the relaunch trains again
    end = max(killed) + 2
    res = mom_train(out, "train.steps=500", f"train.stop_after={end - resume_at}", "train.save_interval=3",
                    "train.keep_last=5", "train.telemetry_interval=1", "train.eval_interval=2", "train.eval_batches=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {resume_at}" in res.stdout
    assert f"records past step {resume_at} (a launch that ended after its last checkpoint) moved to " \
           "metrics.superseded.jsonl" in res.stdout
    for kind in ("train", "routing"):
        steps = [r["step"] for r in records(out, kind)]
        assert steps == list(range(1, end + 1)), (kind, steps)
    valid = [r["step"] for r in records(out, "valid")]
    assert valid == sorted(set(valid)) and valid[-1] == end
    superseded = [json.loads(x) for x in open(out / "metrics.superseded.jsonl")]
    assert superseded and min(r["step"] for r in superseded) == resume_at + 1
    # a resume on the same layout is exact: the steps trained again give the killed launch's losses
    kept = {r["step"]: r["loss"] for r in records(out)}
    for r in superseded:
        if r["kind"] == "train":
            assert kept[r["step"]] == r["loss"]
    rep = subprocess.run([sys.executable, "-m", "mom_dist.cli.report", str(out)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    from mom_dist.report.run_data import load_run
    run = load_run(str(out))
    assert [r["step"] for r in run.train] == list(range(1, end + 1)) and len(run.routing) == end
    assert os.path.exists(out / "report" / "index.html")
