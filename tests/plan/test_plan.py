"""``mom-plan`` without other processes: counts, validity, traffic formulas, CLI (activations and
FLOPs against measurement: ``test_efficiency.py``)."""

from __future__ import annotations

import glob
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from mom_dist.cli.plan import main
from mom_dist.config import check_world, load_config
from mom_dist.model import ModelConfig, MoMModel, RouterConfig
from mom_dist.parallel.deepspeed_engine import build_ds_config
from mom_dist.parallel.dims import ParallelDims
from mom_dist.plan import ClusterConfig, load_cluster, plan_layouts
from mom_dist.plan.model_size import param_counts
from mom_dist.plan.traffic import RoutingProfile, StepShares, a2a_bytes_per_microbatch
from tests.dist_utils import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")) + glob.glob(os.path.join(ROOT, "configs", "paper", "*.yaml")))
CLUSTERS = sorted(glob.glob(os.path.join(ROOT, "configs", "clusters", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_param_counts_equal_the_model(path):
    m = load_config(path).model
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = MoMModel(m)
    counts = param_counts(m)
    assert counts.total == model.num_parameters()
    assert counts.module == model.num_parameters(modules_only=True)


def build_dims(ep: int, world: int) -> ParallelDims:
    """ParallelDims as ``build_parallel_dims`` makes them, minus the process groups."""
    check_world(ep, world)
    return ParallelDims(world, 0, ep, None, None, None)


def test_layouts_are_exactly_what_the_trainer_accepts():
    """Every candidate the planner lists passes the trainer's checks (config validation and
    DeepSpeed config generation); every one it leaves out is refused by them."""
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))  # 4 + 4 modules, global batch 16
    cluster = ClusterConfig(nodes=2, gpus_per_node=4)
    plan = plan_layouts(cfg, cluster)
    listed = {(lay.ep, lay.zero, lay.micro_batch, lay.checkpointing) for lay in plan.layouts}
    accepted = set()
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    for ep, zero, mb, ac in itertools.product(range(1, 9), range(4), range(1, 17), (False, True)):
        try:  # the trainer's checks, in its order: config, world size, DeepSpeed config
            trial = load_config(tiny, [f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}",
                                       f"train.micro_batch_size={mb}", f"model.activation_checkpointing={ac}"])
            ds = build_ds_config(trial, build_dims(ep, 8))
        except ValueError:
            continue
        assert ds["zero_optimization"]["stage"] == zero != 3
        if mb & (mb - 1) == 0:  # the planner tries powers of two (and the config's own value)
            accepted.add((ep, zero, mb, ac))
    assert listed == accepted
    assert {lay.ep for lay in plan.layouts} == {1, 2, 4}
    assert "ZeRO-3" in plan.rejected and "EP does not divide the module pools" in plan.rejected
    assert plan.recommended in plan.layouts


def test_uniform_traffic_counts():
    """Uniform routing: K=1 sends (E-1)/E of the tokens; K=2 of 4 modules on 2 ranks reaches the
    other rank unless both picks are local (1 of 6 pairs of modules): U = T (5/6)."""
    m = ModelConfig(vocab_size=64, max_seq_len=16, d_model=8, n_heads=2, n_bottom=0, n_top=0, n_steps=1,
                    attn_router=RouterConfig(top_k=2), ffn_router=RouterConfig(top_k=2))
    shares = StepShares("ffn", [0.25] * 4, 0.0)
    u, wp = shares.u_wp(600, 2, 2)
    assert (u, wp) == (pytest.approx(600 * 5 / 6), 600)
    assert StepShares("ffn", [0.25] * 4, 0.0).u_wp(600, 1, 4) == (450, 450)
    b = a2a_bytes_per_microbatch(m, RoutingProfile.uniform(m), tokens=600, ep=2, precision="bf16")
    # attention: U x 6d + Wp; FFN: U x 2d + Wp, at 2 bytes
    assert b.payload == pytest.approx(2 * (500 * 6 * 8 + 600 + 500 * 2 * 8 + 600))
    skewed = StepShares("ffn", [0.7, 0.1, 0.1, 0.1], 0.0)
    assert skewed.imbalance(2) == pytest.approx(0.8 / 0.5)


# ------------------------------------------------------------------------------ CLI
def _cluster(tmp_path, text: str) -> str:
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    return str(p)


GOOD = "nodes: 1\ngpus_per_node: 8\ngpu_memory_gb: 80\npeak_bf16_tflops: 989\nintra_node_gbps: 3600\ninter_node_gbps: 400\n"


