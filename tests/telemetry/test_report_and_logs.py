"""mom-report on a real short run, TensorBoard images/histograms, the log lines, quiet start-up.

One module fixture runs the real commands the way a user does: ``mom-preprocess`` on a few
text files (a real megatron-core indexed dataset, so megatron's import path is exercised) and
``mom-train`` on 2 ranks (torchrun, EP2) for 6 steps with telemetry every 2 steps and
TensorBoard on; the tests read its output directory, stdout and stderr.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from mom_dist.parallel.local_launch import REPO, free_port

RUN = [sys.executable, "-m"]
STEP_LINE = re.compile(r"^step +(\d+)/(\d+) \| loss \d+\.\d{4} \| lm \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| "
                       r"grad \d+\.\d{3} \| [\d,]+ tok/s \| elapsed \d+:\d\d(:\d\d)? \| eta \d+:\d\d(:\d\d)?$")


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("MOM_DIST_VERBOSE", None)
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from pydoc_data.topics import topics

    tmp = tmp_path_factory.mktemp("run")
    (tmp / "txt").mkdir()
    for i, k in enumerate(sorted(topics)[:60]):
        (tmp / "txt" / f"d{i}.txt").write_text(topics[k])
    pre = subprocess.run(RUN + ["mom_dist.cli.preprocess", str(tmp / "txt"), "-o", str(tmp / "data" / "x"),
                                "--vocab-size", "512", "--workers", "1", "--no-progress"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr
    out = tmp / "out"
    data = (f"data={{train_prefixes: [{tmp}/data/x_train_text_document], valid_prefixes: "
            f"[{tmp}/data/x_valid_text_document], tokenizer_model: {tmp}/data/x_tokenizer.model}}")
    sets = ["model.vocab_size=512", "model.max_seq_len=32", "model.d_model=32", "model.n_heads=2", "model.n_steps=2",
            "model.attn_router.dim=16", "model.ffn_router.dim=16", "train.seq_len=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.steps=6", "train.warmup_steps=1", "train.log_interval=2",
            "train.telemetry_interval=2", "train.eval_interval=3", "train.eval_batches=2", "train.save_interval=0",
            "train.tensorboard=true", f"train.out_dir={out}", data]
    # Two ranks (EP2) the way users launch them: per-rank noise and rank-0-only lines show up.
    cmd = RUN + ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                 "-m", "mom_dist.cli.train", "--config", "configs/tiny.yaml", "--set", "parallel.ep_size=2"]
    cmd += [a for s in sets for a in ("--set", s)]
    train = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    return dict(out=out, stdout=train.stdout, stderr=train.stderr, pre=pre)


# ------------------------------------------------------------------------------ logs
def test_train_output_is_ours_only(run):
    noise = ["Transformer Engine", "Apex", "Setting accelerator", "built successfully", "Warning"]
    for text in (run["stdout"], run["stderr"], run["pre"].stderr):
        for n in noise:
            assert n not in text, f"{n!r} in output:\n{text}"
    assert run["stderr"].strip() == ""
    for line in run["stdout"].strip().splitlines():
        assert (STEP_LINE.match(line) or line.startswith(("[valid] ", "mom-train: done", "[mom_dist] rank "))), line
    assert len([line for line in run["stdout"].splitlines() if line.startswith("[valid] ")]) == 2  # rank 0 only


def test_progress_lines_every_interval_with_eta(run):
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, run["stdout"].splitlines()) if m]
    assert steps == [1, 2, 4, 6]  # the first step, every log_interval, the last
    last = [line for line in run["stdout"].splitlines() if STEP_LINE.match(line)][-1]
    assert last.endswith("eta 0:00")
    valid = [line for line in run["stdout"].splitlines() if line.startswith("[valid] step 3 ")]
    assert len(valid) == 1 and re.search(r"\(2 batches, \d+\.\d s\)$", valid[0])


def test_eta_and_durations(monkeypatch):
    from mom_dist.train import metrics

    assert metrics.format_duration(59.6) == "1:00" and metrics.format_duration(3725) == "1:02:05"
    clock = iter([100.0, 110.0, 130.0])  # start, step 1 done (10 s, warm-up), step 3 done (10 s/step)
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    eta = metrics.ETA(total=10)
    assert eta.update(1) == (10.0, 90.0)  # until a second step is timed: the first step's pace
    assert eta.update(3) == (30.0, 70.0)  # (130 - 110) / 2 steps x 7 steps left
    line = metrics.progress_line(3, 10, dict(loss=1, lm_loss=1, lr=1e-3, grad_norm=0.5, tokens_per_s=1234.5), 30.0, 70.0)
    assert line.endswith("| 1,234 tok/s | elapsed 0:30 | eta 1:10"), line


def test_eval_progress_is_a_plain_range_off_a_terminal():
    from mom_dist.train.metrics import eval_progress

    assert list(eval_progress(3)) == [0, 1, 2]  # pytest's stderr is not a terminal: no bar


# ------------------------------------------------------------------------------ telemetry in the run
def test_routing_records_in_the_run(run):
    recs = [json.loads(line) for line in open(run["out"] / "metrics.jsonl")]
    routing = [r for r in recs if r["kind"] == "routing"]
    assert [r["step"] for r in routing] == [2, 4, 6]
    for r in routing:
        assert r["tokens"] == 4 * 32 and r["micro_batches"] == 2 and r["world_size"] == r["ep_size"] == 2
        assert r["a2a_bytes_sent"] > 0 and len(r["a2a_bytes_per_rank"]) == 2
        assert {(d["chunk"], d["pool"]) for d in r["depth"]} == {(0, "attn"), (0, "ffn"), (0, "all")}


def test_tensorboard_gets_images_and_histograms(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run["out"] / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    ev.Reload()
    tags = ev.Tags()
    assert {"figures/load_chunk0", "figures/load_change_chunk0", "figures/depth_skip"} <= set(tags["images"])
    assert {"routing_load/chunk0_attn", "routing_load/chunk0_ffn", "routing_depth/chunk0_all"} <= set(tags["histograms"])
    assert [e.step for e in ev.Images("figures/load_chunk0")] == [2, 4, 6]
    assert "train/loss" in tags["scalars"] and "routing/skip_rate" in tags["scalars"]
    h = ev.Histograms("routing_load/chunk0_ffn")[-1].histogram_value
    rec = [json.loads(line) for line in open(run["out"] / "metrics.jsonl") if '"routing"' in line][-1]
    want = sum(sum(d["load"]) for d in rec["detail"] if d["pool"] == "ffn")
    assert h.num == want  # the histogram holds the record's picks


# ------------------------------------------------------------------------------ mom-report
def test_report_on_the_run(run, tmp_path):
    from mom_dist.report.page import build_report
    from mom_dist.report.run_data import load_run

    res = subprocess.run(RUN + ["mom_dist.cli.report", str(run["out"])], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout.startswith("mom-report: 5 figures -> ")
    report = run["out"] / "report"
    page = (report / "index.html").read_text()
    files = sorted(p.name for p in report.glob("*.png"))
    assert files == ["depth_skip.png", "load_change_chunk0.png", "load_chunk0.png", "parallel.png", "training.png"]
    for f in files:
        assert f"src='{f}'" in page and (report / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = build_report(load_run(str(run["out"])), str(tmp_path / "r"), steps=[2, 6])
    panels = {f["name"]: f["panels"] for f in manifest["figures"]}
    assert panels["training"] == ["Loss", "Perplexity", "Learning rate", "Gradient norm (before clipping)"]
    assert panels["load_chunk0"] == ["attention modules, training step 2", "FFN modules, training step 2",
                                     "attention modules, training step 6", "FFN modules, training step 6"]
    assert panels["load_change_chunk0"] == ["attention modules", "FFN modules"]
    assert panels["depth_skip"] == ["Per-token depth (first and last telemetry step)", "Mean per-token depth",
                                    "SKIP rate", "Router entropy (mean over routers)"]
    assert panels["parallel"] == ["EP load imbalance (ep_size=2)", "All-to-all payload per step (forward)",
                                  "Throughput", "Dropped (token, module) pairs (capacity mode)"]
    assert manifest["missing"] == []


def test_heatmap_cells_are_the_recorded_shares(run):
    from mom_dist.report import figures
    from mom_dist.report.run_data import load_run

    rec = load_run(str(run["out"])).routing[-1]
    fig = figures.fig_load_heatmaps([rec], 0)
    ffn = [a for a in fig.axes if a.get_title().startswith("FFN")][0]
    grid = ffn.images[0].get_array()
    d = [d for d in rec["detail"] if d["pool"] == "ffn" and d["step"] == 1][0]
    picks = d["tokens"] * d["top_k"]
    assert list(grid[:, 1]) == pytest.approx([n / picks for n in d["load"]] + [d["skip"] / picks])
    assert [t.get_text() for t in ffn.get_yticklabels()][-1] == "SKIP"
    assert ffn.get_xlabel() == "routing step" and ffn.get_ylabel() == "module"


# ------------------------------------------------------------------------------ mom-report errors
def _report(*args):
    return subprocess.run(RUN + ["mom_dist.cli.report", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300)


def _one_error_line(res, *words):
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mom-report: error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_report_errors_missing_and_empty_run_dir(tmp_path):
    _one_error_line(_report(tmp_path / "nope"), "does not exist", "train.out_dir")
    (tmp_path / "empty").mkdir()
    _one_error_line(_report(tmp_path / "empty"), "metrics.jsonl not found")
    assert os.listdir(tmp_path / "empty") == []  # nothing written into a directory that is not a run
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("\n")
    _one_error_line(_report(tmp_path / "blank"), "no train, valid or routing records")


def test_report_without_telemetry_draws_what_it_can(run, tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    lines = [line for line in open(run["out"] / "metrics.jsonl") if '"routing"' not in line]
    (d / "metrics.jsonl").write_text("".join(lines) + '{"kind": "train", "st')  # + a half-written line
    before = (d / "metrics.jsonl").read_text()
    res = _report(d)
    _one_error_line(res, "no routing telemetry", "telemetry_interval")
    assert sorted(p.name for p in (d / "report").glob("*.png")) == ["parallel.png", "training.png"]
    assert "training.png" in (d / "report" / "index.html").read_text()
    assert (d / "metrics.jsonl").read_text() == before  # the run's data is untouched


def test_report_bad_line_and_bad_steps(run, tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    lines = open(run["out"] / "metrics.jsonl").read().splitlines()
    (d / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    _one_error_line(_report(d), "line 3", "metrics record")
    res = _report(run["out"], "--steps", "a,b")
    assert res.returncode == 2 and "--steps" in res.stderr
