"""What checksumming a checkpoint costs (issue 15): hash speeds, and a shard's save and verify time
with and without its checksum; prints markdown tables.

1. Throughput of the hashes at hand on one in-memory buffer (``--hash-mb``, default 100 MB), one
   core: the standard library's and xxHash's XXH3-64 (``xxhash``, installed with ``datasets``),
   which ``mom_dist.checkpoint.integrity`` uses.
2. One rank's shard (``--shard-mb`` of fp32 pieces, 16 of them, as ``write_pieces`` gets them
   from the engine, on ``--device``): ``write_shard`` (safetensors' ``save_file`` + the checksum
   hashed from the tensors in memory, what the trainer does) against ``save_file`` alone, and
   reading the file back for verification (``integrity.file_record``) against reading every
   tensor of it. Files live in ``--dir`` (default: a temporary directory; the page cache holds
   what was just written, so this measures serialisation and hashing more than the disk).

Run:  .venv/bin/python benchmarks/checkpoint_checksum.py [--device cuda]   (about 1 minute)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import _machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hashes(mb: int, repeats: int) -> list[tuple[str, float]]:
    data = memoryview(os.urandom(mb << 20))
    fns = {"zlib.crc32": lambda: zlib.crc32(data), "zlib.adler32": lambda: zlib.adler32(data),
           "hashlib.sha1": lambda: hashlib.sha1(data).digest(), "hashlib.sha256": lambda: hashlib.sha256(data).digest(),
           "hashlib.blake2b": lambda: hashlib.blake2b(data).digest(), "hashlib.md5": lambda: hashlib.md5(data).digest()}
    import xxhash
    fns["xxhash.xxh3_64 (used)"] = lambda: xxhash.xxh3_64(data).digest()
    fns["xxhash.xxh3_128"] = lambda: xxhash.xxh3_128(data).digest()
    return [(name, (mb << 20) / median_time(fn, repeats) / 1e9) for name, fn in fns.items()]


def shard(mb: int, device: str, directory: str, repeats: int) -> dict:
    """Median seconds of each operation; the save with and without hashing alternate, so page-cache
    writeback hits both alike."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mom_dist.checkpoint.integrity import file_record, safetensors_record
    from mom_dist.checkpoint.shards import write_shard

    n = (mb << 20) // 4 // 16
    tensors = {f"exp_avg:w{i}:0": torch.randn(n, device=device) for i in range(16)}
    path = os.path.join(directory, "state_rank00000.safetensors")
    meta = {"format": "mom_dist.sharded.v1", "shapes": "{}", "steps": "{}"}
    cpu = {}

    def plain():  # the same copies to the CPU as write_shard makes, then safetensors alone
        cpu.update({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()})
        save_file(cpu, path, metadata=meta)

    def read_all():
        with safe_open(path, framework="pt") as f:
            return sum(float(f.get_tensor(k).sum()) for k in f.keys())  # touch every byte

    ops = {"save": plain, "hash": lambda: safetensors_record(path, cpu),
           "save+hash": lambda: write_shard(path, tensors, meta), "verify": lambda: file_record(path),
           "read": read_all}
    times = {k: [] for k in ops}
    for _ in range(repeats):
        for k, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    assert write_shard(path, tensors, meta) == file_record(path), "the checksum hashed from memory differs"
    os.remove(path)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hash-mb", type=int, default=100)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"# {_machine.describe()}\n")
    print(f"## Hash throughput, {a.hash_mb} MB in memory, one core (median of {a.repeats})\n")
    print("| hash | GB/s |\n|---|---:|")
    for name, gbs in hashes(a.hash_mb, a.repeats):
        print(f"| {name} | {gbs:.2f} |")
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        r = shard(a.shard_mb, a.device, d, a.repeats)
    print(f"\n## One {a.shard_mb} MB shard from {a.device} tensors (seconds, median of {a.repeats})\n")
    print("| save_file | its hash from memory | hash / save | write_shard (save + hash) | verify (read + hash) "
          "| read every tensor |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['save']:.3f} | {r['hash']:.3f} | {100 * r['hash'] / r['save']:.0f}% | {r['save+hash']:.3f} | "
          f"{r['verify']:.3f} | {r['read']:.3f} |")


if __name__ == "__main__":
    main()
