"""megatron-core IndexedDataset files (.bin/.idx): streaming shard writer, merge, and verify.

The .idx layout (megatron-core 0.16, `indexed_dataset._IndexWriter`), little endian:

    b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 n_seq | u64 n_doc
    | int32 sequence_lengths[n_seq] | int64 sequence_pointers[n_seq] (byte offsets in .bin)
    | int64 document_indices[n_doc]          (0, 1, ..., n_seq: one sequence per document)

We write it ourselves instead of using `IndexedDatasetBuilder` because the builder keeps every
length in a Python list (O(documents) memory); here shards hold their lengths on disk and the
merge streams them, so peak memory does not grow with the corpus. The files are read back with
megatron-core's `IndexedDataset` in the tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
CODE_DTYPES = {8: np.uint16, 4: np.int32, 1: np.uint8, 2: np.int8, 3: np.int16, 5: np.int64,
               6: np.float64, 7: np.float32}
_CHUNK = 1 << 22


class DataIntegrityError(ValueError):
    """A .bin/.idx pair is corrupt, truncated or inconsistent."""


def token_dtype(vocab_size: int):
    """uint16 below 65,500 ids (half the disk and page cache), int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


class ShardWriter:
    """Appends documents to `{path}.bin` (tokens) and `{path}.len` (int32 lengths)."""

    def __init__(self, path: str, dtype):
        self.dtype = np.dtype(dtype)
        self.path = path
        self._bin = open(path + ".bin", "wb")
        self._len = open(path + ".len", "wb")
        self.documents = 0
        self.tokens = 0
        self.max_id = -1

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self._len.write(np.int32(len(ids)).tobytes())
        self.documents += 1
        self.tokens += len(ids)
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))

    def close(self) -> None:
        for f in (self._bin, self._len):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def merge_shards(shard_paths: list[str], prefix: str, dtype) -> dict:
    """Concatenate shards (written by ShardWriter) into `{prefix}.bin/.idx`. Streams: O(shard) memory.

    Returns documents, tokens and the sha256 of the .bin (hashed while copying; `verify` checks it).
    """
    dtype = np.dtype(dtype)
    n_seq = sum(os.path.getsize(p + ".len") // 4 for p in shard_paths)
    tmp_bin, tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
    digest = hashlib.sha256()
    with open(tmp_bin, "wb") as out:
        for p in shard_paths:
            with open(p + ".bin", "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    with open(tmp_idx, "wb") as out:
        out.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[dtype]))
        out.write(struct.pack("<Q", n_seq) + struct.pack("<Q", n_seq + 1))
        for p in shard_paths:  # sequence lengths
            with open(p + ".len", "rb") as f:
                shutil.copyfileobj(f, out, _CHUNK)
        offset = 0  # sequence pointers: byte offsets, cumulative over shards
        for p in shard_paths:
            lengths = np.fromfile(p + ".len", dtype=np.int32).astype(np.int64)
            if len(lengths):
                ptr = np.empty_like(lengths)
                ptr[0] = 0
                np.cumsum(lengths[:-1], out=ptr[1:])
                out.write(((ptr * dtype.itemsize) + offset).tobytes())
                offset += int(lengths.sum()) * dtype.itemsize
        start = 0  # document indices 0..n_seq, written in chunks
        while start <= n_seq:
            stop = min(n_seq + 1, start + _CHUNK)
            out.write(np.arange(start, stop, dtype=np.int64).tobytes())
            start = stop
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")
    return {"documents": n_seq, "tokens": offset // dtype.itemsize, "bin_sha256": digest.hexdigest()}


def write_documents(prefix: str, docs: Iterable[Iterable[int]], dtype) -> dict:
    """Write token documents straight to `{prefix}.bin/.idx` (small data, tests, tools)."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    shard = ShardWriter(prefix + ".shard", dtype)
    for d in docs:
        shard.add(np.asarray(list(d), dtype=np.int64))
    shard.close()
    info = merge_shards([prefix + ".shard"], prefix, dtype)
    info["max_token_id"] = shard.max_id
    for ext in (".bin", ".len"):
        os.remove(prefix + ".shard" + ext)
    return info


@dataclass
class IndexInfo:
    dtype: np.dtype
    lengths: np.ndarray      # int32[n_seq], memory-mapped
    pointers: np.ndarray     # int64[n_seq], memory-mapped
    doc_indices: np.ndarray  # int64[n_doc]

    @property
    def documents(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def read_index(prefix: str) -> IndexInfo:
    """Parse `{prefix}.idx` and check it against `{prefix}.bin`; raise DataIntegrityError."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for p in (idx, bin_):
        if not os.path.isfile(p):
            raise DataIntegrityError(f"{p} is missing; run mom-preprocess to (re)build {prefix}")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != HEADER:
        raise DataIntegrityError(f"{idx}: not a megatron .idx file (bad header); rebuild it")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in CODE_DTYPES:
        raise DataIntegrityError(f"{idx}: unsupported version {version} or dtype code {code}")
    expected = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
    if size < expected:
        raise DataIntegrityError(
            f"{idx} is truncated ({size} bytes, header says {expected}); rebuild {prefix}"
        )
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=34 + 4 * n_seq)
    docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=34 + 12 * n_seq)
    dtype = np.dtype(CODE_DTYPES[code])
    info = IndexInfo(dtype, lengths, pointers, docs)
    need = (int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize) if n_seq else 0
    have = os.path.getsize(bin_)
    if have != need:
        raise DataIntegrityError(
            f"{bin_} has {have} bytes but {idx} describes {need}: the data is truncated or does "
            f"not belong to this index; rebuild {prefix} with mom-preprocess"
        )
    if n_seq and (lengths.min() < 0 or int(pointers[0]) != 0):
        raise DataIntegrityError(f"{idx}: negative lengths or bad first pointer; rebuild {prefix}")
    return info


