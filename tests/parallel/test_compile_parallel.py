"""torch.compile with expert parallelism and under the DeepSpeed engine (issue 16), in real
gloo process groups: compiled == eager and no recompilation while routing changes the
all-to-all's split sizes (traced as unbacked sizes, mom_dist.model.compile)."""

import pytest

from tests.dist_utils import run_workers
from tests.parallel.test_layout_invariance import BASE, CASES, params


# dropless through inductor, the backend train.compile uses: the plan's unbacked split sizes
# must survive its lowering, not only Dynamo's tracing (aot_eager stops before it); one routing
# step keeps that compile short. Capacity (fixed shapes) through aot_eager, two routing steps.
@pytest.mark.parametrize("capacity_factor,backend,n_steps", [(None, "inductor", 1), (0.75, "aot_eager", 2)],
                         ids=["dropless-inductor", "capacity-aot_eager"])
def test_compiled_all_to_all_equals_eager_world2(capacity_factor, backend, n_steps, tmp_path):
    args = dict(capacity_factor=capacity_factor, backend=backend, n_steps=n_steps, steps=6)
    results = run_workers("compiled_parity", 2, args, tmp_path)
    for r in results:
        assert r["max_abs_diff"] < 1e-5, r
        assert all(b == b_ref > 0 for b, b_ref in r["bytes"]), r["bytes"]  # telemetry's byte count too
        assert r["distinct_loads"] >= 3, r  # routing, and so the split sizes, changed
        s, w = r["stats"], r["warm"]
        assert (s["graphs"], s["graph_breaks"], s["recompiles"]) == (1, 0, 0) == (w["graphs"], 0, 0), r
    if capacity_factor is None:  # dropless: what travels follows the routing
        assert len({b for b, _ in results[0]["bytes"]}) > 1


def test_trainer_compiles_under_deepspeed_with_activation_checkpointing(tmp_path):
    """train.compile=on through mom_dist's trainer: DeepSpeed engine (ZeRO 1), activation
    checkpointing, gradient accumulation, telemetry and evaluation; the same losses, validation
    loss and final parameters as the eager run, and the log reports Dynamo's counters."""
    over = CASES["k2"] + ["model.activation_checkpointing=true"]
    runs = [dict(name="eager", overrides=over + ["train.compile=off"]),
            dict(name="compiled", overrides=over + ["train.compile=on", "train.compile_backend=aot_eager"])]
    args = dict(config="configs/tiny.yaml", base=BASE, runs=runs, dump=str(tmp_path))
    res = run_workers("train_chain", 1, args, tmp_path, timeout=900)[0]
    eager, compiled = res["eager"], res["compiled"]
    assert len(compiled["losses"]) == 6
    for a, b in zip(eager["losses"], compiled["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a), (eager["losses"], compiled["losses"])
    assert abs(eager["valid"] - compiled["valid"]) <= 1e-5 * abs(eager["valid"])
    p_eager, p_compiled = params(tmp_path, "eager"), params(tmp_path, "compiled")
    assert p_eager.keys() == p_compiled.keys()
    assert max((p_eager[k] - p_compiled[k]).abs().max().item() for k in p_eager) < 1e-5
    summary = [line for line in compiled["log"] if "torch.compile:" in line]
    # first step: one graph; the whole run adds evaluation's no-grad graph (one recompile)
    assert "1 graph(s), 0 graph break(s), 0 recompile(s)" in summary[0], compiled["log"]
    assert "2 graph(s), 0 graph break(s), 1 recompile(s)" in summary[-1], compiled["log"]
    assert not any("torch.compile" in line for line in eager["log"])
