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
    """Concatenate shards (written by ShardWriter) into `{prefix}.bin/.idx`. Streams: O(shard) memory."""
    dtype = np.dtype(dtype)
    n_seq = sum(os.path.getsize(p + ".len") // 4 for p in shard_paths)
    tmp_bin, tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
    with open(tmp_bin, "wb") as out:
        for p in shard_paths:
            with open(p + ".bin", "rb") as f:
                shutil.copyfileobj(f, out, _CHUNK)
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
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")
    return {"documents": n_seq, "tokens": offset // dtype.itemsize}


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


def max_token_id(prefix: str, info: IndexInfo | None = None) -> int:
    """Largest token id in `{prefix}.bin` (scans it in chunks; prefer the .meta.json value)."""
    info = info or read_index(prefix)
    data = np.memmap(prefix + ".bin", mode="r", dtype=info.dtype)
    best = -1
    for start in range(0, len(data), _CHUNK * 4):
        chunk = data[start:start + _CHUNK * 4]
        if len(chunk):
            best = max(best, int(chunk.max()))
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


def verify(prefix: str, tokenizer_model: str | None = None, samples: int = 3,
           full: bool = True) -> dict:
    """Check `{prefix}.bin/.idx`; return counts (+ decoded samples when a tokenizer is given).

    Also loads the pair with megatron-core's IndexedDataset, so what passes here trains.
    """
    info = read_index(prefix)
    report = {"prefix": prefix, "dtype": info.dtype.name, "documents": info.documents,
              "tokens": info.tokens}
    meta = read_meta(prefix)
    if full:
        report["max_token_id"] = max_token_id(prefix, info)
        if meta and meta.get("vocab_size") is not None and report["max_token_id"] >= meta["vocab_size"]:
            raise DataIntegrityError(
                f"{prefix}: token id {report['max_token_id']} >= vocab size {meta['vocab_size']}"
            )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    if len(ds) != info.documents:
        raise DataIntegrityError(f"{prefix}: megatron reads {len(ds)} sequences, index says {info.documents}")
    if tokenizer_model is None and meta and meta.get("tokenizer_model"):
        candidate = os.path.join(os.path.dirname(os.path.abspath(prefix)), meta["tokenizer_model"])
        tokenizer_model = candidate if os.path.isfile(candidate) else None
    if tokenizer_model and samples:
        from mom_dist.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_model)
        if meta and meta.get("tokenizer_sha256") not in (None, tok.sha256):
            raise DataIntegrityError(
                f"{prefix} was tokenized with a different tokenizer (sha256 {meta['tokenizer_sha256'][:12]}..., "
                f"given {tok.sha256[:12]}...)"
            )
        picks = np.linspace(0, info.documents - 1, num=min(samples, info.documents)).astype(int)
        report["samples"] = [
            {"document": int(i), "tokens": int(info.lengths[i]), "text": tok.decode(ds[int(i)][:64]) + " ..."}
            for i in picks
        ] if info.documents else []
    return report