def _id_range(data) -> tuple[int, int]:
    lo, hi = 0, -1
    for start in range(0, len(data), _CHUNK * 4):
        chunk = data[start:start + _CHUNK * 4]
        if len(chunk):
            lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    return lo, hi


def max_token_id(prefix: str, info: IndexInfo | None = None) -> int:
    """Largest token id in `{prefix}.bin` (scans all of it in chunks)."""
    info = info or read_index(prefix)
    return _id_range(np.memmap(prefix + ".bin", mode="r", dtype=info.dtype))[1]


def check_tokens(prefix: str, info: IndexInfo, vocab_size: int, eod: int | None = None, *,
                 full: bool = False, samples: int = 64, max_tokens: int = 4096) -> int:
    """Check the token ids in `{prefix}.bin` against the vocabulary; return the largest id seen.

    full=False (the loader, before training): `samples` documents evenly spread over the file,
    up to `max_tokens` of each, plus the last token of every sampled document. Catches a .bin
    that is not what its .idx/.meta.json describe (random bytes of the right size, another
    tokenizer's data) at the cost of a few reads. full=True (`--verify`): every id and every
    document's last token. `eod`: when given, every checked document must end with it
    (mom-preprocess appends it to each document).
    """
    n = info.documents
    if n == 0:
        return -1
    data = np.memmap(prefix + ".bin", mode="r", dtype=info.dtype)
    item = info.dtype.itemsize
    if full:
        lo, best = _id_range(data)
        docs = np.arange(n)
    else:
        docs = np.unique(np.linspace(0, n - 1, num=min(samples, n)).astype(np.int64))
        lo, best = 0, -1
        for d in docs:
            start = int(info.pointers[d]) // item
            chunk = data[start:start + min(int(info.lengths[d]), max_tokens)]
            if len(chunk):
                lo, best = min(lo, int(chunk.min())), max(best, int(chunk.max()))
    if best >= vocab_size or lo < 0:
        bad_id = best if best >= vocab_size else lo
        raise DataIntegrityError(
            f"{prefix}.bin holds token id {bad_id} but the vocabulary has ids 0..{vocab_size - 1}: the .bin "
            f"is corrupt or was not written for this .idx/.meta.json; rebuild {prefix} with mom-preprocess"
        )
    if eod is not None:
        lengths = info.lengths[docs].astype(np.int64)
        nonempty = lengths > 0
        ends = (info.pointers[docs][nonempty] // item) + lengths[nonempty] - 1
        last = np.asarray(data[ends]) if full or len(ends) < 1024 else np.asarray(data[ends[:1024]])
        bad = np.flatnonzero(last != eod)
        if len(bad) or not nonempty.all():
            which = int(docs[nonempty][bad[0]]) if len(bad) else int(docs[~nonempty][0])
            raise DataIntegrityError(
                f"{prefix}.bin: document {which} does not end with the end-of-document id {eod}: the "
                f".bin is corrupt or does not belong to this .idx; rebuild {prefix} with mom-preprocess"
            )
    return best


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def write_meta(prefix: str, meta: dict) -> None:
    """Sidecar facts the loader checks before training (vocab, eod, tokenizer checksum)."""
    with open(meta_path(prefix) + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(meta_path(prefix) + ".tmp", meta_path(prefix))


def read_meta(prefix: str) -> dict | None:
    try:
        with open(meta_path(prefix)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def tokenizer_mismatch(meta: dict | None, tok) -> str | None:
    """Why `tok` is not the tokenizer recorded in `meta`, or None when it is (or none is recorded).

    Compares the vocabulary identity (`Tokenizer.identity`); data written before that was
    recorded falls back to the .model file's sha256.
    """
    if not meta:
        return None
    if meta.get("tokenizer_identity"):
        if meta["tokenizer_identity"] != tok.identity:
            return (f"its vocabulary differs (identity {meta['tokenizer_identity'][:12]}..., "
                    f"given {tok.identity[:12]}...)")
        return None
    if meta.get("tokenizer_sha256") not in (None, tok.sha256):
        return f"its .model file differs (sha256 {meta['tokenizer_sha256'][:12]}..., given {tok.sha256[:12]}...)"
    return None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(prefix: str, tokenizer_model: str | None = None, samples: int = 3,
           full: bool = True) -> dict:
    """Check `{prefix}.bin/.idx`; return counts (+ decoded samples when a tokenizer is found).

    full=True (`mom-preprocess --verify`): the .bin's sha256 against the .meta.json, every token
    id against the vocabulary and every document's final EOD; full=False: the sampled check the
    loader does (`check_tokens`). Also loads the pair with megatron-core's IndexedDataset, so
    what passes here trains.
    """
    info = read_index(prefix)
    report = {"prefix": prefix, "dtype": info.dtype.name, "documents": info.documents,
              "tokens": info.tokens}
    meta = read_meta(prefix) or {}
    if full and meta.get("bin_sha256"):
        if file_sha256(prefix + ".bin") != meta["bin_sha256"]:
            raise DataIntegrityError(
                f"{prefix}.bin does not match the sha256 in {meta_path(prefix)}: the file was changed or "
                f"corrupted after mom-preprocess wrote it; rebuild {prefix}"
            )
        report["bin_sha256"] = "ok"
    if tokenizer_model is None and meta.get("tokenizer_model"):
        candidate = os.path.join(os.path.dirname(os.path.abspath(prefix)), meta["tokenizer_model"])
        tokenizer_model = candidate if os.path.isfile(candidate) else None
    tok = None
    if tokenizer_model:
        from mom_dist.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_model)
        why = tokenizer_mismatch(meta, tok)
        if why:
            raise DataIntegrityError(f"{prefix} was tokenized with another tokenizer than {tokenizer_model}: {why}")
    vocab = meta.get("vocab_size") or (tok.vocab_size if tok else None)
    if vocab is not None:
        eod = meta.get("eod") if meta.get("eod_terminated") else None
        report["max_token_id"] = check_tokens(prefix, info, int(vocab), eod, full=full)
    elif full:
        report["max_token_id"] = max_token_id(prefix, info)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    if len(ds) != info.documents:
        raise DataIntegrityError(f"{prefix}: megatron reads {len(ds)} sequences, index says {info.documents}")
    if tok is not None and samples:
        picks = np.linspace(0, info.documents - 1, num=min(samples, info.documents)).astype(int)
        report["samples"] = [
            {"document": int(i), "tokens": int(info.lengths[i]), "text": tok.decode(ds[int(i)][:64]) + " ..."}
            for i in picks
        ] if info.documents else []
    return report
