"""Checksums of a checkpoint's files: recorded when they are written, verified before they are read.

Every file a step directory holds and reads back - each rank's ``state_rankNNNNN.safetensors``
and ``rng_rankNNNNN.pt`` - is recorded in its ``mom_state.json``:

    "files": {"state_rank00000.safetensors": {"bytes": 54312, "xxh3_64": "2f0c3b1d9e8a4c71"}, ...}

(``mom_state.json`` itself carries a checksum of its content, ``layout.read_state``). The
writers hash the bytes they hand to the file (``shards.write_shard``, ``safe_load.save_rng``),
so the record says what was meant to be on disk and a later read tells whether the storage kept
it. The hash is xxHash's XXH3-64: this detects truncation and flipped bits (not tampering), and
it is the fastest at hand - ``benchmarks/checkpoint_checksum.py`` measured 20 GB/s on one core
here against 3.4 for zlib's crc32, 1.8 for sha256 and 0.9 for blake2b; hashing a 256 MB shard
from memory took 3% of its save - and ``xxhash`` comes with ``datasets``. A file whose size or checksum differs is
a ``DamagedCheckpoint`` (one line naming it and the previous good checkpoint). Checkpoints
written before checksums existed have no ``files`` record and are read unverified.
"""

from __future__ import annotations

import json
import os
import struct

import torch
import torch.distributed as dist
import xxhash

from mom_dist.checkpoint.layout import CHECKSUM, DamagedCheckpoint

ALGORITHM = CHECKSUM  # the record's key: the name of the hash
_CHUNK = 16 << 20  # bytes read per call when hashing a file


class Digest:
    """A running checksum over the bytes of one file, in file order, and their count."""

    def __init__(self):
        self._hash, self.nbytes = xxhash.xxh3_64(), 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.nbytes += len(view)

    def record(self) -> dict:
        return {"bytes": self.nbytes, ALGORITHM: self._hash.hexdigest()}


def record_of_bytes(data: bytes) -> dict:
    digest = Digest()
    digest.update(data)
    return digest.record()


def file_record(path: str) -> dict:
    """The record of a file as it is on disk (read in chunks)."""
    digest = Digest()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.record()


def safetensors_record(path: str, tensors: dict) -> dict:
    """The record of a safetensors file just written from ``tensors`` (contiguous, on the CPU),
    hashed from memory - the header as written, then each tensor's bytes in the file's order -
    so the file is not read back."""
    with open(path, "rb") as f:
        head = f.read(8)
        header = f.read(struct.unpack("<Q", head)[0])
    digest = Digest()
    digest.update(head + header)
    entries = sorted((v["data_offsets"], k) for k, v in json.loads(header).items() if k != "__metadata__")
    end = 0
    for (start, stop), name in entries:
        t = tensors[name]
        if start != end or stop - start != t.numel() * t.element_size():
            return file_record(path)  # not laid out as expected: hash what is on disk instead
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        end = stop
    if digest.nbytes != os.path.getsize(path):
        return file_record(path)
    return digest.record()


def check_file(path: str, record: dict | None) -> None:
    """Raise ``DamagedCheckpoint`` unless the file has the recorded size and checksum (no record:
    nothing to check)."""
    if record is None:
        return
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DamagedCheckpoint(path, "it is missing; mom_state.json records it") from None
    if size != record["bytes"]:
        raise DamagedCheckpoint(path, f"{size} bytes where mom_state.json records {record['bytes']}: truncated "
                                "or incompletely copied")
    got = file_record(path)[ALGORITHM]
    if got != record[ALGORITHM]:
        raise DamagedCheckpoint(path, f"its {ALGORITHM} checksum is {got} where mom_state.json records "
                                f"{record[ALGORITHM]}: flipped bits")


def verify_files(tag_dir: str, files: dict | None, rank: int = 0, world_size: int = 1) -> None:
    """Check the recorded files of a step directory (rank r takes every world_size-th file, so
    each is read once per job); raise on this rank's first bad file."""
    for name in sorted(files or {})[rank::world_size]:
        check_file(os.path.join(tag_dir, name), files[name])


def first_error_everywhere(check) -> None:
    """Run ``check()`` on every rank (a collective when distributed) and raise the first error any
    rank found, on every rank, so they all leave together."""
    error = None
    try:
        check()
    except ValueError as e:
        error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise ValueError(error)
