"""Benchmark: mom-preprocess vs nanoGPT's recipe (datasets.map(num_proc=N) + np.memmap).

    python benchmarks/preprocess_throughput.py [--mb 50] [--vocab-size 8000] [--out DIR]

Builds an offline English corpus (CPython docs, `write_default_corpus`) of --mb and 2x --mb,
trains one SentencePiece model, then runs each configuration in its own process while
sampling the RSS of its whole process tree (peak = max of the sum over the tree):
    ours    workers 1 and 2 on the corpus, workers 1 on the doubled corpus
    nanoGPT datasets.load_dataset("json") -> map(encode + EOD, num_proc=N) -> np.memmap .bin
Both use the same tokenizer and write uint16 tokens; the tokenizer is trained beforehand and
not timed. Prints a markdown table (checked in at benchmarks/results/preprocess_throughput.md)
with tokens/s, speedup, peak RSS and the extrapolated wall time for OpenWebText (9.04e9 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWT_TOKENS = 9.04e9  # OpenWebText in GPT-2 tokens (nanoGPT's prepare.py: ~9,035,582,198)


def run_ours(corpus, prefix, model, workers, shard_mb):
    from mom_dist.data.preprocess import preprocess

    t = time.time()
    s = preprocess([corpus], prefix, tokenizer_model=model, workers=workers, overwrite=True,
                   valid_ratio=0.0005, shard_mb=shard_mb)
    return {"tokens": s["tokens"], "seconds": time.time() - t}


def run_nanogpt(corpus, prefix, model, workers, shard_mb=None):
    """nanoGPT data/openwebtext/prepare.py, with our SentencePiece model instead of tiktoken."""
    import datasets
    import numpy as np

    from mom_dist.data.tokenizer import Tokenizer

    t = time.time()
    tok = Tokenizer(model)
    ds = datasets.load_dataset("json", data_files=corpus, split="train",
                               cache_dir=os.path.dirname(prefix) + "/hf_cache")
    split = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)

    def process(example):
        ids = tok.encode(example["text"]) + [tok.eod]
        return {"ids": ids, "len": len(ids)}

    total = 0
    for name, part in split.items():
        tokd = part.map(process, remove_columns=["text"], num_proc=workers if workers > 1 else None)
        arr_len = int(np.sum(tokd["len"], dtype=np.uint64))
        arr = np.memmap(f"{prefix}_{name}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
        idx = 0
        shards = min(64, len(tokd))
        for b in range(shards):
            batch = tokd.shard(num_shards=shards, index=b, contiguous=True).with_format("numpy")
            chunk = np.concatenate(batch["ids"])
            arr[idx:idx + len(chunk)] = chunk
            idx += len(chunk)
        arr.flush()
        total += arr_len
    return {"tokens": total, "seconds": time.time() - t}


def measure(kind, corpus, prefix, model, workers, shard_mb):
    """Run one configuration in a child process; return its result and peak tree RSS (MB)."""
    import psutil

    cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, corpus, prefix, model, str(workers),
           str(shard_mb)]
    env = dict(os.environ, PYTHONPATH=ROOT, HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read().decode()
    if proc.returncode:
        raise SystemExit(f"{kind} workers={workers} failed (rc {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--out", default="/tmp/mom_preprocess_bench")
    ap.add_argument("--shard-mb", type=float, default=4.0,
                    help="mom-preprocess shard size; OpenWebText has ~2,500 shards of the default 16 MB, "
                         "so at 50 MB small shards keep the workers as evenly loaded as a real run")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, corpus, prefix, model, workers, shard_mb = args.one
        fn = run_ours if kind == "ours" else run_nanogpt
        print(json.dumps(fn(corpus, prefix, model, int(workers), float(shard_mb))))
        return

    sys.path.insert(0, ROOT)
    from mom_dist.data.corpus import iter_records, write_default_corpus
    from mom_dist.data.tokenizer import train_tokenizer

    os.makedirs(args.out, exist_ok=True)
    small = write_default_corpus(os.path.join(args.out, "small"), target_mb=args.mb)
    big = write_default_corpus(os.path.join(args.out, "big"), target_mb=2 * args.mb)
    model = os.path.join(args.out, "tok.model")
    if not os.path.exists(model):
        texts = (r.text for _, r in iter_records([small]) if r.text)
        train_tokenizer(texts, model[:-6], vocab_size=args.vocab_size, input_sentence_size=200_000)

    rows = []
    for kind, corpus, workers, label in (
        ("ours", small, 1, f"{args.mb:g} MB"), ("ours", small, 2, f"{args.mb:g} MB"),
        ("nanogpt", small, 1, f"{args.mb:g} MB"), ("nanogpt", small, 2, f"{args.mb:g} MB"),
        ("ours", big, 1, f"{2 * args.mb:g} MB"), ("ours", big, 2, f"{2 * args.mb:g} MB"),
    ):
        r = measure(kind, corpus, os.path.join(args.out, f"{kind}{workers}_{label[:-3]}", "p"), model, workers,
                    args.shard_mb)
        r.update(kind=kind, workers=workers, corpus=label, tps=r["tokens"] / r["seconds"])
        rows.append(r)
        print(f"{kind:8s} w={workers} {label:>7s}: {r['tps']:,.0f} tok/s, {r['seconds']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)

    base = {(r["kind"], r["corpus"]): r["tps"] for r in rows if r["workers"] == 1}
    lines = [
        f"Corpus: `write_default_corpus` (CPython docs as JSON lines), SentencePiece BPE vocab "
        f"{args.vocab_size}, uint16 output, shards of {args.shard_mb:g} MB, one SentencePiece thread per worker. "
        f"Machine: {os.cpu_count()} CPU cores. "
        f"OWT = extrapolated wall time for OpenWebText ({OWT_TOKENS:.2e} tokens) at this rate.",
        "",
        "| pipeline | corpus | workers | tokens | seconds | tokens/s | vs 1 worker | peak RSS (MB) | OWT (h) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "mom-preprocess" if r["kind"] == "ours" else "nanoGPT (datasets.map + memmap)"
        lines.append(
            f"| {name} | {r['corpus']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['tps']:,.0f} | {r['tps'] / base[(r['kind'], r['corpus'])]:.2f}x | "
            f"{r['peak_rss_mb']:.0f} | {OWT_TOKENS / r['tps'] / 3600:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