def test_cli_table(capsys):
    assert main([os.path.join(ROOT, "configs", "mom-small.yaml"), "--cluster",
                 os.path.join(ROOT, "configs", "clusters", "h100-1x8.yaml")]) == 0
    out = capsys.readouterr().out
    assert "recommended: parallel.ep_size=1" in out and "assumptions:" in out
    assert out.count("\n   ") >= 40 or len(out.splitlines()) > 40  # every valid layout is listed
    assert main([os.path.join(ROOT, "configs", "tiny.yaml"), "--cluster",
                 os.path.join(ROOT, "configs", "clusters", "h100-1x8.yaml"), "--markdown", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "| * |" in out and "more layouts not shown" in out


@pytest.mark.parametrize("path", CLUSTERS, ids=os.path.basename)
def test_shipped_clusters_plan_every_preset(path, capsys):
    world = load_cluster(path).world
    for config in ("mom-small.yaml", "mom-medium.yaml", "mom-large.yaml"):
        assert main([os.path.join(ROOT, "configs", config), "--cluster", path, "--limit", "1",
                     "--set", f"train.global_batch_size={world * 4}"]) == 0
    assert "recommended: parallel.ep_size" in capsys.readouterr().out


def test_planner_imports_neither_deepspeed_nor_the_trainer(tmp_path):
    code = ("import sys; from mom_dist.cli.plan import main; "
            f"rc = main([{os.path.join(ROOT, 'configs', 'tiny.yaml')!r}, '--cluster', "
            f"{os.path.join(ROOT, 'configs', 'clusters', 'h100-1x8.yaml')!r}, '--limit', '1']); "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m.startswith('mom_dist.train')]; "
            "print('BAD', bad); sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "BAD []" in res.stdout


ERRORS = [
    # (cluster text or None for the GOOD one, extra args, expected message part)
    ("nodes: 1\ngpus_per_node: 8\ngpu_mem_gb: 80\n", [], "unknown config key 'cluster.gpu_mem_gb'. Did you mean "
                                                         "'cluster.gpu_memory_gb'?"),
    ("nodes: 1\ngpus_per_node: 0\n", [], "cluster.gpus_per_node=0 must be a whole number >= 1"),
    ("nodes: 1\ninter_node_gbps: fast\n", [], "cluster.inter_node_gbps='fast' must be a number"),
    ("nodes: [1\n", [], "is not valid YAML"),
    ("- 1\n- 2\n", [], "must hold a mapping"),
    (None, ["--set", "train.global_batch_size=4"], "no valid layout on 8 GPUs: train.global_batch_size=4 is not a "
                                                   "multiple of the 8 GPUs' micro-batches; plan with --set "
                                                   "train.global_batch_size=8 (or another multiple of 8)"),
    (None, ["--set", "train.global_batch_size=20"], "train.global_batch_size=16 or 24"),
    (None, ["--set", "parallel.zero_stage=3"], "parallel.zero_stage=3 is not supported"),
    (None, ["--mfu", "1.5"], "--mfu 1.5 must be in (0, 1]"),
]


@pytest.mark.parametrize("text,extra,message", ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_cli_bad_input(tmp_path, capsys, text, extra, message):
    cluster = _cluster(tmp_path, text if text is not None else GOOD)
    before = {p: open(p).read() for p in (cluster,)}
    rc = main([os.path.join(ROOT, "configs", "tiny.yaml"), "--cluster", cluster, *extra])
    err = capsys.readouterr()
    assert rc == 2
    assert err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mom-plan: error: ") and message in lines[0], lines
    assert {p: open(p).read() for p in before} == before and os.listdir(tmp_path) == ["cluster.yaml"]


def test_cli_missing_files(tmp_path, capsys):
    good = _cluster(tmp_path, GOOD)
    for argv, message in (([str(tmp_path / "nope.yaml"), "--cluster", good], "config file"),
                          ([os.path.join(ROOT, "configs", "tiny.yaml"), "--cluster", str(tmp_path / "no.yaml")],
                           "cluster file"),
                          ([os.path.join(ROOT, "configs", "tiny.yaml"), "--cluster", good, "--routing", str(tmp_path)],
                           "no metrics.jsonl there")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mom-plan: error: ") and message in err[0], err
    assert os.listdir(tmp_path) == ["cluster.yaml"]


def _routing_run(run, loads_attn, loads_ffn, skip=0.0) -> str:
    """A run directory with the routing record the trainer writes (mom_dist.train.telemetry)."""
    run.mkdir()
    detail = [{"chunk": 0, "step": s, "pool": pool, "load": loads, "skip_rate": skip, "dropped": 0, "entropy": 1.0,
               "ep_load_max_over_mean": 1.0} for s in range(4)
              for pool, loads in (("attn", loads_attn), ("ffn", loads_ffn))]
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "train", "step": 50, "loss": 3.0}) + "\n")
        f.write(json.dumps({"kind": "routing", "step": 50, "a2a_MB_sent": 0.0, "detail": detail}) + "\n")
        f.write('{"kind": "routing", "step": 5')  # a line cut short by a killed run is skipped
    return str(run)


def test_cli_routing_from_a_run(tmp_path, capsys):
    cluster = _cluster(tmp_path, GOOD)
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    run = _routing_run(tmp_path / "run", [400, 100, 100, 100], [100, 100, 100, 100], skip=0.3)
    assert main([tiny, "--cluster", cluster, "--routing", run, "--markdown", "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert "routing telemetry of step 50" in out and "busiest EP rank x" in out
    # a run with another pool size than the config: refused with the fix
    bad = _routing_run(tmp_path / "other", [1, 2, 3], [1, 2, 3, 4])
    assert main([tiny, "--cluster", cluster, "--routing", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mom-plan: error: ") and "3 attn modules per chunk but the config has 4" in err
