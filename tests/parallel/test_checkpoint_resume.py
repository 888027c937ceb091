"""Checkpoints: exact resume, consolidation, resume on another layout, preemption - on indexed
data written by the data pipeline's own writer."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mom_dist.checkpoint.consolidate import consolidate
from mom_dist.data.loader import write_token_documents
from mom_dist.model import MoMModel
from tests.dist_utils import ROOT, free_port, run_workers, worker_env
from tests.parallel.test_layout_invariance import BASE, params

V = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(3)
    for split, n in (("train", 120), ("valid", 20)):
        docs = []
        for _ in range(n):
            start, step = torch.randint(1, V, (2,), generator=g).tolist()
            length = int(torch.randint(5, 40, (1,), generator=g))
            docs.append([(start + step * i) % (V - 1) + 1 for i in range(length)] + [0])  # 0 = EOD
        write_token_documents(str(tmp / split), docs, V, eod=0)
    return [f"data={{train_prefixes: [{tmp}/train], valid_prefixes: [{tmp}/valid], cache_dir: {tmp}/cache}}"]


def overrides(out_dir, data, *extra):
    base = [o for o in BASE if not o.startswith(("data=", "train.save_interval"))]
    return base + data + ["model.attn_router.top_k=2", "model.ffn_router.top_k=2", "parallel.ep_size=2",
                          f"train.out_dir={out_dir}", "train.save_interval=100"] + list(extra)


def train(tmp_path, name, world, ovr, **kw):
    args = dict(config="configs/tiny.yaml", overrides=ovr, dump=str(tmp_path / name), **kw)
    return run_workers("train_once", world, args, tmp_path)[0]


@pytest.mark.parametrize("zero", [1, 2])
def test_resume_is_exact(tmp_path, dataset, zero):
    full = train(tmp_path, "full", 2, overrides(tmp_path / "a", dataset, f"parallel.zero_stage={zero}"))
    first = train(tmp_path, "first", 2, overrides(tmp_path / "b", dataset, f"parallel.zero_stage={zero}",
                                                  "train.stop_after=3"))
    assert first["steps_done"] == 3
    assert open(tmp_path / "b" / "checkpoints" / "latest").read() == "step00000003"
    second = train(tmp_path, "second", 2, overrides(tmp_path / "b", dataset, f"parallel.zero_stage={zero}"))
    assert second["steps_done"] == 6
    assert first["losses"] == full["losses"][:3]
    assert second["losses"] == full["losses"][3:]  # bitwise: same floats
    p_full, p_res = params(tmp_path, "full"), params(tmp_path, "second")
    assert p_full.keys() == p_res.keys()
    for k in p_full:
        assert torch.equal(p_full[k], p_res[k]), k

    # The checkpoint consolidates into one plain model with exactly the trained weights.
    cfg, sd, state = consolidate(str(tmp_path / "a"))
    assert state["step"] == 6 and state["consumed_samples"] == 6 * 8
    model = MoMModel(cfg)
    model.load_state_dict(sd)
    for name, p in model.named_parameters():
        head, pname = name.rsplit(".", 1)
        if head.endswith("_pool"):
            for i in range(p.shape[0]):
                assert torch.equal(p[i], p_full[f"{name}[{i}]"]), name
        else:
            assert torch.equal(p, p_full[name]), name


def test_resume_on_another_layout_reads_indexed_data_from_the_same_position(tmp_path, dataset):
    """world 2 / EP2 -> one process on indexed data: the data position and the numbers carry over
    (the layouts themselves are covered by test_reshard)."""
    full = train(tmp_path, "full1", 1, overrides(tmp_path / "e", dataset, "parallel.ep_size=1"))
    train(tmp_path, "w2", 2, overrides(tmp_path / "c", dataset, "train.stop_after=3"))
    res = train(tmp_path, "w1", 1, overrides(tmp_path / "c", dataset, "parallel.ep_size=1"))
    assert res["steps_done"] == 6
    assert max(abs(a - b) / a for a, b in zip(res["losses"], full["losses"][3:])) <= 1e-5


def test_sigusr1_saves_a_checkpoint_and_exits_cleanly(tmp_path, dataset):
    out = tmp_path / "p"
    port = free_port()
    cmd = [sys.executable, "-m", "mom_dist.cli.train", "--config", "configs/tiny.yaml"]
    for o in overrides(out, dataset, "train.steps=500", "train.log_interval=1"):
        cmd += ["--set", o]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=worker_env(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and sum(1 for line in open(metrics) if '"kind": "train"' in line) >= 2:
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)  # one rank is signalled; all must agree to stop
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], logs  # preempted and saved: requeue
    tag = open(out / "checkpoints" / "latest").read()
    step = int(tag.replace("step", ""))
    assert 2 <= step < 500
    assert "preemption signal" in logs[0]
    state = json.load(open(out / "checkpoints" / tag / "mom_state.json"))
    assert state["step"] == step and state["consumed_samples"] == step * 8
    assert os.path.exists(out / "checkpoints" / tag / "rng_rank00001.pt")


def test_keep_last_prunes_older_complete_checkpoints(tmp_path, dataset):
    out = tmp_path / "k"
    train(tmp_path, "keep", 1, overrides(out, dataset, "parallel.ep_size=1", "train.save_interval=2",
                                         "train.keep_last=2"))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step")) == ["step00000004", "step00000006"]
    assert open(ckpts / "latest").read() == "step00000006"


def test_resume_into_an_out_dir_of_another_model_is_refused(tmp_path, dataset):
    train(tmp_path, "m1", 1, overrides(tmp_path / "d", dataset, "parallel.ep_size=1", "train.stop_after=2"))
    res = run_workers("train_once", 1, dict(config="configs/tiny.yaml", expect_error=True, overrides=overrides(
        tmp_path / "d", dataset, "parallel.ep_size=1", "model.d_model=48")), tmp_path)[0]
    assert "different model (model.d_model: 32 in the checkpoint, 48 now)" in res["error"]
    assert "train.out_dir" in res["error"]
    assert (tmp_path / "d" / "checkpoints" / "step00000002").exists()  # nothing was pruned
