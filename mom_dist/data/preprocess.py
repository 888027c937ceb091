"""Corpus -> tokenized megatron-core IndexedDataset: the logic behind `mom-preprocess`.

Pipeline (one machine, bounded memory, resumable, never losing previous outputs):

    checks (arguments, tokenizer, inputs, prefix; nothing written if any fails)
      -> PREFIX_work/settings.json (settings + fingerprint of every input file)
      -> [tokenizer.model trained on the first --tokenizer-train-mb of text]
      -> inputs --(corpus.iter_records, main process, streaming)--> shards of ~shard_mb of text
      --(worker processes: SentencePiece encode + EOD, train/valid split per document)-->
         work/shard_K.{train,valid}.{bin,len} + work/shard_K.json (written last = "done")
      --(merge, streaming)--> work/out/: every output under its final name
      -> work/commit.json (the list of files to swap in) -> os.replace each into place
      -> PREFIX_work removed

Shard boundaries depend only on the input stream and `shard_mb`, and each document's split
only on (seed, its index), so the output is the same byte for byte for any worker count and
after any number of interruptions: a rerun of the same command skips shards whose .json exists
and redoes the rest; killed during the merge it merges again; killed during the swap it finishes
the swap (commit.json). Previous outputs under the prefix are replaced file by file with
os.replace only once every new file is complete, never deleted first. A run refused for bad
input (exit 2 in the CLI) removes the work directory it used, so nothing is left behind.
At most `2 * workers` shards are in flight, so memory does not grow with the corpus.

This module is the entry point, the resume/refuse decisions, the merge and the swap; the rest
lives in `work_dir.py` (paths, settings and input fingerprint, the prefix lock), `shards.py`
(the workers' encode), `tokenizer_training.py`, and `corpus.py`/`readers.py` (the inputs).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Optional

import numpy as np

from mom_dist.data import corpus
from mom_dist.data.indexed import DataIntegrityError, merge_shards, token_dtype, write_meta
from mom_dist.data.shards import MAX_SKIP_EXAMPLES, no_documents, run_shards, shard_records
from mom_dist.data.tokenizer import Tokenizer
from mom_dist.data.tokenizer_training import train_on_inputs
from mom_dist.data.work_dir import (  # noqa: F401  (the errors are part of this module's interface)
    SPLITS, OutputExistsError, PrefixInUseError, Settings, WorkDirError, all_outputs, describe_change,
    existing_outputs, input_fingerprint, makedirs, output_paths, prefix_lock, read_json, remove_tree, state_hash,
    write_json,
)

# Test hook: stop (os._exit(9), as a SIGKILL would) at "merge" or "swap" (after one file).
_DIE_ENV = "MOM_PREPROCESS_TEST_DIE_AT"
# Errors that mean "the inputs or arguments are wrong": the run is refused and leaves nothing.
REJECTED = (corpus.InputError, DataIntegrityError, ValueError)


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
    max_document_mb: float = 16.0,
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
        valid_ratio=0 writes no validation files.
    max_document_mb: documents larger than this (in the input: the JSON line, the .txt file or
        tar member, the decompressed .xz document, the parquet/dataset value) are skipped and
        counted as `document_too_large`; encoding one takes ~55 bytes of memory per byte.
    progress: False, True, or the expected number of documents (gives an ETA).

    Writes, for `prefix = output_prefix`:
        {prefix}_train_text_document.bin/.idx   train documents (tokens + EOD), megatron format
        {prefix}_valid_text_document.bin/.idx   validation documents (not when valid_ratio=0)
        {prefix}_{train,valid}_text_document.meta.json   vocab size, eod, dtype, tokenizer
                                                identity, max id, sha256 of the .bin
        {prefix}_tokenizer.model                the trained tokenizer (only when trained)
        {prefix}_summary.json                   the returned summary
    Token dtype is uint16 when the vocab is below 65,500, else int32. While running it keeps
    `{prefix}_work/`; rerunning the same command after an interruption at any stage resumes
    from it, and rerunning it after success returns the summary (`already_complete`).

    Raises, before writing anything: ValueError (bad argument, unreadable tokenizer),
    corpus.InputError (unreadable inputs), OutputExistsError (existing outputs without
    `overwrite`, or an interrupted run with other settings or changed inputs). Raises after
    starting, removing its work directory and leaving previous outputs untouched:
    corpus.CorruptInputError (corruption found mid-stream), corpus.InputError (no documents,
    empty train split, inputs changed during the run), ValueError (tokenizer training failed).
    """
    t_start = time.time()
    if isinstance(inputs, str):
        inputs = [inputs]
    if workers < 1:
        raise ValueError(f"workers={workers}: use 1 or more worker processes")
    if not 0.0 <= valid_ratio < 1.0:
        raise ValueError(f"valid_ratio={valid_ratio}: use a fraction in [0, 1), e.g. 0.0005")
    if not max_document_mb > 0:
        raise ValueError(f"max_document_mb={max_document_mb}: use a positive size in MB, e.g. 16 (encoding a "
                         "document takes ~55 bytes of memory per byte)")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb={shard_mb}: use a positive size in MB, e.g. 16")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: use 'bpe' or 'unigram'")
    tok_identity = None
    if tokenizer_model is not None:
        if not os.path.isfile(tokenizer_model):
            raise corpus.InputError(f"tokenizer model {tokenizer_model!r} not found; pass an existing "
                                    ".model or omit --tokenizer-model to train one")
        tok_identity = Tokenizer(tokenizer_model).identity  # ValueError when it is not a model
    else:
        if vocab_size < 300:
            raise ValueError(f"vocab_size={vocab_size} is too small; byte fallback alone needs 259 ids, "
                             "use --vocab-size 300 or more")
        if tokenizer_train_mb <= 0 or input_sentence_size < 1:
            raise ValueError("tokenizer_train_mb and input_sentence_size must be positive")
    ignored: list = []
    files = corpus.check_inputs(list(inputs), ignored)
    if ignored:
        exts = Counter(os.path.splitext(f)[1] or "(no extension)" for f in ignored)
        print(f"mom-preprocess: note: ignoring {len(ignored)} file(s) of other kinds in the input folders "
              f"({', '.join(f'{e}: {n}' for e, n in exts.most_common())}), e.g. {ignored[0]}", file=sys.stderr)
    paths = output_paths(output_prefix)
    settings = Settings(
        files=[f if f.startswith("hub:") else os.path.abspath(f) for f in files],
        text_field=text_field, shard_mb=shard_mb, valid_ratio=valid_ratio, seed=seed,
        tokenizer_model=os.path.abspath(tokenizer_model) if tokenizer_model else None,
        tokenizer_identity=tok_identity, vocab_size=vocab_size, model_type=model_type,
        tokenizer_train_mb=tokenizer_train_mb, input_sentence_size=input_sentence_size,
        max_document_mb=max_document_mb,
    )
    if tokenizer_model is not None:  # training options do not change the output then
        settings.vocab_size = settings.model_type = None
        settings.tokenizer_train_mb = settings.input_sentence_size = None
    state = {"settings": asdict(settings), "inputs": input_fingerprint(settings.files)}
    made = makedirs(os.path.dirname(os.path.abspath(output_prefix)))
    try:
        with prefix_lock(paths["lock"], output_prefix):  # one run per prefix, from here to the end
            return _start_or_resume(files, settings, state, paths, tokenizer_model, workers, progress,
                                    keep_work, overwrite, t_start)
    finally:
        for d in reversed(made):  # a refused run leaves no folder it created (rmdir: empty ones only)
            try:
                os.rmdir(d)
            except OSError:
                break


