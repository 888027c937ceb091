"""All-to-all dispatcher == local dispatcher, in real gloo process groups."""

import pytest

from tests.dist_utils import run_workers

CASES = [
    dict(ep=2, n_a=4, n_f=2, k=2),
    dict(ep=2, n_a=2, n_f=4, k=3, qkv_weighted=True),  # K = N_A + 1 on the attention pool
    dict(ep=2, n_a=4, n_f=4, k=2, uneven=True),  # one rank's modules get no tokens from some ranks
    dict(ep=2, n_a=4, n_f=4, k=1, capacity_factor=0.5),  # capacity mode with drops
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_all_to_all_matches_local_dispatch_world2(case, tmp_path):
    results = run_workers("dispatch_parity", 2, case, tmp_path)
    for r in results:
        assert r["max_abs_diff"] < 1e-5, results
        assert r["dropped_ref"] == r["dropped_ep"]
        assert r["bytes_sent"] > 0
        assert r["host_syncs"] == (0 if "capacity_factor" in case else 2), r  # one per plan, none in backward
    if "capacity_factor" in case:
        assert sum(r["dropped_ep"] for r in results) > 0


def test_all_to_all_matches_local_dispatch_world4_ep4(tmp_path):
    results = run_workers("dispatch_parity", 4, dict(ep=4, n_a=4, n_f=8, k=2, uneven=True), tmp_path)
    assert max(r["max_abs_diff"] for r in results) < 1e-5
