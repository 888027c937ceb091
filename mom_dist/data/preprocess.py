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
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from mom_dist.data import corpus
from mom_dist.data.indexed import DataIntegrityError, ShardWriter, merge_shards, token_dtype, write_meta
from mom_dist.data.tokenizer import Tokenizer, train_tokenizer

SPLITS = ("train", "valid")
_MAX_SKIP_EXAMPLES = 20
_FINGERPRINT_BYTES = 8192  # hashed from the start and from the end of every input file
# Test hook: seconds a worker sleeps before marking a shard done (lets a test kill mid-run).
_DELAY_ENV = "MOM_PREPROCESS_TEST_SHARD_DELAY"
# Test hook: stop (os._exit(9), as a SIGKILL would) at "merge" or "swap" (after one file).
_DIE_ENV = "MOM_PREPROCESS_TEST_DIE_AT"
# Errors that mean "the inputs or arguments are wrong": the run is refused and leaves nothing.
REJECTED = (corpus.InputError, DataIntegrityError, ValueError)


class OutputExistsError(FileExistsError):
    """The output prefix already holds results and --overwrite was not given."""


class PrefixInUseError(OutputExistsError):
    """Another mom-preprocess holds the output prefix's lock; the message names it."""


class WorkDirError(OSError):
    """A shard in the work directory does not hold what its record says (written by something
    else, or damaged); its record is removed so that rerunning the command redoes it."""


@contextlib.contextmanager
def _prefix_lock(path: str, prefix: str):
    """Hold `path` (PREFIX_preprocess.lock) while the run works: a second run on the prefix stops
    at once naming the first (host, pid, start); a lock whose process is gone is taken over.
    The lock code is mom-train's out_dir lock (today in mom_dist/train/run_lock.py)."""
    from mom_dist.train.run_lock import release_lock, take_lock

    def note(line):
        print(f"mom-preprocess: note: {line.removeprefix('[mom_dist] ')}", file=sys.stderr)

    try:
        holder = take_lock(path, note, f"output prefix {prefix!r}", "mom-preprocess",
                           "wait for it to finish or stop it, or use another --output-prefix")
    except ValueError as err:
        raise PrefixInUseError(str(err)) from None
    try:
        yield
    finally:
        release_lock(path, holder["token"])


@dataclass
class _Settings:
    """What the output depends on; stored in the work dir so a resume can check it matches."""

    files: list
    text_field: str
    shard_mb: float
    valid_ratio: float
    seed: int
    tokenizer_model: Optional[str]
    tokenizer_identity: Optional[str]
    vocab_size: Optional[int]             # the four training options: None with a given tokenizer
    model_type: Optional[str]
    tokenizer_train_mb: Optional[float]
    input_sentence_size: Optional[int]
    max_document_mb: float = 16.0         # larger documents are skipped (document_too_large)

    def max_bytes(self) -> int:
        return int(self.max_document_mb * 1024 * 1024)



def _count_skip(rec, skipped: Counter, examples: list) -> None:
    """Count a skipped record by reason and keep its file:line for the first few."""
    skipped[rec.skip] += 1
    if len(examples) < _MAX_SKIP_EXAMPLES:
        examples.append({"where": rec.where, "reason": rec.skip})

def output_paths(prefix: str) -> dict:
    """Every path `preprocess` writes for `prefix` (see `preprocess` for what each holds)."""
    return {
        "train": f"{prefix}_train_text_document",
        "valid": f"{prefix}_valid_text_document",
        "tokenizer": f"{prefix}_tokenizer.model",
        "summary": f"{prefix}_summary.json",
        "work": f"{prefix}_work",
        "lock": f"{prefix}_preprocess.lock",
        "prefix": prefix,
    }


def _all_outputs(paths: dict) -> list[str]:
    """Every file a finished run may have written for the prefix (summary last)."""
    out = [paths[s] + ext for s in SPLITS for ext in (".bin", ".idx", ".meta.json")]
    return out + [paths["tokenizer"], paths["summary"]]


def _existing_outputs(paths: dict) -> list[str]:
    return [p for p in _all_outputs(paths) if os.path.exists(p)]


