"""Routing telemetry describes the whole optimizer step, whatever the layout (issue 11).

The same global batch (8 sequences of 16 tokens, micro-batches of 2) trained as one process
(4 accumulation steps), world 2 (EP2) and world 4 (EP4, EP2 x DP2), dropless and capacity: every
`routing` record must hold the same loads, SKIP counts, drops, token counts and depth
histograms (exactly) and the same entropy (1e-6), and the EP-rank split must be the sum of the
loads over each rank's modules. All-to-all bytes differ by layout by nature; they are checked
against bytes measured at `all_to_all_single` in the workers, and in capacity mode against the
closed formula rows x (E-1)/E x width.
"""

import json
import math
import os

import pytest

from mom_dist.parallel.local_launch import REPO, RankFailure, run_ranks

WORKER = os.path.join(REPO, "tests", "telemetry", "workers.py")
D, H, SEQ, MICRO, GLOBAL, N_MOD, K_ATTN, K_FFN, CF = 32, 2, 16, 2, 8, 4, 1, 2, 0.5
BASE = [
    "model.vocab_size=64", "model.max_seq_len=16", f"model.d_model={D}", "model.n_heads=2", f"model.n_steps={H}",
    f"model.n_attn_modules={N_MOD}", f"model.n_ffn_modules={N_MOD}",
    "model.attn_router.dim=16", "model.ffn_router.dim=16", "model.attn_router.temperature=0.5",
    f"model.attn_router.top_k={K_ATTN}", f"model.ffn_router.top_k={K_FFN}",
    f"train.seq_len={SEQ}", f"train.global_batch_size={GLOBAL}", f"train.micro_batch_size={MICRO}", "train.steps=2",
    "train.lr=1e-2", "train.warmup_steps=1", "train.eval_batches=0", "train.eval_interval=100",
    "train.save_interval=0", "train.log_interval=100", "train.telemetry_interval=1", "train.tensorboard=false",
    "data={synthetic: {seed: 7}}",
]
CAPACITY = ["parallel.dispatcher=capacity", f"parallel.capacity_factor={CF}"]


def launch(world, runs, tmp_path):
    for r in runs:
        r["overrides"] = r["overrides"] + [f"train.out_dir={tmp_path}/{r['name']}"]
    args = dict(config="configs/tiny.yaml", base=BASE, runs=runs)
    try:
        per_rank = run_ranks(WORKER, "train_metered", world, args, str(tmp_path), timeout=600)
    except RankFailure as e:
        raise AssertionError(str(e)) from None
    out = {}
    for r in runs:
        recs = [json.loads(line) for line in open(tmp_path / r["name"] / "metrics.jsonl")]
        out[r["name"]] = dict(routing=[x for x in recs if x["kind"] == "routing"],
                              wire=[p[r["name"]]["wire_bytes"] for p in sorted(per_rank, key=lambda p: p[r["name"]]["rank"])])
    return out


def layout_free(rec):
    """The parts of a routing record that must not depend on the layout."""
    return dict(step=rec["step"], tokens=rec["tokens"], micro_batches=rec["micro_batches"], dropped=rec["dropped"],
                depth=rec["depth"], skip_rate=rec["skip_rate"],
                detail=[{k: d[k] for k in ("chunk", "step", "pool", "n_modules", "top_k", "tokens", "load", "skip",
                                           "skip_rate", "dropped")} for d in rec["detail"]])


