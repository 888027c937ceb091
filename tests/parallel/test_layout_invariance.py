"""Numbers must not depend on the parallel layout (spec §9, issue 3).

World 4 as EP4, EP2 x DP2 and EP1 x DP4, each with ZeRO 0, 1 and 2, world 2 and one process
(gradient accumulation over the same global batch): the same per-step losses for 6 optimizer
steps (fp32, relative difference <= 1e-5) and the same final parameters. Gradient clipping is
active (a small grad_clip), so the true global norm is exercised too. The final validation loss
is the same too: ``eval_batches=3`` micro-batches in total whatever the world size (world 2 and
4 leave ranks idle in the last round).
"""

import glob
import os

import pytest
import torch

from tests.dist_utils import run_workers

BASE = [
    "model.vocab_size=64", "model.max_seq_len=16", "model.d_model=32", "model.n_heads=2", "model.n_steps=2",
    "model.attn_router.dim=16", "model.ffn_router.dim=16", "model.attn_router.temperature=0.5",
    "train.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=6",
    "train.lr=1e-2", "train.warmup_steps=1", "train.grad_clip=0.3", "train.eval_batches=3",
    "train.save_interval=0", "train.log_interval=100", "train.telemetry_interval=3", "train.tensorboard=false",
    "data={synthetic: {seed: 7}}",
]
CASES = {
    "k2": ["model.attn_router.top_k=2", "model.ffn_router.top_k=2"],
    "k1": ["model.attn_router.top_k=1", "model.ffn_router.top_k=1"],
    "capacity": ["model.ffn_router.top_k=2", "parallel.dispatcher=capacity", "parallel.capacity_factor=0.5"],
}


def runs(world, case, zeros):
    eps = [e for e in (4, 2, 1) if world % e == 0]
    return [dict(name=f"{case}_w{world}_ep{e}_z{z}", ep=e, zero=z, overrides=CASES[case]) for e in eps for z in zeros]


def launch(world, run_list, tmp_path):
    args = dict(config="configs/tiny.yaml", base=BASE + [f"train.out_dir={tmp_path}/out"], runs=run_list,
                dump=str(tmp_path))
    return run_workers("train_layouts", world, args, tmp_path, timeout=900)[0]


def params(tmp_path, name):
    merged = {}
    for f in sorted(glob.glob(os.path.join(str(tmp_path), f"{name}_rank*.pt"))):
        for k, v in torch.load(f).items():
            if k in merged:
                assert torch.equal(merged[k], v), f"{k} differs between replicas of {name}"
            merged[k] = v
    return merged


def assert_same(ref_name, ref, name, got, p_ref, p_got):
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"]))
    assert len(got["losses"]) == len(ref["losses"]) == 6
    assert rel <= 1e-5, f"{name} vs {ref_name}: losses {got['losses']} vs {ref['losses']}"
    assert abs(got["valid"] - ref["valid"]) <= 1e-5 * abs(ref["valid"]), f"{name}: validation {got['valid']} vs {ref['valid']}"
    assert p_ref.keys() == p_got.keys()
    for k in p_ref:
        torch.testing.assert_close(p_got[k], p_ref[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs: ZeRO 0 per case (the reference) plus ZeRO 1/2 for k2."""
    tmp = tmp_path_factory.mktemp("w1")
    run_list = runs(1, "k2", (0, 1, 2)) + runs(1, "k1", (0,)) + runs(1, "capacity", (0,))
    return tmp, launch(1, run_list, tmp)


def check_against_reference(reference, tmp_path, results):
    ref_tmp, ref_results = reference
    for name, res in results.items():
        case = name.split("_")[0]
        ref_name = f"{case}_w1_ep1_z0"
        assert_same(ref_name, ref_results[ref_name], name, res, params(ref_tmp, ref_name), params(tmp_path, name))


def test_single_process_zero_stages_agree(reference):
    tmp, results = reference
    check_against_reference(reference, tmp, results)
    losses = results["k2_w1_ep1_z0"]["losses"]
    assert losses[-1] < losses[0]  # it trains


def test_world4_every_layout_and_zero_stage_matches_one_process(reference, tmp_path):
    run_list = runs(4, "k2", (0, 1, 2)) + runs(4, "k1", (0, 2)) + runs(4, "capacity", (1,))
    check_against_reference(reference, tmp_path, launch(4, run_list, tmp_path))


def test_world2_layouts_match_one_process(reference, tmp_path):
    run_list = runs(2, "k2", (0, 2)) + runs(2, "capacity", (0,))
    check_against_reference(reference, tmp_path, launch(2, run_list, tmp_path))
