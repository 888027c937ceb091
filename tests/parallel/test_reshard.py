"""A checkpoint resumes on any layout, exactly (issue 7 part 1).

Numbers do not depend on the layout (test_layout_invariance), so the proof is exact: an
uninterrupted 8-step run at layout A equals 4 steps at A plus 4 steps resumed at layout B -
every step's loss and the final weights within fp32 relative 1e-5, gradient clipping active.
The uninterrupted run writes the step-4 checkpoint it is compared with; resumed runs start
from a copy of it. Runs are grouped by world size so each group of processes starts once:

    world 4: R4  = EP4 ZeRO-2, 8 steps, checkpoints at 4 and 8     (reference of shrink, EP change)
             E1  = R4@4 -> EP1 x DP4 ZeRO-1                         (EP change at the same world)
    world 2: S2  = R4@4 -> EP2 ZeRO-1, 2 steps, checkpoint at 6    (shrink, first hop)
             A2  = EP2 ZeRO-0, 8 steps, checkpoint at 4            (reference of grow)
             B2  = bf16 EP2 ZeRO-2, 8 steps, checkpoint at 4       (reference of bf16)
    world 1: S1  = S2@6 -> one process ZeRO-0                       (shrink, second hop; ZeRO 1 -> 0)
             BF1 = B2@4 -> bf16 one process ZeRO-0 (DeepSpeed's unfused bf16 optimizer)
             INIT/INITRUN: train.init_from = R4's export / R4's run directory
             LEGACY: a DeepSpeed-format checkpoint at another layout -> refused
    world 4: G4  = A2@4 -> EP4 ZeRO-2                               (grow; ZeRO 0 -> 2)
             BF4 = B2@4 -> bf16 EP4 ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer)
"""

import json
import os

import pytest
import torch

from mom_dist.checkpoint.consolidate import consolidate
from mom_dist.checkpoint.exported import export_run
from mom_dist.checkpoint.sources import init_from_source
from tests.dist_utils import run_workers
from tests.parallel.test_layout_invariance import BASE, CASES, params

COMMON = [o for o in BASE if not o.startswith("train.steps")] + CASES["k2"] + [
    "train.steps=8", "train.save_interval=4", "train.keep_last=5", "train.log_interval=1"]