def capacity_formula(ep):
    """Forward payload bytes one rank sends in one micro-batch, capacity mode: every source sends
    its whole (N, cap) buffer, of which (E-1)/E goes to other ranks; attention moves the token
    (D), its QKV (3D), the attention output (D) and the projection (D) = 6D, an FFN 2D."""
    T = MICRO * SEQ
    per = 0
    for k, width in ((K_ATTN, 6 * D), (K_FFN, 2 * D)):
        cap = max(1, math.ceil(CF * T * k / N_MOD))
        per += N_MOD * cap * (ep - 1) // ep * width * 4
    return per * H


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world, runs in ((1, [("w1", 1, [])]),
                        (2, [("w2_ep2", 2, []), ("w2_ep2_cap", 2, CAPACITY)]),
                        (4, [("w4_ep4", 4, []), ("w4_ep2", 2, []), ("w4_ep4_cap", 4, CAPACITY)])):
        tmp = tmp_path_factory.mktemp(f"w{world}")
        run_list = [dict(name=n, overrides=o + [f"parallel.ep_size={ep}"]) for n, ep, o in runs]
        if world == 1:
            run_list.append(dict(name="w1_cap", overrides=CAPACITY))
        out.update(launch(world, run_list, tmp))
    return out


def test_routing_records_cover_the_whole_step(results):
    routing = results["w1"]["routing"]
    assert [r["step"] for r in routing] == [1, 2]
    for r in routing:
        assert r["micro_batches"] == GLOBAL // MICRO and r["tokens"] == GLOBAL * SEQ
        for d in r["detail"]:  # every pick of every token of the global batch is counted once
            assert sum(d["load"]) + d["skip"] == GLOBAL * SEQ * d["top_k"]
        for dep in r["depth"]:
            assert sum(dep["hist"]) == GLOBAL * SEQ
        assert r["a2a_bytes_sent"] == 0 and r["a2a_bytes_per_rank"] == [0]
    cap = results["w1_cap"]["routing"]
    assert all(r["dropped"] > 0 for r in cap)  # capacity 0.5 must drop


@pytest.mark.parametrize("ref,names", [("w1", ["w2_ep2", "w4_ep4", "w4_ep2"]), ("w1_cap", ["w2_ep2_cap", "w4_ep4_cap"])])
def test_telemetry_is_equal_for_every_layout(results, ref, names):
    want = results[ref]["routing"]
    for name in names:
        got = results[name]["routing"]
        assert len(got) == len(want) == 2
        for a, b in zip(want, got):
            assert layout_free(a) == layout_free(b), name
            for da, db in zip(a["detail"], b["detail"]):
                assert da["entropy"] == pytest.approx(db["entropy"], rel=1e-6), name
            assert a["router_entropy"] == pytest.approx(b["router_entropy"], rel=1e-6)
            assert a["depth_mean"] == pytest.approx(b["depth_mean"], rel=1e-12)
            for d in b["detail"]:  # the EP split follows the loads and ep_size
                E, n = b["ep_size"], d["n_modules"]
                assert d["ep_load"] == [sum(d["load"][e * n // E:(e + 1) * n // E]) for e in range(E)]
                assert d["ep_load_max_over_mean"] == pytest.approx(max(d["ep_load"]) * E / sum(d["ep_load"]))


@pytest.mark.parametrize("name", ["w2_ep2", "w4_ep4", "w4_ep2", "w2_ep2_cap", "w4_ep4_cap"])
def test_all_to_all_bytes_match_the_wire(results, name):
    res = results[name]
    per_rank = [sum(r["a2a_bytes_per_rank"][i] for r in res["routing"]) for i in range(len(res["wire"]))]
    assert per_rank == res["wire"]  # the dispatcher's count == bytes all_to_all_single sent to other ranks
    assert all(b > 0 for b in per_rank)
    for r in res["routing"]:
        assert r["a2a_bytes_sent"] == sum(r["a2a_bytes_per_rank"])
        assert r["a2a_MB_sent"] == pytest.approx(r["a2a_bytes_sent"] / 2 ** 20)


@pytest.mark.parametrize("name,ep", [("w2_ep2_cap", 2), ("w4_ep4_cap", 4)])
def test_capacity_bytes_follow_the_formula(results, name, ep):
    world = len(results[name]["wire"])
    for r in results[name]["routing"]:
        micro_per_rank = r["micro_batches"] // world
        assert r["a2a_bytes_per_rank"] == [capacity_formula(ep) * micro_per_rank] * world
