"""Checksums of a checkpoint's files: recorded when they are written, verified before they are read.

Every file a step directory holds and reads back - each rank's ``state_rankNNNNN.safetensors``
and ``rng_rankNNNNN.pt`` - is recorded in its ``mom_state.json``:

    "files": {"state_rank00000.safetensors": {"bytes": 54312, "crc32": "8d1f03aa"}, ...}

(``mom_state.json`` itself carries a crc32 of its content, ``layout.read_state``). The writers
hash the bytes they hand to the file (``shards.write_shard``, ``safe_load.save_rng``), so the
record says what was meant to be on disk and a later read tells whether the storage kept it.
CRC-32 (zlib): this detects truncation and flipped bits, not tampering, and it is the fastest
hash the standard library has (``benchmarks/checkpoint_checksum.py``: about 1.8 GB/s on one core
here, sha256 0.65, blake2b 0.31). A file whose size or checksum differs is a
``DamagedCheckpoint`` (one line naming it and the previous good checkpoint). Checkpoints written
before checksums existed have no ``files`` record and are read unverified.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import torch
import torch.distributed as dist

from mom_dist.checkpoint.layout import DamagedCheckpoint

ALGORITHM = "crc32"
_CHUNK = 16 << 20  # bytes hashed per call (zlib releases the GIL for each)


class Crc32:
    """A running crc32 over the bytes of one file, in file order."""

    def __init__(self):
        self.value, self.nbytes = 0, 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), _CHUNK):
            self.value = zlib.crc32(view[i:i + _CHUNK], self.value)
        self.nbytes += len(view)

    def record(self) -> dict:
        return {"bytes": self.nbytes, ALGORITHM: f"{self.value:08x}"}


def record_of_bytes(data: bytes) -> dict:
    crc = Crc32()
    crc.update(data)
    return crc.record()


def file_record(path: str) -> dict:
    """The record of a file as it is on disk (read in chunks)."""
    crc = Crc32()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc.update(chunk)
    return crc.record()


def safetensors_record(path: str, tensors: dict) -> dict:
    """The record of a safetensors file just written from ``tensors`` (contiguous, on the CPU),
    hashed from memory: the header as written, then each tensor's bytes in the file's order."""
    with open(path, "rb") as f:
        head = f.read(8)
        header = f.read(struct.unpack("<Q", head)[0])
    crc = Crc32()
    crc.update(head + header)
    entries = sorted((v["data_offsets"], k) for k, v in json.loads(header).items() if k != "__metadata__")
    end = 0
    for (start, stop), name in entries:
        t = tensors[name]
        if start != end or stop - start != t.numel() * t.element_size():
            return file_record(path)  # not laid out as expected: hash what is on disk instead
        if t.numel():
            crc.update(t.reshape(-1).view(torch.uint8).numpy())
        end = stop
    if crc.nbytes != os.path.getsize(path):
        return file_record(path)
    return crc.record()


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