def _start_or_resume(files, settings, state, paths, tokenizer_model, workers, progress, keep_work,
                     overwrite, t_start):
    """Under the prefix lock: finish, resume, refuse or start the run for `paths`."""
    output_prefix = paths["prefix"]
    work = paths["work"]
    remove_tree(work + ".trash")  # a finished run killed while deleting its work dir
    previous = read_json(os.path.join(work, "settings.json"))

    if os.path.exists(os.path.join(work, "commit.json")):  # killed while swapping outputs in
        if previous == state:
            return _commit(paths, keep_work)
        if not overwrite:
            raise OutputExistsError(
                f"{output_prefix!r} is half-way through replacing its outputs (a run killed at the end, "
                f"state in {work}); rerun that run's command to finish it, or pass --overwrite to rebuild")
    existing = existing_outputs(paths)
    if existing and not overwrite:
        done = read_json(paths["summary"])
        if done and done.get("state_sha256") == state_hash(state):  # the same command, rerun
            done["already_complete"] = True
            return done
        raise OutputExistsError(
            f"output prefix {output_prefix!r} already has results ({existing[0]}, ...) from other "
            "settings or inputs; pass --overwrite to replace them or choose another prefix")
    if os.path.isdir(work):
        if previous is None or previous.get("settings") != state["settings"]:
            if not overwrite:
                old = (previous or {}).get("settings") or {}
                diff = sorted(k for k in state["settings"] if old.get(k) != state["settings"][k])
                raise OutputExistsError(
                    f"{work} holds an interrupted run with different settings ({', '.join(diff) or 'unreadable'}); "
                    "rerun with the same arguments to resume it, or pass --overwrite to discard it")
            remove_tree(work)
        elif previous.get("inputs") != state["inputs"]:
            if not overwrite:
                raise OutputExistsError(
                    f"the inputs changed since the interrupted run in {work} "
                    f"({describe_change(previous.get('inputs') or [], state['inputs'])}); resuming would mix "
                    "old and new documents. Restore the inputs and rerun, or pass --overwrite to start over")
            remove_tree(work)

    os.makedirs(work, exist_ok=True)
    write_json(os.path.join(work, "settings.json"), state)
    try:
        return _run(files, settings, state, paths, tokenizer_model, workers, progress, keep_work,
                    existing, t_start)
    except REJECTED:
        remove_tree(work)  # refused: the next, corrected command starts clean
        raise


