"""DeepSpeed integration: generated/merged ds_config and its errors, bf16, telemetry."""

import json

import pytest

from mom_dist.config import load_config
from mom_dist.parallel.deepspeed_engine import build_ds_config, gradient_accumulation, lr_lambda
from mom_dist.parallel.dims import ParallelDims
from tests.dist_utils import run_workers
from tests.parallel.test_layout_invariance import BASE, CASES


def dims(world, ep):
    return ParallelDims(world, 0, ep, None, None, None)


def cfg(*extra):
    return load_config("configs/tiny.yaml", BASE + list(extra))


def test_generated_config_follows_ours():
    ds = build_ds_config(cfg("parallel.zero_stage=2", "train.precision=bf16"), dims(2, 2))
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.3
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True


def test_user_config_is_merged_over_ours():
    user = {"zero_optimization": {"reduce_bucket_size": 1234}, "communication_data_type": "fp32"}
    ds = build_ds_config(cfg(), dims(2, 2), user)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1234
    assert ds["zero_optimization"]["stage"] == 1  # untouched keys stay ours
    assert ds["communication_data_type"] == "fp32"


@pytest.mark.parametrize("user,message", [
    ({"train_batch_size": 64}, "train_batch_size=64, which contradicts mom_dist's train.global_batch_size"),
    ({"gradient_clipping": 5.0}, "gradient_clipping=5.0.*train.grad_clip"),
    ({"zero_optimization": {"stage": 3}}, "stage=3 is not supported"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported.*bf16"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' is not supported"),
])
def test_user_config_contradictions_are_refused(user, message):
    with pytest.raises(ValueError, match=message):
        build_ds_config(cfg(), dims(2, 2), user)


def test_batch_sizes_must_divide_the_world():
    with pytest.raises(ValueError, match="multiple of micro_batch_size x data-parallel ranks = 2 x 3"):
        gradient_accumulation(cfg(), dims(3, 1))


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_bf16_expert_parallel_training_tracks_fp32(tmp_path):
    common = BASE + CASES["k2"] + [f"train.out_dir={tmp_path}/o"]
    fp32 = run_workers("train_once", 1, dict(config="configs/tiny.yaml", overrides=common), tmp_path)[0]
    for zero in (0, 1, 2):
        bf16 = run_workers("train_once", 2, dict(config="configs/tiny.yaml", overrides=common + [
            "train.precision=bf16", "parallel.ep_size=2", f"parallel.zero_stage={zero}"]), tmp_path)[0]
        for a, b in zip(fp32["losses"], bf16["losses"]):
            assert abs(a - b) / a < 0.03, (zero, fp32["losses"], bf16["losses"])


def test_routing_telemetry_is_recorded(tmp_path):
    out = tmp_path / "t"
    run_workers("train_once", 2, dict(config="configs/tiny.yaml", overrides=BASE + CASES["capacity"] + [
        f"train.out_dir={out}", "parallel.ep_size=2"]), tmp_path)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    routing = [r for r in records if r["kind"] == "routing"]
    assert [r["step"] for r in routing] == [3, 6]
    r = routing[-1]
    assert r["a2a_MB_sent"] > 0 and r["dropped"] > 0 and 0 <= r["skip_rate"] <= 1
    detail = r["detail"]
    assert len(detail) == 2 * 2  # n_steps=2 x {attn, ffn}
    for d in detail:  # the whole step: 8 sequences (2 ranks x 2 micro-batches x 2) x 16 tokens x K
        picks = 8 * 16 * (2 if d["pool"] == "ffn" else 1)
        assert sum(d["load"]) + d["skip"] == picks and d["skip"] == round(d["skip_rate"] * picks)
        assert d["ep_load_max_over_mean"] >= 1.0 and d["entropy"] >= 0


def test_deepspeed_adam_option_matches_torch_adamw(tmp_path):
    # DeepSpeed builds its Adam (CPU: DeepSpeedCPUAdam / FusedAdam) on first use (~40 s, cached).
    common = BASE + CASES["k1"] + [f"train.out_dir={tmp_path}/o", "train.steps=3"]
    torch_adam = run_workers("train_once", 1, dict(config="configs/tiny.yaml", overrides=common), tmp_path)[0]
    ds_adam = run_workers("train_once", 1, dict(config="configs/tiny.yaml", overrides=common + [
        "train.optimizer=deepspeed_adam"]), tmp_path)[0]
    for a, b in zip(torch_adam["losses"], ds_adam["losses"]):
        assert abs(a - b) / a < 1e-4, (torch_adam["losses"], ds_adam["losses"])
