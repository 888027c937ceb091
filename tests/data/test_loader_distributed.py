"""Two gloo ranks: rank 0 builds the index cache once, both get the single-process micro-batches;
a cache dir that is not shared between "nodes" is detected, and cache_shared=False handles it."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp

from mom_dist.data.loader import DataConfig, build_data_iterators, write_token_documents

V = 97


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, prefix, root, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    kw = dict(vocab_size=V, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=2,
              train_samples=32, valid_samples=8)
    try:
        # 1) shared cache: rank 0 builds, the other loads
        cfg = DataConfig(train_prefixes=[prefix], split="9,1,0", seq_length=16, seed=3,
                         cache_dir=os.path.join(root, "shared"))
        it = build_data_iterators(cfg, **kw)
        torch.save([next(it.train)["tokens"] for _ in range(4)], os.path.join(out, f"r{rank}.pt"))
        # 2) node-local dirs (each rank plays a node whose local rank 0 it is)
        local = os.path.join(root, f"node{rank}")
        cfg = DataConfig(train_prefixes=[prefix], split="9,1,0", seq_length=16, seed=3, cache_dir=local)
        try:
            build_data_iterators(cfg, **kw)
            err = ""
        except RuntimeError as e:
            err = str(e)
        with open(os.path.join(out, f"err{rank}.txt"), "w") as f:
            f.write(err)
        cfg = DataConfig(train_prefixes=[prefix], split="9,1,0", seq_length=16, seed=3,
                         cache_dir=local, cache_shared=False)
        it = build_data_iterators(cfg, **kw)
        torch.save([next(it.train)["tokens"] for _ in range(4)], os.path.join(out, f"local{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_share_cache_and_match_single_process(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "d")
    write_token_documents(prefix, [list(rng.integers(1, V, rng.integers(3, 30))) + [0] for _ in range(150)], V)
    root = str(tmp_path)
    # node-local caches: each rank's dir is only "visible" to itself (distinct paths)
    tmp_mp.spawn(_worker, args=(_free_port(), prefix, root, root), nprocs=2, join=True)

    cfg = DataConfig(train_prefixes=[prefix], split="9,1,0", seq_length=16, seed=3,
                     cache_dir=str(tmp_path / "single"))
    single = build_data_iterators(cfg, vocab_size=V, global_batch_size=8, micro_batch_size=2, dp_rank=0,
                                  dp_size=1, train_samples=32, valid_samples=8).train
    ref = [next(single)["tokens"] for _ in range(8)]  # micro-batch k = j*2 + r of steps 0 and 1
    for name in ("r", "local"):
        got = [torch.load(str(tmp_path / f"{name}{r}.pt")) for r in range(2)]
        for r in range(2):
            for j in range(4):
                step, jj = divmod(j, 2)
                assert torch.equal(got[r][j], ref[step * 4 + jj * 2 + r])
    # each rank used its own cache_dir with cache_shared=True: rank 1 cannot see rank 0's probe
    errs = [open(tmp_path / f"err{r}.txt").read() for r in range(2)]
    assert all("not shared between nodes" in e and "cache_shared=False" in e for e in errs), errs
    assert sorted(os.listdir(tmp_path / "shared")) and os.listdir(tmp_path / "node1")
