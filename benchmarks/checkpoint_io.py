"""Checkpoint save/load time and bytes per rank (issue 7), in real gloo processes on CPU; prints a
markdown table.

World 4, EP in {1, 2, 4} x ZeRO in {0, 1, 2}, fp32, one model (below): the layout-free format
(``mom_dist.checkpoint.shards``, what the trainer writes now: each rank its pieces of fp32
masters and Adam moments, plus its RNG file and rank 0's mom_state.json) next to DeepSpeed's
own format (``engine.save_checkpoint``: what mom_dist wrote before). Times are wall seconds
from a barrier to the last rank done (median of ``--repeats``), on files the OS has just
written (page cache: this measures serialisation and copies more than the disk). Bytes per
rank: max and total over ranks of the files each rank writes. The worker is
``benchmarks/_ckpt_worker.py``; results live in ``benchmarks/results/checkpoint_io.md``.

Run:  .venv/bin/python benchmarks/checkpoint_io.py     (about 2-3 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mom_dist.parallel import local_launch  # noqa: E402
import _machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

WORKER = os.path.join(ROOT, "benchmarks", "_ckpt_worker.py")
MODEL = ["model.vocab_size=4096", "model.max_seq_len=64", "model.d_model=256", "model.n_heads=4",
         "model.n_bottom=1", "model.n_top=1", "model.n_attn_modules=4", "model.n_ffn_modules=4", "model.n_steps=4",
         "model.attn_router.dim=64", "model.ffn_router.dim=64", "model.ffn_router.top_k=2",
         "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2", "train.save_interval=1",
         "data={synthetic: {seed: 1}}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world", type=int, default=4)
    a = ap.parse_args()
    layouts = [dict(ep=ep, zero=z) for ep in (1, 2, 4) for z in (0, 1, 2) if a.world % ep == 0]
    with tempfile.TemporaryDirectory() as tmp:
        res = local_launch.run_ranks(WORKER, "ckpt_io", a.world, dict(layouts=layouts, repeats=a.repeats,
                                                                       overrides=MODEL, dir=tmp), tmp, 1800)
    med = statistics.median
    print(f"# {_machine.describe()}")
    print(f"model: {res[0]['ep1_z0']['n_params']:,} parameters (fp32); world {a.world}; median of {a.repeats}\n")
    print("| EP | ZeRO | new save s | old save s | new load s | old load s | new MiB/rank max | old MiB/rank max "
          "| new MiB total | old MiB total |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lay in layouts:
        key = f"ep{lay['ep']}_z{lay['zero']}"
        per = [r[key] for r in res]
        t = {k: med([max(p[k][i] for p in per) for i in range(a.repeats)]) for k in
             ("new_save", "old_save", "new_load", "old_load")}
        mib = {k: [p[k] / 2 ** 20 for p in per] for k in ("new_bytes", "old_bytes")}
        print(f"| {lay['ep']} | {lay['zero']} | {t['new_save']:.3f} | {t['old_save']:.3f} | {t['new_load']:.3f} | "
              f"{t['old_load']:.3f} | {max(mib['new_bytes']):.1f} | {max(mib['old_bytes']):.1f} | "
              f"{sum(mib['new_bytes']):.1f} | {sum(mib['old_bytes']):.1f} |")
        if per[0].get("old_unattributed"):
            print(f"  (old format files not attributed to a rank: {per[0]['old_unattributed']})")
    print("\nper-rank MiB written (new / old):")
    for lay in layouts:
        key = f"ep{lay['ep']}_z{lay['zero']}"
        print(f"  EP{lay['ep']} ZeRO-{lay['zero']}: " + ", ".join(
            f"r{i} {r[key]['new_bytes'] / 2 ** 20:.1f}/{r[key]['old_bytes'] / 2 ** 20:.1f}" for i, r in enumerate(res)))


if __name__ == "__main__":
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    main()