def run(name, ep, zero, *extra, copy_from=None, **kw):
    return dict(name=name, overrides=[f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}", *extra],
                copy_from=copy_from, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    results = {}

    def launch(world, run_list):
        args = dict(config="configs/tiny.yaml", base=COMMON, runs=run_list, dump=str(tmp))
        results.update(run_workers("train_chain", world, args, tmp, timeout=900)[0])

    launch(4, [run("R4", 4, 2), run("E1", 1, 1, copy_from=("R4", "step00000004"))])
    launch(2, [run("S2", 2, 1, "train.stop_after=2", copy_from=("R4", "step00000004")),
               run("A2", 2, 0), run("B2", 2, 2, "train.precision=bf16")])
    export_run(str(tmp / "R4"), str(tmp / "R4_export"))
    launch(1, [run("S1", 1, 0, copy_from=("S2", "step00000006")),
               run("BF1", 1, 0, "train.precision=bf16", copy_from=("B2", "step00000004")),
               run("INIT", 1, 0, "train.steps=2", f"train.init_from={tmp / 'R4_export'}"),
               run("INITRUN", 1, 0, "train.steps=2", f"train.init_from={tmp / 'R4'}"),
               run("LEGACY", 1, 0, copy_from=("S2", "step00000006"), legacy=True, expect_error=True)])
    (tmp / "fp32_accumulation.json").write_text(json.dumps({"data_types": {"grad_accum_dtype": "fp32"}}))
    launch(4, [run("G4", 4, 2, copy_from=("A2", "step00000004")),
               run("BF4", 4, 1, "train.precision=bf16", f"parallel.ds_config={tmp / 'fp32_accumulation.json'}",
                   copy_from=("B2", "step00000004"))])
    return tmp, results


def assert_tracks(tmp, results, ref, resumed, first_step, rel=1e-5):
    """Losses of ``resumed`` equal ``ref``'s from ``first_step`` on; final weights too (if the
    chain reached the last step)."""
    want = results[ref]["losses"][first_step:first_step + len(results[resumed]["losses"])]
    got = results[resumed]["losses"]
    assert len(got) == len(want) >= 2
    worst = max(abs(a - b) / abs(a) for a, b in zip(want, got))
    assert worst <= rel, f"{resumed} vs {ref}: {got} vs {want}"


def assert_same_weights(tmp, a, b, rtol=1e-5, atol=1e-6):
    pa, pb = params(tmp, a), params(tmp, b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=rtol, atol=atol, msg=f"{b} vs {a}: {k}")


def test_clipping_is_active_in_the_reference(runs):
    tmp, _ = runs
    norms = [r["grad_norm"] for r in map(json.loads, open(tmp / "R4" / "metrics.jsonl")) if r["kind"] == "train"]
    assert len(norms) == 8 and max(norms) > 0.3  # BASE clips at 0.3


def test_shrink_world4_ep4_zero2_to_world2_ep2_zero1_to_one_process(runs):
    tmp, results = runs
    assert results["S2"]["steps_done"] == 6 and results["S1"]["steps_done"] == 8
    assert_tracks(tmp, results, "R4", "S2", 4)
    assert_tracks(tmp, results, "R4", "S1", 6)
    assert_same_weights(tmp, "R4", "S1")
    assert any("resumed from step 4 (32 samples consumed); resharded from world 4 / EP4 / ZeRO-2 to "
               "world 2 / EP2 / ZeRO-1" in line for line in results["S2"]["log"]), results["S2"]["log"]
    assert any("resharded from world 2 / EP2 / ZeRO-1 to world 1 / EP1 / ZeRO-0" in line
               for line in results["S1"]["log"])


def test_ep_change_at_the_same_world(runs):
    tmp, results = runs
    assert_tracks(tmp, results, "R4", "E1", 4)
    assert_same_weights(tmp, "R4", "E1")


def test_grow_world2_to_world4_ep4_and_zero0_to_zero2(runs):
    tmp, results = runs
    assert (results["A2"]["optimizer"], results["G4"]["optimizer"]) == ("AdamW", "DeepSpeedZeroOptimizer")
    assert_tracks(tmp, results, "A2", "G4", 4)
    assert_same_weights(tmp, "A2", "G4")
    assert not any("resharded" in line for line in results["A2"]["log"])


def test_bf16_resumes_on_other_layouts_within_its_tolerance(runs):
    tmp, results = runs
    # three of DeepSpeed's bf16 optimizers: the state moves between all of them
    assert [results[n]["optimizer"] for n in ("B2", "BF1", "BF4")] == \
        ["DeepSpeedZeroOptimizer", "FP16_UnfusedOptimizer", "BF16_Optimizer"]
    for resumed in ("BF1", "BF4"):
        assert_tracks(tmp, results, "B2", resumed, 4, rel=5e-3)
        assert_same_weights(tmp, "B2", resumed, rtol=0, atol=1.6e-2)  # 2 bf16 ulps at |w| < 2
    assert any("to world 1 / EP1 / ZeRO-0 / bf16" in line for line in results["BF1"]["log"])


def test_checkpoints_hold_no_deepspeed_tool_and_no_pickled_weights(runs):
    """DeepSpeed's format left zero_to_fp32.py / zero_to_torch.py next to the step directories,
    and they failed on our MoE files; nothing of DeepSpeed's is written now."""
    tmp, _ = runs
    assert sorted(os.listdir(tmp / "R4" / "checkpoints")) == ["latest", "step00000004", "step00000008"]
    tag = tmp / "R4" / "checkpoints" / "step00000008"
    files = sorted(os.listdir(tag))
    assert not [f for f in files if f.startswith("zero_to") or f.endswith("model_states.pt")
                or f.endswith("optim_states.pt")], files
    assert [f for f in files if f.endswith(".safetensors")] == [f"state_rank{r:05d}.safetensors" for r in range(4)]


def test_export_is_accepted_by_init_from(runs):
    tmp, results = runs
    from mom_dist.config import load_config
    from mom_dist.model import MoMModel

    cfg, sd, _ = consolidate(str(tmp / "R4"))
    model = MoMModel(load_config("configs/tiny.yaml", COMMON).model)
    init_from_source(model, str(tmp / "R4_export"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # The trainer takes it (weights only, fresh optimizer) and trains exactly as from the run.
    assert results["INIT"]["steps_done"] == 2
    assert results["INIT"]["losses"] == results["INITRUN"]["losses"]


def test_deepspeed_format_checkpoint_at_another_layout_is_refused(runs):
    tmp, results = runs
    err = results["LEGACY"]["error"]
    assert "DeepSpeed's own format" in err and "world_size=2, ep_size=2" in err and "train.init_from" in err
    assert "consolidate" not in err
    assert (tmp / "LEGACY" / "checkpoints" / "step00000006" / "state_rank00001.safetensors").exists()
