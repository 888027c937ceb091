"""Benchmark: mom-preprocess vs nanoGPT's recipe (datasets.map(num_proc=N) + np.memmap).

    python benchmarks/preprocess_throughput.py [--mb 30] [--long-mb 30] [--vocab-size 8000] [--out DIR]

Two corpora, both offline, written as JSON lines:
    short  `write_default_corpus` (CPython docs): paragraphs, ~2-8 KB documents, --mb and 2x --mb
    long   rendered man pages (`man`/groff on /usr/share/man, pages of 8 KB or more; without
           them, CPython docs joined into 40-200 paragraph documents), --long-mb
Trains one SentencePiece model (on the short corpus, not timed), then runs each configuration in
its own process while sampling the RSS of its whole process tree (peak = max of the sum):
    ours    workers 1 and 2 (short, long, doubled short)
    nanoGPT datasets.load_dataset("json") -> map(encode + EOD, num_proc=N) -> np.memmap .bin
    encode  SentencePiece alone, one thread, over the same documents held in memory: the
            ceiling for one worker (where the time goes)
    train   tokenizer training at two --tokenizer-train-mb caps (peak RSS grows with the cap)
Prints a markdown table (checked in at benchmarks/results/preprocess_throughput.md) with
tokens/s, speedup, peak RSS and the extrapolated wall time for OpenWebText (9.04e9 tokens).
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


def run_encode(corpus, prefix, model, workers, shard_mb=None):
    """SentencePiece encode only (one thread, documents already in memory): the per-core ceiling."""
    from mom_dist.data.corpus import iter_records
    from mom_dist.data.tokenizer import Tokenizer

    tok = Tokenizer(model)
    texts = [r.text for _, r in iter_records([corpus]) if r.text]
    t = time.time()
    total = 0
    for start in range(0, len(texts), 256):
        total += sum(len(ids) + 1 for ids in tok.encode_batch(texts[start:start + 256]))
    return {"tokens": total, "seconds": time.time() - t}


def run_train(corpus, prefix, model, train_mb, shard_mb=None):
    """Tokenizer training inside mom-preprocess (the phase whose RSS grows with the cap)."""
    from mom_dist.data.tokenizer_training import train_on_inputs
    from mom_dist.data.work_dir import Settings

    os.makedirs(prefix, exist_ok=True)
    settings = Settings(files=[corpus], text_field="text", shard_mb=16, valid_ratio=0, seed=1234,
                         tokenizer_model=None, tokenizer_identity=None, vocab_size=8000, model_type="bpe",
                         tokenizer_train_mb=float(train_mb), input_sentence_size=2_000_000)
    t = time.time()
    train_on_inputs([corpus], settings, prefix)
    return {"tokens": 0, "seconds": time.time() - t}


def _render_man(path):
    """Plain text of one man page, or None (groff warnings and failures are ignored)."""
    try:
        src = subprocess.run(["man", "-l", "-P", "cat", path], capture_output=True, timeout=60,
                             env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0", LANG="C.UTF-8"))
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = src.stdout.decode("utf-8", "replace")
    # strip overstrike bold/underline (char BACKSPACE char) that some pages keep
    import re

    return re.sub(".\x08", "", text) if src.returncode == 0 else None


def write_long_corpus(out_dir, target_mb, min_kb=8):
    """Long documents as JSON lines: rendered man pages of >= min_kb KB (sorted by path), or,
    without man pages, CPython doc paragraphs joined into 40-200 paragraph documents."""
    import random
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "long.jsonl")
    if os.path.exists(path):
        return path, json.load(open(path + ".info"))
    target = int(target_mb * 2**20)
    written, docs = 0, 0
    pages = sorted(os.path.join(r, n) for r, _, ns in os.walk("/usr/share/man")
                   for n in ns if r.split(os.sep)[-1].startswith("man")) if shutil.which("man") else []
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        if pages:
            source = "rendered man pages (/usr/share/man, MANWIDTH=80)"
            with ThreadPoolExecutor(os.cpu_count() or 2) as ex:
                for start in range(0, len(pages), 64):
                    for text in ex.map(_render_man, pages[start:start + 64]):
                        if text and len(text.encode()) >= min_kb * 1024 and written < target:
                            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                            f.write(line)
                            written += len(line.encode())
                            docs += 1
                    if written >= target:
                        break
        if written < target:  # no (or too few) man pages: long documents from the CPython docs
            from mom_dist.data.corpus import _doc_paragraphs

            source = (source + " + " if pages else "") + "CPython docs joined into 40-200 paragraph documents"
            paragraphs, rng = _doc_paragraphs(), random.Random(7)
            while written < target:
                doc = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(40, 200)))
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                docs += 1
    os.replace(path + ".tmp", path)
    info = {"source": source, "documents": docs, "mb": written / 2**20, "mean_kb": written / docs / 1024}
    json.dump(info, open(path + ".info", "w"))
    return path, info


def corpus_info(path):
    n, size = 0, os.path.getsize(path)
    with open(path, "rb") as f:
        for _ in f:
            n += 1
    return {"documents": n, "mb": size / 2**20, "mean_kb": size / max(n, 1) / 1024}


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
    ap.add_argument("--mb", type=float, default=30.0, help="short-document corpus size (and 2x)")
    ap.add_argument("--long-mb", type=float, default=30.0, help="long-document corpus size")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--out", default="/tmp/mom_preprocess_bench")
    ap.add_argument("--shard-mb", type=float, default=4.0,
                    help="mom-preprocess shard size; OpenWebText has ~2,500 shards of the default 16 MB, "
                         "so at 50 MB small shards keep the workers as evenly loaded as a real run")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, corpus, prefix, model, workers, shard_mb = args.one
        fn = {"ours": run_ours, "nanogpt": run_nanogpt, "encode": run_encode, "train": run_train}[kind]
        print(json.dumps(fn(corpus, prefix, model, int(float(workers)), float(shard_mb))))
        return

    sys.path.insert(0, ROOT)
    from mom_dist.data.corpus import iter_records, write_default_corpus
    from mom_dist.data.tokenizer import train_tokenizer

    os.makedirs(args.out, exist_ok=True)
    small = write_default_corpus(os.path.join(args.out, "small"), target_mb=args.mb)
    big = write_default_corpus(os.path.join(args.out, "big"), target_mb=2 * args.mb)
    long, long_info = write_long_corpus(os.path.join(args.out, "long"), args.long_mb)
    model = os.path.join(args.out, "tok.model")
    if not os.path.exists(model):
        texts = (r.text for _, r in iter_records([small]) if r.text)
        train_tokenizer(texts, model[:-6], vocab_size=args.vocab_size, input_sentence_size=200_000)
    names = {small: f"short {args.mb:g} MB", big: f"short {2 * args.mb:g} MB", long: f"long {args.long_mb:g} MB"}

    rows = []
    plan = [("encode", small, 1), ("ours", small, 1), ("ours", small, 2), ("nanogpt", small, 1),
            ("nanogpt", small, 2), ("encode", long, 1), ("ours", long, 1), ("ours", long, 2),
            ("nanogpt", long, 1), ("nanogpt", long, 2), ("ours", big, 1), ("ours", big, 2)]
    for kind, corpus, workers in plan:
        label = names[corpus]
        r = measure(kind, corpus, os.path.join(args.out, f"{kind}{workers}_{label.replace(' ', '_')}", "p"),
                    model, workers, args.shard_mb)
        r.update(kind=kind, workers=workers, corpus=label, tps=r["tokens"] / r["seconds"])
        rows.append(r)
        print(f"{kind:8s} w={workers} {label:>14s}: {r['tps']:,.0f} tok/s, {r['seconds']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
    train_rows = []
    for cap in (4, 16):
        r = measure("train", small, os.path.join(args.out, f"train{cap}"), model, cap, args.shard_mb)
        train_rows.append((cap, r))
        print(f"train cap {cap} MB: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)

    base = {(r["kind"], r["corpus"]): r["tps"] for r in rows if r["workers"] == 1}
    ng = {(r["corpus"], r["workers"]): r for r in rows if r["kind"] == "nanogpt"}
    info = {names[small]: corpus_info(small), names[big]: corpus_info(big), names[long]: long_info}
    lines = [
        f"SentencePiece BPE vocab {args.vocab_size} (trained on the short corpus), uint16 output, shards of "
        f"{args.shard_mb:g} MB, one SentencePiece thread per worker. Machine: {os.cpu_count()} CPU cores. "
        f"OWT = extrapolated wall time for OpenWebText ({OWT_TOKENS:.2e} tokens) at this rate.",
        "",
        "| corpus | source | documents | mean document |",
        "|---|---|---|---|",
    ]
    for label, i in info.items():
        src = i.get("source", "`write_default_corpus` (CPython docs)")
        lines.append(f"| {label} | {src} | {i['documents']:,} | {i['mean_kb']:.1f} KB |")
    lines += [
        "",
        "| pipeline | corpus | workers | tokens | seconds | tokens/s | vs 1 worker | vs nanoGPT (same workers) "
        "| peak RSS (MB) | OWT (h) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    titles = {"ours": "mom-preprocess", "nanogpt": "nanoGPT (datasets.map + memmap)",
              "encode": "SentencePiece encode alone (in memory)"}
    for r in rows:
        other = ng.get((r["corpus"], r["workers"]))
        vs = f"{other['seconds'] / r['seconds']:.2f}x faster" if other and r["kind"] == "ours" else ""
        lines.append(
            f"| {titles[r['kind']]} | {r['corpus']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['tps']:,.0f} | {r['tps'] / base[(r['kind'], r['corpus'])]:.2f}x | {vs} | "
            f"{r['peak_rss_mb']:.0f} | {OWT_TOKENS / r['tps'] / 3600:.1f} |")
    lines += ["", "| tokenizer training (inside mom-preprocess) | --tokenizer-train-mb | seconds | peak RSS (MB) |",
              "|---|---|---|---|"]
    for cap, r in train_rows:
        lines.append(f"| {names[small]}, vocab 8000 | {cap} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
