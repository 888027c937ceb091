"""Corpus -> tokenized megatron-core IndexedDataset: the logic behind `mom-preprocess`.

Pipeline (one machine, bounded memory, resumable):

    inputs --(corpus.iter_records, main process, streaming)--> shards of ~shard_mb of text
          --(worker processes: SentencePiece encode + EOD, train/valid split per document)-->
          work/shard_K.{train,valid}.{bin,len} + work/shard_K.json (written last = "done")
          --(merge, streaming)--> {prefix}_{train,valid}_text_document.{bin,idx}

Shard boundaries depend only on the input stream and `shard_mb`, and each document's split
only on (seed, its index), so the output is the same byte for byte for any worker count and
after any number of interruptions: a rerun skips shards whose .json exists and redoes the rest.
At most `2 * workers` shards are in flight, so memory does not grow with the corpus.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from mom_dist.data import corpus
from mom_dist.data.indexed import ShardWriter, merge_shards, token_dtype, write_meta
from mom_dist.data.tokenizer import Tokenizer, train_tokenizer

SPLITS = ("train", "valid")
_MAX_SKIP_EXAMPLES = 20
# Test hook: seconds a worker sleeps before marking a shard done (lets a test kill mid-run).
_DELAY_ENV = "MOM_PREPROCESS_TEST_SHARD_DELAY"


class OutputExistsError(FileExistsError):
    """The output prefix already holds results and --overwrite was not given."""


@dataclass
class _Settings:
    """What the output depends on; stored in the work dir so a resume can check it matches."""

    files: list
    text_field: str
    shard_mb: float
    valid_ratio: float
    seed: int
    tokenizer_model: Optional[str]
    vocab_size: int
    model_type: str
    tokenizer_train_mb: float
    input_sentence_size: int


def output_paths(prefix: str) -> dict:
    """Every path `preprocess` writes for `prefix` (see `preprocess` for what each holds)."""
    return {
        "train": f"{prefix}_train_text_document",
        "valid": f"{prefix}_valid_text_document",
        "tokenizer": f"{prefix}_tokenizer.model",
        "summary": f"{prefix}_summary.json",
        "work": f"{prefix}_work",
    }


def _existing_outputs(paths: dict) -> list[str]:
    found = []
    for key in ("train", "valid"):
        for ext in (".bin", ".idx", ".meta.json"):
            if os.path.exists(paths[key] + ext):
                found.append(paths[key] + ext)
    for key in ("tokenizer", "summary"):
        if os.path.exists(paths[key]):
            found.append(paths[key])
    return found


# --------------------------------------------------------------------------- workers

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
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
    path = os.path.join(work, f"shard_{k:06d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return meta


def _shard_tasks(files, settings: _Settings, work: str, done: set, stats: dict):
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

    for _, rec in corpus.iter_records(files, settings.text_field):
        records += 1
        stats["records"] += 1
        if rec.text is None:
            skipped[rec.skip] += 1
            if len(examples) < _MAX_SKIP_EXAMPLES:
                examples.append({"where": rec.where, "reason": rec.skip})
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


def _run_shards(files, settings, work, model_path, workers, progress, stats) -> None:
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

        # spawn, not fork: callers (tests, trainers) may hold threads (torch, OpenMP).
        with mp.get_context("spawn").Pool(workers, _init_worker, (model_path,)) as pool:
            pending = deque()
            for t in tasks:
                pending.append(pool.apply_async(_process_shard, (t,)))
                while len(pending) >= 2 * workers:  # bound shards in flight -> bounded memory
                    account(pending.popleft().get())
            while pending:
                account(pending.popleft().get())
    if bar is not None:
        bar.close()


def _progress_bar(progress):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", desc="tokenizing", file=sys.stderr, mininterval=1.0,
                total=progress if isinstance(progress, int) and progress > 1 else None)


# --------------------------------------------------------------------------- entry point


def preprocess(
    inputs,
    output_prefix: str,
    *,
    tokenizer_model: Optional[str] = None,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    workers: int = 1,
    valid_ratio: float = 0.0005,
    seed: int = 1234,
    overwrite: bool = False,
    text_field: str = "text",
    shard_mb: float = 16.0,
    tokenizer_train_mb: float = 1024.0,
    input_sentence_size: int = 2_000_000,
    keep_work: bool = False,
    progress=False,
) -> dict:
    """Tokenize `inputs` into megatron-core indexed datasets; return the summary dict.

    inputs: paths (or one path) of any kind `mom_dist.data.corpus` reads, or `hub:NAME[:SPLIT]`.
    tokenizer_model: an existing SentencePiece `.model` to use; when None one is trained
        (BPE by default, `vocab_size`, byte fallback) on up to `tokenizer_train_mb` of the
        inputs, of which SentencePiece samples `input_sentence_size` lines.
    valid_ratio: each document goes to validation with this probability, drawn from
        (seed, document index); the first document always does when valid_ratio > 0.
    progress: False, True, or the expected number of documents (gives an ETA).

    Writes, for `prefix = output_prefix`:
        {prefix}_train_text_document.bin/.idx   train documents (tokens + EOD), megatron format
        {prefix}_valid_text_document.bin/.idx   validation documents
        {prefix}_{train,valid}_text_document.meta.json   vocab size, eod, dtype, tokenizer sha256
        {prefix}_tokenizer.model                the trained tokenizer (only when trained)
        {prefix}_summary.json                   the returned summary
    Token dtype is uint16 when the vocab is below 65,500, else int32. While running it keeps
    `{prefix}_work/` (shards; removed at the end unless keep_work); rerunning after an
    interruption resumes from it. Raises corpus.InputError for unreadable inputs and
    OutputExistsError for an existing prefix without `overwrite`, before writing anything.
    """
    t_start = time.time()
    if isinstance(inputs, str):
        inputs = [inputs]
    if workers < 1:
        raise ValueError(f"workers={workers}: use 1 or more worker processes")
    if not 0.0 <= valid_ratio < 1.0:
        raise ValueError(f"valid_ratio={valid_ratio}: use a fraction in [0, 1), e.g. 0.0005")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb={shard_mb}: use a positive size in MB, e.g. 16")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: use 'bpe' or 'unigram'")
    if tokenizer_model is not None and not os.path.isfile(tokenizer_model):
        raise corpus.InputError(f"tokenizer model {tokenizer_model!r} not found; pass an existing .model or omit it to train one")
    files = corpus.check_inputs(list(inputs))
    paths = output_paths(output_prefix)
    existing = _existing_outputs(paths)
    if existing and not overwrite:
        raise OutputExistsError(
            f"output prefix {output_prefix!r} already has results ({existing[0]}, ...); "
            "pass --overwrite to replace them or choose another prefix"
        )
    settings = _Settings(
        files=[f if f.startswith("hub:") else os.path.abspath(f) for f in files],
        text_field=text_field, shard_mb=shard_mb, valid_ratio=valid_ratio, seed=seed,
        tokenizer_model=os.path.abspath(tokenizer_model) if tokenizer_model else None,
        vocab_size=vocab_size, model_type=model_type, tokenizer_train_mb=tokenizer_train_mb,
        input_sentence_size=input_sentence_size,
    )
    work = paths["work"]
    manifest_path = os.path.join(work, "settings.json")
    if os.path.isdir(work):
        try:
            with open(manifest_path) as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != asdict(settings):
            if not overwrite:
                raise OutputExistsError(
                    f"{work} holds an interrupted run with different settings or inputs; pass "
                    "--overwrite to discard it, or rerun with the same arguments to resume it"
                )
            shutil.rmtree(work)
    if overwrite:
        for p in existing:
            os.remove(p)
    os.makedirs(work, exist_ok=True)
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(asdict(settings), f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)

    # Tokenizer: given, or trained once (a resume reuses the one in the work dir).
    if tokenizer_model is not None:
        model_path = tokenizer_model
    else:
        model_path = os.path.join(work, "tokenizer.model")
        if not os.path.isfile(model_path):
            cap = int(tokenizer_train_mb * 1024 * 1024)

            def sample_texts():
                seen = 0
                for _, rec in corpus.iter_records(files, text_field):
                    if rec.text is not None:
                        yield rec.text
                        seen += len(rec.text)
                        if seen >= cap:
                            return

            trained = train_tokenizer(
                sample_texts(), os.path.join(work, "tokenizer_tmp"), vocab_size=vocab_size,
                model_type=model_type, input_sentence_size=input_sentence_size, seed=seed,
            )
            os.replace(trained, model_path)
    tok = Tokenizer(model_path)

    stats = Counter()
    _run_shards(files, settings, work, model_path, workers, progress, stats)

    # Merge: every shard must be done (a crash between shards leaves holes a rerun fills).
    n_shards = stats["shards"]
    metas = []
    for k in range(n_shards):
        with open(os.path.join(work, f"shard_{k:06d}.json")) as f:
            metas.append(json.load(f))
    dtype = token_dtype(tok.vocab_size)
    skipped, examples = Counter(), []
    for m in metas:
        skipped.update(m["skipped"])
        examples.extend(m["skip_examples"])
    max_id = max([m["max_token_id"] for m in metas] + [-1])
    if max_id >= tok.vocab_size:
        raise RuntimeError(f"token id {max_id} >= vocab size {tok.vocab_size}: tokenizer bug")
    if tokenizer_model is None:
        shutil.copyfile(model_path, paths["tokenizer"])
        tok_rel = os.path.basename(paths["tokenizer"])
    else:
        tok_rel = os.path.relpath(os.path.abspath(tokenizer_model), os.path.dirname(os.path.abspath(output_prefix)))
    result = {}
    for s in SPLITS:
        shard_paths = [os.path.join(work, f"shard_{k:06d}.{s}") for k in range(n_shards)]
        result[s] = merge_shards(shard_paths, paths[s], dtype)
        write_meta(paths[s], {
            "vocab_size": tok.vocab_size, "eod": tok.eod, "dtype": np.dtype(dtype).name,
            "tokenizer_sha256": tok.sha256, "tokenizer_model": tok_rel,
            "max_token_id": max_id, "documents": result[s]["documents"], "tokens": result[s]["tokens"],
        })
    summary = {
        "inputs": settings.files,
        "records_read": sum(m["records"] for m in metas),
        "documents": result["train"]["documents"] + result["valid"]["documents"],
        "tokens": result["train"]["tokens"] + result["valid"]["tokens"],
        "train": result["train"],
        "valid": result["valid"],
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "skipped_examples": examples[:_MAX_SKIP_EXAMPLES],
        "tokenizer": {"model": paths["tokenizer"] if tokenizer_model is None else tokenizer_model,
                      "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eod": tok.eod,
                      "trained": tokenizer_model is None},
        "dtype": np.dtype(dtype).name,
        "max_token_id": max_id,
        "shards": n_shards,
        "resumed_shards": stats["resumed_shards"],
        "workers": workers,
        "valid_ratio": valid_ratio,
        "seed": seed,
        "wall_time_s": round(time.time() - t_start, 3),
        "outputs": {s: paths[s] for s in SPLITS},
    }
    with open(paths["summary"] + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(paths["summary"] + ".tmp", paths["summary"])
    if not keep_work:
        shutil.rmtree(work)
    return summary