def _run(files, settings, state, paths, tokenizer_model, workers, progress, keep_work, existing, t_start):
    work = paths["work"]
    model_path = tokenizer_model if tokenizer_model is not None else train_on_inputs(files, settings, work)
    tok = Tokenizer(model_path)

    stats = Counter()
    run_shards(files, settings, work, model_path, workers, progress, stats)

    # Every shard is done here (a crash between shards leaves holes a rerun fills).
    n_shards = stats["shards"]
    metas = shard_records(work, n_shards, token_dtype(tok.vocab_size))
    skipped, examples = Counter(), []
    for m in metas:
        skipped.update(m["skipped"])
        examples.extend(m["skip_examples"])
    counts = {s: sum(m[f"{s}_documents"] for m in metas) for s in SPLITS}
    records = sum(m["records"] for m in metas)
    if counts["train"] + counts["valid"] == 0:
        raise no_documents(records, skipped, examples, settings.text_field, "tokenize")
    if counts["train"] == 0:
        raise corpus.InputError(
            f"the train split would be empty: all {counts['valid']} document(s) went to validation "
            f"(--valid-ratio {settings.valid_ratio}; document 0 always does); add documents or pass "
            "--valid-ratio 0 (no validation files)")
    if input_fingerprint(settings.files) != state["inputs"]:
        raise corpus.InputError(
            f"the inputs changed while this run read them ({describe_change(state['inputs'], input_fingerprint(settings.files))}); "
            "rerun when they are stable")
    max_id = max([m["max_token_id"] for m in metas] + [-1])
    if max_id >= tok.vocab_size:
        raise RuntimeError(f"token id {max_id} >= vocab size {tok.vocab_size}: tokenizer bug")
    _test_die("merge")

    # Merge into work/out/ under the final names; nothing under the prefix changes yet.
    out = os.path.join(work, "out")
    os.makedirs(out, exist_ok=True)
    staged = lambda p: os.path.join(out, os.path.basename(p))  # noqa: E731
    dtype = token_dtype(tok.vocab_size)
    if tokenizer_model is None:
        shutil.copyfile(model_path, staged(paths["tokenizer"]))
        tok_rel = os.path.basename(paths["tokenizer"])
    else:
        tok_rel = os.path.relpath(os.path.abspath(tokenizer_model), os.path.dirname(os.path.abspath(paths["train"])))
    result, new_files = {}, []
    for s in SPLITS:
        if counts[s] == 0:  # only valid, only with valid_ratio=0: no file rather than an empty one
            result[s] = None
            continue
        shard_paths = [os.path.join(work, f"shard_{k:06d}.{s}") for k in range(n_shards)]
        result[s] = merge_shards(shard_paths, staged(paths[s]), dtype)
        if result[s]["documents"] != counts[s]:  # the shards changed under the merge
            raise WorkDirError(f"the merged {s} split holds {result[s]['documents']} documents but the shard "
                               f"records say {counts[s]}: something else writes to {work}; rerun the same command")
        write_meta(staged(paths[s]), {
            "vocab_size": tok.vocab_size, "eod": tok.eod, "eod_terminated": True, "dtype": np.dtype(dtype).name,
            "tokenizer_identity": tok.identity, "tokenizer_sha256": tok.sha256, "tokenizer_model": tok_rel,
            "max_token_id": max_id, "documents": result[s]["documents"], "tokens": result[s]["tokens"],
            "bin_sha256": result[s]["bin_sha256"],
        })
        new_files += [paths[s] + ext for ext in (".bin", ".idx", ".meta.json")]
    if tokenizer_model is None:
        new_files.append(paths["tokenizer"])
    summary = {
        "inputs": settings.files,
        "records_read": records,
        "documents": counts["train"] + counts["valid"],
        "tokens": sum(r["tokens"] for r in result.values() if r),
        "train": result["train"],
        "valid": result["valid"],
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "skipped_examples": examples[:MAX_SKIP_EXAMPLES],
        "tokenizer": {"model": paths["tokenizer"] if tokenizer_model is None else tokenizer_model,
                      "identity": tok.identity, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eod": tok.eod, "trained": tokenizer_model is None},
        "dtype": np.dtype(dtype).name,
        "max_token_id": max_id,
        "shards": n_shards,
        "resumed_shards": stats["resumed_shards"],
        "workers": workers,
        "valid_ratio": settings.valid_ratio,
        "seed": settings.seed,
        "max_document_mb": settings.max_document_mb,
        "wall_time_s": round(time.time() - t_start, 3),
        "outputs": {s: (paths[s] if result[s] else None) for s in SPLITS},
        "state_sha256": state_hash(state),
    }
    write_json(staged(paths["summary"]), summary)
    new_files.append(paths["summary"])  # last: its presence under the prefix means "complete"
    keep = set(new_files) | {os.path.abspath(tokenizer_model)} if tokenizer_model else set(new_files)
    stale = [p for p in all_outputs(paths) if p not in keep and os.path.abspath(p) not in keep
             and os.path.exists(p)]
    write_json(os.path.join(work, "commit.json"), {"files": new_files, "stale": stale})
    return _commit(paths, keep_work)


def _commit(paths: dict, keep_work: bool) -> dict:
    """Swap the staged outputs in (os.replace each: old files are replaced, never deleted first),
    then remove outputs the new run does not have. Idempotent, so a rerun after a kill here
    finishes the job."""
    work = paths["work"]
    plan = read_json(os.path.join(work, "commit.json"))
    out = os.path.join(work, "out")
    for i, dest in enumerate(plan["files"]):
        src = os.path.join(out, os.path.basename(dest))
        if os.path.exists(src):
            os.replace(src, dest)
        if i == 0:
            _test_die("swap")
    for p in plan["stale"]:
        if os.path.exists(p):
            os.remove(p)
    summary = read_json(paths["summary"])
    if keep_work:
        os.remove(os.path.join(work, "commit.json"))
        shutil.rmtree(out, ignore_errors=True)
    else:
        remove_tree(work)
    return summary


def _test_die(stage: str) -> None:
    if os.environ.get(_DIE_ENV) == stage:
        os._exit(9)
