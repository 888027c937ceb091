"""Decompressing input streams that fail loudly when they end early.

`open_stream(path)` picks the decompressor from the file's first bytes (gzip, bzip2, xz, zstd,
or none), like `tar xf`, so a mislabelled archive still reads (or takes the one its caller
names). Every stream raises an `EOFError`
when the file ends before the compressed stream does:

- gzip, bzip2, xz: Python's readers already raise at a missing end-of-stream marker or
  checksum, but only when read to the end; `drain` reads what a consumer left unread (a tar's
  padding after its end-of-archive blocks) so a cut in the last bytes is found too;
- zstd: `zstandard`'s `stream_reader` returns a short read at a cut and no error, so frames
  are decoded one after another here and a file ending inside a frame raises.

What cannot be seen: a multi-member gzip / multi-stream bzip2 / multi-frame zstd file cut
exactly between two members is a valid shorter file (formats without a total length).
`check_tar_end` tells whether a tar ended with its end-of-archive block rather than at a cut
(`tarfile` treats both as the end).
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

_CHUNK = 1 << 20
_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zst"))


def compression(path: str) -> str | None:
    """'gz', 'bz2', 'xz', 'zst' from the file's magic bytes, or None (not compressed)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def open_stream(path: str, kind: str | None = "magic"):
    """The decompressed bytes of `path` as a binary file object (see module doc).

    kind: "magic" (default) picks the decompressor from the first bytes; "gz", "bz2", "xz",
    "zst" or None insist on one (a `.jsonl.gz` that is not gzip is an error, not text).
    """
    if kind == "magic":
        kind = compression(path)
    if kind == "gz":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zst":
        return io.BufferedReader(_ZstdFrames(open(path, "rb")), _CHUNK)
    return open(path, "rb")


def drain(stream) -> None:
    """Read `stream` to its end, so its decompressor checks the end marker and checksum."""
    while stream.read(_CHUNK):
        pass


class _ZstdFrames(io.RawIOBase):
    """zstd frames decoded one after another; EOFError when the file ends inside a frame."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._dctx, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._obj = None
        self._pending = b""     # compressed bytes not yet given to a decompressor
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._out):
            if not self._decode_more():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decode_more(self) -> bool:
        """Decode the next piece of output; False at a clean end (no frame left open)."""
        if not self._pending:
            self._pending = self._raw.read(_CHUNK)
            if not self._pending:
                if self._obj is not None and not self._obj.eof:
                    raise EOFError("zstd file ended before the end of its last frame (truncated)")
                return False
        if self._obj is None or self._obj.eof:
            self._obj = self._dctx.decompressobj()
        try:
            out = self._obj.decompress(self._pending)
        except self._error as err:
            raise OSError(f"corrupt zstd data: {err}") from None
        self._pending = self._obj.unused_data if self._obj.eof else b""
        self._out = memoryview(out)
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()


class _EndCheckedTarInfo(tarfile.TarInfo):
    """Records on the TarFile that iteration stopped at an end-of-archive (all-zero) block.

    `tarfile` also stops silently at a header cut short, a missing header (a file cut between
    members) or a garbage header; only the zero block is a real end.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.mom_saw_end_block = True
            raise


def open_tar(stream) -> tarfile.TarFile:
    """A streaming (`r|`) TarFile over an already decompressed `stream`, for `check_tar_end`."""
    return tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndCheckedTarInfo)


def check_tar_end(tar: tarfile.TarFile) -> None:
    """After iterating `tar` (from `open_tar`): EOFError unless it ended with an end-of-archive block."""
    if not getattr(tar, "mom_saw_end_block", False):
        raise EOFError(f"the tar ends at byte {tar.offset} without its end-of-archive block (truncated or damaged)")
