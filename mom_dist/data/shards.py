"""Sharded encode for `mom-preprocess`: the record stream cut into shards, tokenized by workers.

Shard boundaries depend only on the input stream and `shard_mb`, and each document's
train/valid split only on (seed, shard index, position), so the output does not depend on the
number of workers. A worker writes `work/shard_K.{train,valid}.{bin,len}`, then
`work/shard_K.json` (its record: documents, tokens, skipped records) last, which marks it done;
a rerun skips done shards (their input is re-read, not re-tokenized). At most `2 * workers`
shards are in flight, so memory does not grow with the corpus. Workers are spawned, and exit
when the tool does (even on SIGKILL). `shard_records` checks every shard's files against its
record before the merge.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from typing import Optional

import numpy as np

from mom_dist.data import corpus
from mom_dist.data.indexed import ShardWriter, token_dtype
from mom_dist.data.tokenizer import Tokenizer
from mom_dist.data.work_dir import SPLITS, Settings, WorkDirError, read_json, write_json

MAX_SKIP_EXAMPLES = 20
# Test hook: seconds a worker sleeps before marking a shard done (lets a test kill mid-run).
_DELAY_ENV = "MOM_PREPROCESS_TEST_SHARD_DELAY"


def count_skip(rec, skipped: Counter, examples: list) -> None:
    """Count a skipped record by reason and keep its file:line for the first few."""
    skipped[rec.skip] += 1
    if len(examples) < MAX_SKIP_EXAMPLES:
        examples.append({"where": rec.where, "reason": rec.skip})


def no_documents(records: int, skipped: Counter, examples: list, text_field: str, what: str):
    if not records:
        return corpus.InputError(f"the inputs hold no records, so there is nothing to {what}; check the input paths")
    reasons = ", ".join(f"{r}: {n}" for r, n in skipped.most_common())
    top = skipped.most_common(1)[0][0]
    hint = (f"check --text-field (now {text_field!r})" if top == corpus.SKIP_FIELD
            else "raise --max-document-mb" if top == corpus.SKIP_TOO_LARGE else "check the inputs")
    first = f"; first at {examples[0]['where']}" if examples else ""
    return corpus.InputError(f"no usable documents to {what}: all {records} records were skipped ({reasons}"
                             f"{first}); {hint}")


_worker_tokenizer: Optional[Tokenizer] = None


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the tool does, even if the tool is SIGKILLed.

    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG). Everywhere:
    a daemon thread polls the parent pid (covers other systems and the race where the parent
    died before prctl ran).
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _init_worker(model_path: str, parent_pid: Optional[int] = None) -> None:
    global _worker_tokenizer
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    _worker_tokenizer = Tokenizer(model_path)


def _process_shard(task: dict) -> dict:
    """Tokenize one shard and write its files; the .json is written last and marks it done."""
    tok = _worker_tokenizer
    k, work, texts = task["index"], task["work"], task["texts"]
    dtype = token_dtype(tok.vocab_size)
    # Split per document from (seed, global document index): independent of shards and workers.
    first = task["first_doc"]
    u = np.random.default_rng([task["seed"], k]).random(len(texts))
    valid = u < task["valid_ratio"]
    if first == 0 and len(texts) and task["valid_ratio"] > 0:
        valid[0] = True  # a tiny corpus still gets one validation document
    writers = {s: ShardWriter(os.path.join(work, f"shard_{k:06d}.{s}"), dtype) for s in SPLITS}
    eod = tok.eod
    for start in range(0, len(texts), 256):
        batch = tok.encode_batch(texts[start:start + 256])
        for j, ids in enumerate(batch):
            arr = np.empty(len(ids) + 1, dtype=np.int64)
            arr[:-1] = ids
            arr[-1] = eod
            writers["valid" if valid[start + j] else "train"].add(arr)
    for w in writers.values():
        w.close()
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    meta = {
        "index": k,
        "records": task["records"],
        "text_bytes": task["text_bytes"],
        "skipped": task["skipped"],
        "skip_examples": task["skip_examples"],
        "max_token_id": max(w.max_id for w in writers.values()),
        **{f"{s}_documents": writers[s].documents for s in SPLITS},
        **{f"{s}_tokens": writers[s].tokens for s in SPLITS},
    }
    write_json(os.path.join(work, f"shard_{k:06d}.json"), meta)
    return meta


def _shard_tasks(files, settings: Settings, work: str, done: set, stats: dict):
    """Cut the record stream into shard tasks; shards already done are read but not emitted."""
    limit = int(settings.shard_mb * 1024 * 1024)
    k, doc_index = 0, 0
    texts, nbytes, records = [], 0, 0
    skipped, examples = Counter(), []

    def task():
        return {"index": k, "work": work, "texts": texts, "first_doc": doc_index - len(texts),
                "seed": settings.seed, "valid_ratio": settings.valid_ratio,
                "records": records, "text_bytes": nbytes, "skipped": dict(skipped),
                "skip_examples": examples}

    for _, rec in corpus.iter_records(files, settings.text_field, settings.max_bytes()):
        records += 1
        stats["records"] += 1
        if rec.text is None:
            count_skip(rec, skipped, examples)
            continue
        texts.append(rec.text)
        doc_index += 1
        nbytes += len(rec.text)
        if nbytes >= limit:
            if k not in done:
                yield task()
            k += 1
            texts, nbytes, records, skipped, examples = [], 0, 0, Counter(), []
    if texts or records or k == 0:
        if k not in done:
            yield task()
        k += 1
    stats["shards"] = k


def run_shards(files, settings, work, model_path, workers, progress, stats) -> None:
    done = {int(n[6:12]) for n in os.listdir(work) if n.startswith("shard_") and n.endswith(".json")}
    stats["resumed_shards"] = len(done)
    bar = _progress_bar(progress)
    t0 = time.time()
    totals = Counter()

    def account(meta):
        docs = meta["train_documents"] + meta["valid_documents"]
        toks = meta["train_tokens"] + meta["valid_tokens"]
        totals.update(docs=docs, tokens=toks)
        if bar is not None:
            dt = max(time.time() - t0, 1e-9)
            bar.update(docs)
            bar.set_postfix_str(f"{totals['docs'] / dt:,.0f} docs/s {totals['tokens'] / dt:,.0f} tok/s")

    tasks = _shard_tasks(files, settings, work, done, stats)
    if workers == 1:  # in-process: no pickling of text, no extra process on a small machine
        _init_worker(model_path)
        for t in tasks:
            account(_process_shard(t))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: callers (tests, trainers) may hold threads (torch, OpenMP).
        # ProcessPoolExecutor, not Pool: a worker that dies (OOM killer) raises BrokenProcessPool
        # here instead of hanging forever.
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(model_path, os.getpid()))
        procs = []
        try:
            pending = deque()
            for t in tasks:
                pending.append(pool.submit(_process_shard, t))
                procs = list(getattr(pool, "_processes", {}).values()) or procs
                while len(pending) >= 2 * workers:  # bound shards in flight -> bounded memory
                    account(pending.popleft().result())
            while pending:
                account(pending.popleft().result())
        except BaseException:
            # A bad input or Ctrl-C: stop now, do not wait for the shards in flight.
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(10)
            raise
        pool.shutdown(wait=True)
        for p in procs:  # shutdown joined them; make sure (no process outlives the tool)
            p.join()
    if bar is not None:
        bar.close()


def _progress_bar(progress):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", desc="tokenizing", file=sys.stderr, mininterval=1.0,
                total=progress if isinstance(progress, int) and progress > 1 else None)


def shard_records(work: str, n_shards: int, dtype) -> list[dict]:
    """Every shard's record (.json), checked against its files before they are merged.

    A shard whose files do not hold the documents and tokens its record counts (another
    process wrote to the work directory, or a file was damaged) loses its record, so that the
    same command redoes it, and the run stops (WorkDirError, exit 1) instead of merging it.
    """
    item = np.dtype(dtype).itemsize
    metas = []
    for k in range(n_shards):
        base = os.path.join(work, f"shard_{k:06d}")
        meta, problem = read_json(base + ".json"), None
        if meta is None:
            problem = "its record shard_%06d.json is missing or unreadable" % k
        for s in SPLITS if meta else ():
            try:
                found = (os.path.getsize(f"{base}.{s}.len") // 4, os.path.getsize(f"{base}.{s}.bin") // item)
            except OSError:
                found = ("no", "no")
            said = (meta[f"{s}_documents"], meta[f"{s}_tokens"])
            if found != said:
                problem = (f"its {s} files hold {found[0]} documents / {found[1]} tokens, its record "
                           f"{said[0]} / {said[1]}")
                break
        if problem:
            if meta is not None:
                os.remove(base + ".json")
            raise WorkDirError(f"shard {k} in {work} is inconsistent ({problem}): something else wrote to the work "
                               "directory, or it was damaged; its record was removed, so that shard is redone")
        metas.append(meta)
    return metas