def _write_json(path: str, obj) -> None:
    """Write atomically and durably: a reader sees the old file or the complete new one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- input fingerprint


def _file_print(path: str) -> dict:
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if st.st_size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, st.st_size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def input_fingerprint(files: list[str]) -> list[dict]:
    """Path, size, mtime and a hash of the first and last 8 KiB of every input file.

    A saved dataset folder contributes every file in it; `hub:` inputs only their name (a
    remote dataset cannot be fingerprinted here). Costs two small reads per file.
    """
    out = []
    for f in files:
        if f.startswith("hub:"):
            out.append({"path": f})
        elif os.path.isdir(f):
            for root, dirs, names in os.walk(f):
                dirs.sort()
                out.extend(_file_print(os.path.join(root, n)) for n in sorted(names))
        else:
            out.append(_file_print(f))
    return out


def _describe_change(old: list, new: list) -> str:
    before = {d["path"]: d for d in old}
    after = {d["path"]: d for d in new}
    for path, d in after.items():
        if path not in before:
            return f"{path} is new"
        for key, what in (("size", "size"), ("mtime_ns", "modification time"),
                          ("head_tail_sha256", "content")):
            if before[path].get(key) != d.get(key):
                return f"{path} changed ({what}: {before[path].get(key)} -> {d.get(key)})"
    for path in before:
        if path not in after:
            return f"{path} is gone"
    return "the input order changed"


# --------------------------------------------------------------------------- workers

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
    _write_json(os.path.join(work, f"shard_{k:06d}.json"), meta)
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

    for _, rec in corpus.iter_records(files, settings.text_field, settings.max_bytes()):
        records += 1
        stats["records"] += 1
        if rec.text is None:
            _count_skip(rec, skipped, examples)
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
    settings = _Settings(
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
    made = _makedirs(os.path.dirname(os.path.abspath(output_prefix)))
    try:
        with _prefix_lock(paths["lock"], output_prefix):  # one run per prefix, from here to the end
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
    _remove_tree(work + ".trash")  # a finished run killed while deleting its work dir
    previous = _read_json(os.path.join(work, "settings.json"))

    if os.path.exists(os.path.join(work, "commit.json")):  # killed while swapping outputs in
        if previous == state:
            return _commit(paths, keep_work)
        if not overwrite:
            raise OutputExistsError(
                f"{output_prefix!r} is half-way through replacing its outputs (a run killed at the end, "
                f"state in {work}); rerun that run's command to finish it, or pass --overwrite to rebuild")
    existing = _existing_outputs(paths)
    if existing and not overwrite:
        done = _read_json(paths["summary"])
        if done and done.get("state_sha256") == _state_hash(state):  # the same command, rerun
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
            _remove_tree(work)
        elif previous.get("inputs") != state["inputs"]:
            if not overwrite:
                raise OutputExistsError(
                    f"the inputs changed since the interrupted run in {work} "
                    f"({_describe_change(previous.get('inputs') or [], state['inputs'])}); resuming would mix "
                    "old and new documents. Restore the inputs and rerun, or pass --overwrite to start over")
            _remove_tree(work)

    os.makedirs(work, exist_ok=True)
    _write_json(os.path.join(work, "settings.json"), state)
    try:
        return _run(files, settings, state, paths, tokenizer_model, workers, progress, keep_work,
                    existing, t_start)
    except REJECTED:
        _remove_tree(work)  # refused: the next, corrected command starts clean
        raise


def _state_hash(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _makedirs(path: str) -> list[str]:
    """os.makedirs, returning the directories it created (outermost first)."""
    made, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return made[::-1]


def _remove_tree(path: str) -> None:
    """Remove a work directory so that a kill half-way leaves no half-deleted one behind."""
    if os.path.isdir(path):
        trash = path if path.endswith(".trash") else path + ".trash"
        if trash != path:
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(path, trash)
        shutil.rmtree(trash)


def _no_documents(records: int, skipped: Counter, examples: list, text_field: str, what: str):
    if not records:
        return corpus.InputError(f"the inputs hold no records, so there is nothing to {what}; check the input paths")
    reasons = ", ".join(f"{r}: {n}" for r, n in skipped.most_common())
    top = skipped.most_common(1)[0][0]
    hint = (f"check --text-field (now {text_field!r})" if top == corpus.SKIP_FIELD
            else "raise --max-document-mb" if top == corpus.SKIP_TOO_LARGE else "check the inputs")
    first = f"; first at {examples[0]['where']}" if examples else ""
    return corpus.InputError(f"no usable documents to {what}: all {records} records were skipped ({reasons}"
                             f"{first}); {hint}")


def _train(files, settings: _Settings, work: str) -> str:
    """Train the tokenizer once; a resumed run reuses work/tokenizer.model."""
    model_path = os.path.join(work, "tokenizer.model")
    if os.path.isfile(model_path):
        return model_path
    cap = int(settings.tokenizer_train_mb * 1024 * 1024)
    seen = Counter()
    skipped, examples = Counter(), []

    def sample_texts():
        for _, rec in corpus.iter_records(files, settings.text_field, settings.max_bytes()):
            seen["records"] += 1
            if rec.text is None:
                _count_skip(rec, skipped, examples)
                continue
            seen["docs"] += 1
            yield rec.text
            seen["bytes"] += len(rec.text)
            if seen["bytes"] >= cap:
                return

    texts = sample_texts()
    try:  # look at the first document before SentencePiece does, to name an empty corpus
        first = next(texts)
    except StopIteration:
        raise _no_documents(seen["records"], skipped, examples, settings.text_field,
                            "train a tokenizer on") from None

    def chained():
        yield first
        yield from texts

    trained = train_tokenizer(
        chained(), os.path.join(work, "tokenizer_tmp"), vocab_size=settings.vocab_size,
        model_type=settings.model_type, input_sentence_size=settings.input_sentence_size, seed=settings.seed,
    )
    os.replace(trained, model_path)
    return model_path


def _run(files, settings, state, paths, tokenizer_model, workers, progress, keep_work, existing, t_start):
    work = paths["work"]
    model_path = tokenizer_model if tokenizer_model is not None else _train(files, settings, work)
    tok = Tokenizer(model_path)

    stats = Counter()
    _run_shards(files, settings, work, model_path, workers, progress, stats)

    # Every shard is done here (a crash between shards leaves holes a rerun fills).
    n_shards = stats["shards"]
    metas = _shard_records(work, n_shards, token_dtype(tok.vocab_size))
    skipped, examples = Counter(), []
    for m in metas:
        skipped.update(m["skipped"])
        examples.extend(m["skip_examples"])
    counts = {s: sum(m[f"{s}_documents"] for m in metas) for s in SPLITS}
    records = sum(m["records"] for m in metas)
    if counts["train"] + counts["valid"] == 0:
        raise _no_documents(records, skipped, examples, settings.text_field, "tokenize")
    if counts["train"] == 0:
        raise corpus.InputError(
            f"the train split would be empty: all {counts['valid']} document(s) went to validation "
            f"(--valid-ratio {settings.valid_ratio}; document 0 always does); add documents or pass "
            "--valid-ratio 0 (no validation files)")
    if input_fingerprint(settings.files) != state["inputs"]:
        raise corpus.InputError(
            f"the inputs changed while this run read them ({_describe_change(state['inputs'], input_fingerprint(settings.files))}); "
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
        "skipped_examples": examples[:_MAX_SKIP_EXAMPLES],
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
        "state_sha256": _state_hash(state),
    }
    _write_json(staged(paths["summary"]), summary)
    new_files.append(paths["summary"])  # last: its presence under the prefix means "complete"
    keep = set(new_files) | {os.path.abspath(tokenizer_model)} if tokenizer_model else set(new_files)
    stale = [p for p in _all_outputs(paths) if p not in keep and os.path.abspath(p) not in keep
             and os.path.exists(p)]
    _write_json(os.path.join(work, "commit.json"), {"files": new_files, "stale": stale})
    return _commit(paths, keep_work)


def _shard_records(work: str, n_shards: int, dtype) -> list[dict]:
    """Every shard's record (.json), checked against its files before they are merged.

    A shard whose files do not hold the documents and tokens its record counts (another
    process wrote to the work directory, or a file was damaged) loses its record, so that the
    same command redoes it, and the run stops (WorkDirError, exit 1) instead of merging it.
    """
    item = np.dtype(dtype).itemsize
    metas = []
    for k in range(n_shards):
        base = os.path.join(work, f"shard_{k:06d}")
        meta, problem = _read_json(base + ".json"), None
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


def _commit(paths: dict, keep_work: bool) -> dict:
    """Swap the staged outputs in (os.replace each: old files are replaced, never deleted first),
    then remove outputs the new run does not have. Idempotent, so a rerun after a kill here
    finishes the job."""
    work = paths["work"]
    plan = _read_json(os.path.join(work, "commit.json"))
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
    summary = _read_json(paths["summary"])
    if keep_work:
        os.remove(os.path.join(work, "commit.json"))
        shutil.rmtree(out, ignore_errors=True)
    else:
        _remove_tree(work)
    return summary


def _test_die(stage: str) -> None:
    if os.environ.get(_DIE_ENV) == stage:
        os._exit(9)
